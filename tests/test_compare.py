"""``trl-jax compare``: the shipped SFT and DPO quickstart configs, shrunk to the tiny built-in model and 10 steps,
run once with TRL (torch, CPU) and once with trl_jax in their own subprocesses; the per-step logs agree within the
default tolerance, and compare.json / compare.png are written. Also: the message naming the extra when TRL is not
installed, the unsupported sampling trainers, and the verdict on a run that diverges.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from trl_jax import cli
from trl_jax import compare as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10


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


@pytest.mark.parametrize("trainer", ["grpo", "online-dpo"])
def test_sampling_trainers_not_supported_yet(trainer, capsys):
    rc = cli.main(["compare", trainer, "--config", str(ROOT / "configs" / "quickstart_grpo.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("trl-jax: error: not supported yet:") and "random streams" in err


def test_usage_errors(capsys):
    assert cli.main(["compare"]) == 2
    assert "trl-jax: error: compare: name the trainer" in capsys.readouterr().err
    assert cli.main(["compare", "ppo", "--config", str(ROOT / "configs" / "quickstart_sft.yaml")]) == 2
    assert "unknown trainer 'ppo'" in capsys.readouterr().err
    assert cli.main(["compare", "sft", "--config", "no/such.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err
