"""GRPO / online DPO rollouts: decode-layout config fields, ``CausalLM.prefill``/``decode_step`` on the in-place decode
path, reward models scored in fixed length buckets (compile count), the sampler's log-probs reused as
``old_per_token_logps`` (against the recomputed path), and device work dispatched before the host work (order and
values against the serial path). Deterministic CPU checks on tiny models."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_loops import instructions, root_op
from model_fixtures import make_torch_model, save_torch_model

import trl_jax.generation as generation
from trl_jax.configs import GENERATION_JAX_FIELDS, GRPOConfig, OnlineDPOConfig
from trl_jax.data.builtin import load_builtin_dataset
from trl_jax.models import from_pretrained
from trl_jax.rewards import completion_text
from trl_jax.trainers.grpo import GRPOTrainer, reward_model_bucket
from trl_jax.trainers.online_dpo import OnlineDPOTrainer

MODEL = "builtin:tiny-qwen3"


def digit_reward(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in completion_text(c))) for c in completions]


def grpo_args(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=1, num_generations=4, max_completion_length=6,
                temperature=0.9, max_steps=2, logging_steps=1, save_strategy="no", learning_rate=1e-3,
                report_to="none", bf16=False, gradient_checkpointing=False, seed=3, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def dataset(n=16):
    return load_builtin_dataset("arithmetic_prompts").select(range(n))


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("cls", [GRPOConfig, OnlineDPOConfig])
def test_decode_config_fields(cls, tmp_path):
    names = {f.name: f.default for f in dataclasses.fields(cls)}
    assert set(GENERATION_JAX_FIELDS) <= set(names)
    assert names["decode_layout"] == "auto" and names["decode_block_size"] == 128
    for layout in ("auto", "replicated", "tensor", None):
        assert cls(output_dir=str(tmp_path), decode_layout=layout).decode_layout == layout
    with pytest.raises(ValueError, match=r"decode_layout.*\('auto', 'replicated', 'tensor', None\).*'fsdp'"):
        cls(output_dir=str(tmp_path), decode_layout="fsdp")
    for bad in (0, -4, 1.5, True):
        with pytest.raises(ValueError, match="decode_block_size"):
            cls(output_dir=str(tmp_path), decode_block_size=bad)
    assert "decode_layout" in cls.__doc__ and "decode_block_size" in cls.__doc__


def _spy_generate(monkeypatch):
    seen = []
    real = generation.generate

    def spy(*a, **kw):
        seen.append({k: kw.get(k) for k in ("decode_layout", "decode_block_size", "num_generations",
                                           "return_logprobs")})
        return real(*a, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    return seen


def test_trainers_pass_decode_fields_to_the_sampler(tmp_path, monkeypatch):
    seen = _spy_generate(monkeypatch)
    tr = GRPOTrainer(MODEL, reward_funcs=digit_reward, train_dataset=dataset(),
                     args=grpo_args(tmp_path, decode_layout=None, decode_block_size=4))
    tr._build(2)
    tr._batch_for_step(0)
    assert seen[-1] == {"decode_layout": None, "decode_block_size": 4, "num_generations": 4,
                        "return_logprobs": False}
    args = OnlineDPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=1, max_new_tokens=5,
                           max_steps=1, report_to="none", save_strategy="no", decode_layout="replicated",
                           decode_block_size=2, disable_tqdm=True)
    od = OnlineDPOTrainer(MODEL, reward_funcs=digit_reward, args=args, train_dataset=dataset(8))
    od._build(1)
    od._batch_for_step(0)
    assert seen[-1] == {"decode_layout": "replicated", "decode_block_size": 2, "num_generations": 2,
                        "return_logprobs": False}


# ------------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("scan", [True, False])
def test_causal_lm_decode_step_writes_the_cache_in_place(tmp_path, scan):
    tm = make_torch_model("mistral", seed=2)  # sliding window 4: the cached mask must apply it
    model, params = from_pretrained(save_torch_model(tm, tmp_path / "m"), scan_layers=scan)
    c = model.config
    rng = np.random.default_rng(0)
    B, P, G = 3, 6, 5
    ids = rng.integers(1, 97, size=(B, P + G)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    ids[mask == 0] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    ref = np.asarray(model.logits(params, ids, pos, attention_mask=mask))
    prefill = jax.jit(model.prefill, donate_argnums=(1,))
    step = jax.jit(model.decode_step, donate_argnums=(1,))
    cache = model.init_cache(B, P + G, jnp.float32)
    assert set(cache) == {"k", "v", "segment_ids", "index"}
    k0 = cache["k"]
    last, cache = prefill(params, cache, ids[:, :P], pos[:, :P], mask[:, :P])
    assert k0.is_deleted()
    np.testing.assert_allclose(np.asarray(last), ref[:, P - 1], atol=2e-5)
    for t in range(P, P + G):
        last, cache = step(params, cache, ids[:, t], pos[:, t])
        np.testing.assert_allclose(np.asarray(last), ref[:, t], atol=2e-5)
    assert int(cache["index"]) == P + G
    # compiled decode step: the cache is aliased to the output and written only by dynamic-update-slices
    from trl_jax.utils.hlo_cost import parse

    text = step.lower(params, cache, ids[:, 0], pos[:, 0]).compile().as_text()
    assert "input_output_alias" in text
    comps, entry = parse(text)
    full = [c.num_hidden_layers, B, P + G, c.num_key_value_heads, c.head_dim]
    for _, op, shapes, instr in instructions(comps, entry):
        if any(dims == full for _, dims in shapes):
            if op == "fusion":
                op = root_op(comps, instr.split("calls=")[1].split(",")[0].strip().lstrip("%"))
            assert op in ("parameter", "get-tuple-element", "tuple", "while", "dynamic-update-slice", "bitcast"), \
                instr[:200]


# ------------------------------------------------------------------------------------------------------ reward models
def test_reward_model_bucket_lengths():
    assert [reward_model_bucket(n) for n in (1, 64, 65, 128, 129, 600)] == [64, 64, 128, 128, 256, 1024]
    # capped at prompt + completion (rounded to 64) when the row fits: never padded past the longest sequence
    assert [reward_model_bucket(n, cap=300) for n in (10, 100, 200, 300, 320, 400)] == [64, 128, 256, 320, 320, 512]


@pytest.fixture(scope="module")
def rm_trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    probe = GRPOTrainer(MODEL, reward_funcs=digit_reward, args=grpo_args(tmp / "probe"), train_dataset=dataset())
    tok = probe.processing_class
    tm = make_torch_model("qwen3", kind="seqcls", num_labels=1, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                          max_position_embeddings=512)
    rm = from_pretrained(save_torch_model(tm, tmp / "rm"))
    tr = GRPOTrainer(MODEL, reward_funcs=[rm, digit_reward], args=grpo_args(tmp / "tr"), train_dataset=dataset(),
                     reward_processing_classes=[tok, None])
    return tr, rm, tok


def test_reward_models_compile_once_per_length_bucket(rm_trainer):
    tr, (model, params), tok = rm_trainer
    cap = tr.prompt_length + tr.args.max_completion_length
    assert cap <= 64
    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    lengths = (3, 60, 70, 200)  # completion characters (= tokens with the char tokenizer); 4 + 60 = 64: a bucket's edge
    expected_buckets = set()
    scores = jax.jit(model.sequence_scores)
    for n in lengths:
        completions = ["7" * n, "8" * (n // 2 + 1), "9", "5" * max(n - 3, 1)]
        enc = tok(text=[p + c for p, c in zip(prompts, completions)], add_special_tokens=False)["input_ids"]
        expected_buckets.add(reward_model_bucket(max(map(len, enc)), cap))
        got = np.asarray(jax.device_get(tr._dispatch_reward_model(0, prompts, completions)))[:, 0]
        exact = [float(scores(params, np.asarray([e], np.int32))[0, 0]) for e in enc]  # no padding
        np.testing.assert_allclose(got, exact, atol=1e-5)
    assert expected_buckets == {64, 128, 256}
    assert tr.reward_model_compiles[0] == len(expected_buckets)


def test_reward_models_run_while_python_rewards_run(rm_trainer, monkeypatch):
    tr, _, _ = rm_trainer
    events = []
    real = tr._dispatch_reward_model
    monkeypatch.setattr(tr, "_dispatch_reward_model", lambda *a: (events.append("model dispatched"), real(*a))[1])
    monkeypatch.setattr(tr, "reward_funcs", [tr.reward_funcs[0], lambda completions, **kw: (
        events.append("python reward"), digit_reward(completions))[1]])
    rows = [{"prompt": "1+1=", "prompt_ids": [1]}] * 4
    completions = ["2", "22", "x", "3"]
    out = tr._calculate_rewards(rows, [r["prompt"] for r in rows], completions, [[5]] * 4)
    assert events == ["model dispatched", "python reward"]
    np.testing.assert_array_equal(out[:, 1], [1.0, 2.0, 0.0, 1.0])
    np.testing.assert_allclose(out[:, 0], tr._reward_model_scores(0, [r["prompt"] for r in rows], completions))


# ------------------------------------------------------------------------------------------------------ old log-probs
def _generation_batch(tr, seed=0):
    rows = tr._rows_for_generation(0)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    return tr.generate_and_score(rows, tr.state.params, rng, num_generations=tr.num_generations,
                                 with_old_logps=True)


@pytest.mark.parametrize("kw", [dict(), dict(mask_truncated_completions=True, loss_type="grpo", beta=0.04)])
def test_sampler_logps_are_the_recomputed_old_logps(tmp_path, kw):
    # steps_per_generation=2 with GA=1: the buffer outlives an optimizer step, so TRL computes old log-probs
    tr = GRPOTrainer(MODEL, reward_funcs=digit_reward, train_dataset=dataset(),
                     args=grpo_args(tmp_path, steps_per_generation=2, **kw))
    tr._build(4)
    assert tr.sampler_logps_are_exact()
    reused, _, _ = _generation_batch(tr)
    assert tr._logps_jit is None  # no forward pass ran for the old log-probs
    tr.reuse_sampler_logps = False
    recomputed, _, _ = _generation_batch(tr)
    assert tr._logps_jit is not None
    for k in ("input_ids", "segment_ids", "completion_mask", "advantages"):
        np.testing.assert_array_equal(reused[k], recomputed[k])  # same samples either way
    mask = reused["completion_mask"] > 0
    assert mask.any()
    np.testing.assert_allclose(reused["old_per_token_logps"], recomputed["old_per_token_logps"], atol=2e-5, rtol=0)
    assert np.all(reused["old_per_token_logps"][~mask] == 0) and np.all(recomputed["old_per_token_logps"][~mask] == 0)
    # the loss (and its metrics) with either old log-probs, after one update so that the ratio is not 1
    state = tr.state
    b0 = tr._device_batch({k: v[:8] for k, v in reused.items()})
    state, _ = tr._train_step(state, b0)
    loss = jax.jit(lambda p, b, r: tr.grpo_loss_terms(p, b, r))
    a = jax.device_get(loss(state.params, tr._device_batch({k: v[8:] for k, v in reused.items()}), state.ref_params))
    b = jax.device_get(loss(state.params, tr._device_batch({k: v[8:] for k, v in recomputed.items()}),
                            state.ref_params))
    if not kw:  # (with mask_truncated_completions the tiny model's truncated rows may all be masked: loss 0)
        assert abs(float(a.loss)) > 0
    np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-5, atol=1e-7)
    for k in a.metrics:
        np.testing.assert_allclose(np.asarray(a.metrics[k]), np.asarray(b.metrics[k]), rtol=1e-4, atol=1e-6)


def _bare_trainer(args, dtype):
    from types import SimpleNamespace

    tr = GRPOTrainer.__new__(GRPOTrainer)
    tr.args, tr.eos_token_ids, tr.pad_token_id = args, [1], 0
    tr.model = SimpleNamespace(config=SimpleNamespace(dtype=dtype))
    return tr


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(repetition_penalty=1.2)])
def test_warped_sampling_recomputes_old_logps(tmp_path, kw):
    assert _bare_trainer(grpo_args(tmp_path, steps_per_generation=2), jnp.float32).sampler_logps_are_exact()
    tr = _bare_trainer(grpo_args(tmp_path, steps_per_generation=2, **kw), jnp.float32)
    assert not tr.sampler_logps_are_exact()
    tr.reuse_sampler_logps = "always"
    assert not tr.sampler_logps_are_exact()


def test_bf16_sampler_logps_recomputed_unless_asked(tmp_path):
    tr = _bare_trainer(grpo_args(tmp_path, steps_per_generation=2), jnp.bfloat16)
    assert not tr.sampler_logps_are_exact()  # KV-cache decode and full forward differ by bf16 rounding
    tr.reuse_sampler_logps = "always"
    assert tr.sampler_logps_are_exact()


def test_old_logps_dispatched_before_host_work_same_values(tmp_path, monkeypatch):
    tr = GRPOTrainer(MODEL, reward_funcs=digit_reward, train_dataset=dataset(),
                     args=grpo_args(tmp_path, steps_per_generation=2, top_k=20))
    tr._build(4)
    assert not tr.sampler_logps_are_exact()
    events = []
    real_dispatch, real_call = tr._dispatch_old_logps, tr._call_reward_func
    monkeypatch.setattr(tr, "_dispatch_old_logps", lambda *a: (events.append("old logps dispatched"),
                                                               real_dispatch(*a))[1])
    monkeypatch.setattr(tr, "_call_reward_func", lambda *a: (events.append("reward"), real_call(*a))[1])
    arrays, _, _ = _generation_batch(tr)
    assert events == ["old logps dispatched", "reward"]
    serial = tr._old_logps(tr.state.params, arrays)  # the old serial path: same program, same inputs
    np.testing.assert_array_equal(arrays["old_per_token_logps"], serial)
    assert {"generate", "host", "old_logps_wait"} <= set(tr.phase_seconds)
