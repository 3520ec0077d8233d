"""``trl-jax compare``: the shipped SFT and DPO quickstart configs, shrunk to the tiny built-in model and 10 steps,
run once with TRL (torch, CPU) and once with trl_jax in their own subprocesses; the per-step logs agree within the
default tolerance, and compare.json / compare.png are written. The GRPO and online DPO quickstarts (3 steps, a
smaller batch) are compared on trl_jax's sampled completions replayed through TRL's trainer: same default
tolerance. Also: the message naming the extra when TRL is not installed, the verdict on a run that diverges, the
note on a sampled pad token.

Tolerance: both sides run in fp32 on the same inputs, so per-step differences are rounding (summation order, ~1e-7
relative per operation) carried through a few optimizer steps; the default ``rtol=1e-3`` is the one the SFT and DPO
comparisons meet over 10 steps. Online DPO's rewards are differences of two ~40-nat sums, so the comparison judges
them with an absolute floor of 8 fp32 ulps of those sums (``compare.resolution_floors``), and TRL logs its loss
rounded to 4 decimals (floor 5e-5); its KL / entropy sums differ by definition on ragged completions (TRL includes
the padding after EOS) and are reported, not judged.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest

from trl_jax import cli
from trl_jax import compare as C
from trl_jax.rewards import completion_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
ONLINE_STEPS = 3


def digit_count_reward(completions, **kwargs):
    """Varied on a random model's completions (the built-in answer rewards are ~0 there): the number of digits.
    Both sides import it by its dotted path, ``test_compare.digit_count_reward``."""
    return [float(sum(ch.isdigit() for ch in completion_text(c))) for c in completions]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """``builtin:tiny-qwen3`` materialised into a private cache (the HF directory both sides load)."""
    from trl_jax.assets import builtin_model_dir

    old = os.environ.get("TRL_JAX_CACHE")
    os.environ["TRL_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return builtin_model_dir("builtin:tiny-qwen3")
    finally:
        if old is None:
            os.environ.pop("TRL_JAX_CACHE")
        else:
            os.environ["TRL_JAX_CACHE"] = old


@pytest.fixture(scope="module")
def nopad_model(tiny_model, tmp_path_factory):
    """The tiny model with no ``pad_token_id`` in its config (the tokenizer keeps its pad token for padding).

    The random tiny model samples its pad token now and then; both sides embed it with transformers'
    ``padding_idx`` rule (no gradient to the pad row through the lookup). The sampling comparisons run on this
    copy, so that a config without ``pad_token_id`` is exercised too."""
    out = tmp_path_factory.mktemp("nopad") / "tiny-qwen3-nopad"
    shutil.copytree(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["pad_token_id"] = None
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


@pytest.fixture(scope="module")
def tests_on_path():
    """The compare subprocesses import ``test_compare.digit_count_reward``: put this directory on PYTHONPATH."""
    with pytest.MonkeyPatch.context() as mp:
        here = str(pathlib.Path(__file__).resolve().parent)
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
        yield


@pytest.fixture(scope="module")
def sft_result(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-sft")
    # quickstart_sft.yaml as shipped (cosine schedule with warm-up, assistant-only loss, seed 42), on the tiny model
    # with a smaller batch.
    return C.run_compare("sft", str(ROOT / "configs" / "quickstart_sft.yaml"),
                         {"model_name_or_path": tiny_model, "per_device_train_batch_size": "4"}, steps=STEPS,
                         out_dir=str(out), threads=1, echo=lambda *a: None)


def test_sft_quickstart_matches_trl(sft_result):
    r = sft_result
    assert r["ok"], (r["max_rel"], r["first_divergence"], r["only_trl"])
    assert r["steps_logged"] == {"trl": STEPS, "trl_jax": STEPS}
    assert {"loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens"} <= set(r["max_rel"])
    assert all(v <= 1e-3 for v in r["max_rel"].values())
    loss = r["curves"]["loss"]["trl"]
    assert max(loss) - min(loss) > 1e-2  # the run moves: a comparison of a frozen model would prove little
    assert len(r["per_step"]) == STEPS and set(r["per_step"][0]["metrics"]["loss"]) >= {
        "trl", "trl_jax", "abs_diff", "rel_diff", "ok"}
    # the quickstart's random sampling was replaced by sequential, and the output says so
    assert any("sequential" in n and "'random'" in n for n in r["notes"])
    t = r["throughput"]
    for side in ("trl", "trl_jax"):
        assert t[side]["tokens_per_s"] > 0 and t[side]["first_step_s"] > 0 and t[side]["measured_steps"] > 0
    assert t["tokens_per_s_ratio"] > 0
    assert r["memory"]["ratio_jax_over_trl"] > 0


def test_sft_compare_files(sft_result):
    with open(sft_result["json_path"], encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["ok"] is True and saved["command"] == "sft"
    assert len(saved["logs"]["trl"]) == len(saved["logs"]["trl_jax"]) == STEPS
    assert saved["curves"]["loss"]["trl"] == sft_result["curves"]["loss"]["trl"]
    png = pathlib.Path(sft_result["png_path"])
    assert png.name == "compare.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dpo_quickstart_matches_trl_through_the_cli(tiny_model, tmp_path, capsys):
    out = tmp_path / "compare-dpo"
    # quickstart_dpo.yaml starts from the SFT quickstart's output; here the tiny model instead.
    rc = cli.main(["compare", "dpo", "--config", str(ROOT / "configs" / "quickstart_dpo.yaml"), "--steps",
                   str(STEPS), "--out", str(out), "--threads", "1", "--model_name_or_path", tiny_model,
                   "--learning_rate", "1e-3"])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert "VERDICT: within tolerance" in text and "tokens/s" in text and "step 10" in text
    r = json.loads((out / "compare.json").read_text())
    assert r["ok"] and r["steps_logged"] == {"trl": STEPS, "trl_jax": STEPS}
    assert {"rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"} <= set(
        r["max_rel"])
    assert r["curves"]["rewards/margins"]["trl"][-1] != 0.0  # the policy moved away from the reference
    assert (out / "compare.png").stat().st_size > 1000


def test_verdict_names_first_diverging_step(sft_result):
    trl_logs = sft_result["logs"]["trl"]
    jax_logs = [dict(h) for h in sft_result["logs"]["trl_jax"]]
    for h in jax_logs[3:]:
        h["loss"] *= 1.01
    sides = {}
    for side, logs in (("trl", trl_logs), ("trl_jax", jax_logs)):
        sides[side] = {"logs": logs, "times": [float(i + 1) for i in range(len(logs))], "t_begin": 0.0,
                       "t_call": 0.0, "peak_rss_mb": 100.0, "memory_kind": "peak host RSS", "device": "cpu",
                       "process_wall_s": 1.0}
    cmp = C.compare(trl_logs, jax_logs)
    r = C._summarise("sft", None, cmp, sides, rtol=1e-3, atol=1e-6, warmup=2, notes=[], n_steps=STEPS)
    assert not r["ok"] and r["first_divergence"] == {"step": 4, "keys": ["loss"]}
    report = C.format_report(r)
    assert "VERDICT: NOT within tolerance" in report and "first diverging step 4 (loss)" in report
    assert report.count("<-- over tolerance") == STEPS - 3


def test_missing_extra_names_it(monkeypatch, capsys, tmp_path):
    real = C._find_spec
    monkeypatch.setattr(C, "_find_spec", lambda name: None if name == "trl" else real(name))
    rc = cli.main(["compare", "sft", "--config", str(ROOT / "configs" / "quickstart_sft.yaml"), "--out",
                   str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("trl-jax: error: ") and 'pip install "trl-jax[compare]"' in err and "trl is not" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def grpo_result(nopad_model, tests_on_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-grpo")
    # quickstart_grpo.yaml as shipped (DAPO loss, constant lr 1e-4, temperature 0.8, seed 42) on the tiny model, with
    # a reward that varies on its completions, a KL term (beta) so the reference path is compared too, and 2
    # prompts x 4 completions per step.
    return C.run_compare("grpo", str(ROOT / "configs" / "quickstart_grpo.yaml"),
                         {"model_name_or_path": nopad_model, "reward_funcs": "test_compare.digit_count_reward",
                          "per_device_train_batch_size": "8", "num_generations": "4", "beta": "0.04"},
                         steps=ONLINE_STEPS, out_dir=str(out), threads=1, echo=lambda *a: None)


def test_grpo_quickstart_step_matches_trl_on_the_same_completions(grpo_result):
    r = grpo_result
    assert r["ok"], (r["max_rel"], r["first_divergence"], r["only_trl"])
    assert r["steps_logged"] == {"trl": ONLINE_STEPS, "trl_jax": ONLINE_STEPS}
    # TRL computed rewards, advantages' statistics, KL, entropy, clipping and the loss itself on trl_jax's samples
    assert {"loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean", "reward", "reward_std",
            "rewards/digit_count_reward/mean", "frac_reward_zero_std", "completions/mean_length",
            "num_tokens"} <= set(r["max_rel"])
    assert all(v <= r["rtol"] for v in r["max_rel"].values())
    c = r["curves"]
    assert max(c["reward_std"]["trl"]) > 0 and min(c["frac_reward_zero_std"]["trl"]) < 1  # non-zero advantages
    assert min(c["kl"]["trl"][1:]) > 0  # the policy left the reference after step 1
    assert r["sampling_differs"] is True and "same completions" in r["compared"]
    assert any(n.startswith("sampling differs") and "rollout_func" in n for n in r["notes"])
    t = r["throughput"]
    for side in ("trl", "trl_jax"):
        assert t[side]["tokens_per_s"] > 0 and t[side]["measured_steps"] > 0
    assert t["tokens_per_s_ratio"] > 0 and r["memory"]["ratio_jax_over_trl"] > 0
    # TRL's own run (its own sampling) is kept for the throughput; its logs are not the compared ones
    assert len(r["trl_own_sampling_logs"]) == ONLINE_STEPS


def test_grpo_compare_files(grpo_result):
    saved = json.loads(pathlib.Path(grpo_result["json_path"]).read_text())
    assert saved["command"] == "grpo" and saved["ok"] is True and saved["main_metrics"] == ["reward"]
    for key in ("per_step", "curves", "throughput", "memory", "notes", "sampling_differs", "compared",
                "throughput_measured_on", "trl_own_sampling_logs"):
        assert key in saved, key
    rollouts = json.loads((pathlib.Path(grpo_result["json_path"]).parent / "trl_jax_rollouts.json").read_text())
    assert [b["step"] for b in rollouts["batches"]] == list(range(1, ONLINE_STEPS + 1))
    assert all(len(b["completion_ids"]) == 8 and len(b["rows"]) == 2 for b in rollouts["batches"])
    assert pathlib.Path(grpo_result["png_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_online_dpo_quickstart_step_matches_trl_through_the_cli(nopad_model, tests_on_path, tmp_path, capsys):
    out = tmp_path / "compare-online-dpo"
    rc = cli.main(["compare", "online-dpo", "--config", str(ROOT / "configs" / "quickstart_online_dpo.yaml"),
                   "--steps", str(ONLINE_STEPS), "--out", str(out), "--threads", "1", "--model_name_or_path",
                   nopad_model, "--reward_funcs", "test_compare.digit_count_reward",
                   "--per_device_train_batch_size", "8", "--learning_rate", "1e-3"])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert "Sampling differs" in text and "VERDICT: within tolerance" in text and f"step {ONLINE_STEPS}" in text
    r = json.loads((out / "compare.json").read_text())
    assert r["ok"] and r["steps_logged"] == {"trl": ONLINE_STEPS, "trl_jax": ONLINE_STEPS}
    assert {"loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/accuracies", "logps/chosen",
            "objective/scores", "objective/scores_margin", "val/contain_eos_token"} <= set(r["max_rel"])
    assert set(r["not_judged"]) == set(C.NOT_JUDGED["online-dpo"])
    assert r["main_metrics"] == ["rewards/margins", "objective/scores"]
    c = r["curves"]
    assert c["rewards/margins"]["trl"][0] == 0.0 and c["rewards/margins"]["trl"][-1] != 0.0  # the policy moved
    assert max(c["objective/scores_margin"]["trl"]) > 0  # pairs ranked by the reward, not all ties
    assert r["throughput"]["step_time_ratio"] > 0
    assert (out / "compare.png").stat().st_size > 1000


def test_sampling_trainer_needs_reward_funcs(tmp_path, capsys):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "quickstart_grpo.yaml").read_text())
    cfg.pop("reward_funcs")
    path = tmp_path / "no_rewards.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", "grpo", "--config", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "set `reward_funcs`" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_usage_errors(capsys):
    assert cli.main(["compare"]) == 2
    assert "trl-jax: error: compare: name the trainer" in capsys.readouterr().err
    assert cli.main(["compare", "ppo", "--config", str(ROOT / "configs" / "quickstart_sft.yaml")]) == 2
    assert "unknown trainer 'ppo'" in capsys.readouterr().err
    assert cli.main(["compare", "sft", "--config", "no/such.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_lora_config_is_compared_from_the_same_initial_adapters(tiny_model, tmp_path):
    """A `use_peft` config (the LoRA SFT quickstart as shipped, on the tiny model): trl_jax writes its initial
    adapters, TRL + peft start from them; the per-step logs agree and the report says so."""
    r = C.run_compare("sft", str(ROOT / "configs" / "quickstart_sft_lora.yaml"),
                      {"model_name_or_path": tiny_model, "per_device_train_batch_size": "4", "lora_r": "8",
                       "lora_alpha": "16"}, steps=4, out_dir=str(tmp_path), threads=1, echo=lambda *a: None)
    assert r["ok"], (r["max_rel"], r["first_divergence"], r["only_trl"])
    assert any("same initial adapters" in n for n in r["notes"])
    assert (tmp_path / "initial-adapter" / "adapter_config.json").exists()
    loss = r["curves"]["loss"]["trl"]
    assert max(loss) - min(loss) > 1e-3
