"""trl_jax.generation.processors against transformers' logits processors on identical logits; num_generations
ordering against TRL's RepeatSampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as lp
from trl.trainer.utils import RepeatSampler

from trl_jax.generation import (
    SamplingConfig,
    min_p,
    process_logits,
    repeat_for_generations,
    repetition_penalty,
    seen_tokens,
    temperature,
    top_k,
    top_p,
)

B, V = 6, 97


def _logits(seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((B, V)) * scale).astype(np.float32)


def _ids_and_mask(seed=1, T=10):
    """Left-padded prompt ids (pad id 0 also appears as a *real* token in row 0) and their mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T))
    mask = np.ones((B, T), np.int64)
    for r, n_pad in enumerate([0, 2, 5, 9, 1, 3]):
        mask[r, :n_pad] = 0
    ids[mask == 0] = 0
    ids[0, 4] = 0
    return ids, mask


def _hf(proc, logits, ids=None):
    ids = torch.zeros((B, 1), dtype=torch.long) if ids is None else torch.as_tensor(ids)
    return proc(ids, torch.as_tensor(logits).clone()).numpy()


def _same(ours, ref):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    np.testing.assert_allclose(np.where(np.isneginf(ref), 0, ours), np.where(np.isneginf(ref), 0, ref),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.3, 0.7, 1.8])
def test_temperature(t):
    x = _logits()
    _same(temperature(jnp.asarray(x), t), _hf(lp.TemperatureLogitsWarper(t), x))


@pytest.mark.parametrize("k", [1, 5, 50, 200])
def test_top_k(k):
    x = _logits()
    x[0, :4] = x[0, 10]  # ties at the k-th value are kept, as transformers
    out = np.asarray(top_k(jnp.asarray(x), k))
    _same(out, _hf(lp.TopKLogitsWarper(k), x))
    assert (np.isfinite(out).sum(-1) >= min(k, V)).all()


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 0.95, 1.0])
def test_top_p(p):
    x = _logits(scale=2.0)
    out = np.asarray(top_p(jnp.asarray(x), p))
    _same(out, _hf(lp.TopPLogitsWarper(p), x))
    assert (np.isfinite(out).sum(-1) >= 1).all()


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 1.0])
def test_min_p(p):
    x = _logits()
    _same(min_p(jnp.asarray(x), p), _hf(lp.MinPLogitsWarper(p), x))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_ignores_left_padding(penalty):
    x = _logits()
    ids, mask = _ids_and_mask()
    padding_lengths = torch.as_tensor((mask != 0).astype(np.int64).argmax(axis=1))  # what generate() passes
    ref = _hf(lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding_lengths), x, ids)
    seen = seen_tokens(jnp.asarray(ids), jnp.asarray(mask), V)
    _same(repetition_penalty(jnp.asarray(x), seen, penalty), ref)
    # the pad id (0) is penalized only in row 0, where it is a real token
    assert bool(seen[0, 0]) and not bool(seen[3, 0])


def _hf_chain(gen_kwargs, ids, mask):
    """The processor list transformers' generate() builds for these options (same order, same conditions)."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)
    gc = transformers.GenerationConfig(**gen_kwargs)
    return model._get_logits_processor(generation_config=gc, input_ids_seq_length=ids.shape[1],
                                       device="cpu", model_kwargs={"attention_mask": torch.as_tensor(mask)})


CHAINS = [
    dict(do_sample=False),
    dict(do_sample=False, repetition_penalty=1.4),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, temperature=1.3, top_k=7, top_p=0.9),
    dict(do_sample=True, temperature=0.6, top_p=0.85, min_p=0.1, repetition_penalty=1.2),
    dict(do_sample=True, temperature=1.0, top_k=20, top_p=0.95, min_p=0.05, repetition_penalty=0.8),
]


@pytest.mark.parametrize("kw", CHAINS)
def test_chain_matches_generate_processor_list(kw):
    x = _logits(seed=3)
    ids, mask = _ids_and_mask(seed=4)
    ref = _hf(_hf_chain({**kw, "top_k": kw.get("top_k", 0)}, ids, mask), x, ids)
    cfg = SamplingConfig(max_new_tokens=1, do_sample=kw["do_sample"], temperature=kw.get("temperature", 1.0),
                         top_k=kw.get("top_k"), top_p=kw.get("top_p"), min_p=kw.get("min_p"),
                         repetition_penalty=kw.get("repetition_penalty"))
    seen = seen_tokens(jnp.asarray(ids), jnp.asarray(mask), V)
    out = jax.jit(cfg.process)(jnp.asarray(x), seen)
    _same(out, ref)


def test_process_logits_bf16_input_is_fp32():
    x = jnp.asarray(_logits()).astype(jnp.bfloat16)
    out = process_logits(x, do_sample=True, temperature_value=0.5, top_k_value=3)
    assert out.dtype == jnp.float32


def test_repetition_penalty_needs_seen():
    with pytest.raises(ValueError, match="seen"):
        process_logits(jnp.zeros((1, 4)), do_sample=False, repetition_penalty_value=1.2)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_repeat_for_generations_matches_repeat_sampler(g):
    n = 5
    order = list(RepeatSampler(list(range(n)), mini_repeat_count=g, batch_size=n, shuffle=False))
    ids = np.arange(n * 3).reshape(n, 3)
    np.testing.assert_array_equal(repeat_for_generations(ids, g), ids[order])
    np.testing.assert_array_equal(np.asarray(repeat_for_generations(jnp.asarray(ids), g)), ids[order])
    assert repeat_for_generations([f"p{i}" for i in range(n)], g) == [f"p{i}" for i in order]
    batch = repeat_for_generations({"prompt_ids": ids, "answer": list(range(n))}, g)
    assert batch["answer"] == order
    with pytest.raises(ValueError, match="num_generations"):
        repeat_for_generations(ids, 0)
