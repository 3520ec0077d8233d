"""trl_jax.generation.generate against transformers PyTorch generate / logits processors on the same tiny models."""

import jax
import numpy as np
import pytest
import torch
import transformers
from model_fixtures import VOCAB, make_torch_model, save_torch_model

from trl_jax.generation import completion_mask_from_ids, generate, repeat_for_generations
from trl_jax.generation.sampler import _generate_jit
from trl_jax.models import from_pretrained, param_shardings
from trl_jax.parallel import make_mesh, shard_batch

PAD = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in ("qwen3", "llama"):
        tm = make_torch_model(name, seed=1)
        d = save_torch_model(tm, tmp_path_factory.mktemp(name))
        model, params = from_pretrained(d)
        out[name] = (tm, model, params)
    return out


def _prompts(B=4, P=8, seed=0, pads=(0, 3, 6, 1)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(B, P)).astype(np.int32)
    mask = np.ones_like(ids)
    for r in range(B):
        mask[r, : pads[r % len(pads)]] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _hf_generate(tm, ids, mask, N, **kw):
    with torch.no_grad():
        out = tm.generate(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=N, pad_token_id=PAD, output_scores=True, return_dict_in_generate=True,
                          **kw)
    seq = out.sequences[:, ids.shape[1]:].numpy()
    seq = np.pad(seq, ((0, 0), (0, N - seq.shape[1])), constant_values=PAD)  # HF stops when every row is done
    return seq, [s.float() for s in out.scores]


def _hf_processors(tm, ids, mask, **gen_kwargs):
    gc = transformers.GenerationConfig(**gen_kwargs)
    return tm._get_logits_processor(generation_config=gc, input_ids_seq_length=ids.shape[1], device="cpu",
                                    model_kwargs={"attention_mask": torch.as_tensor(mask)})


def _hf_last_logits(tm, ids, mask):
    """Next-token logits of the torch model after a left-padded sequence (transformers' position ids)."""
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = tm(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(pos, dtype=torch.long))
    return out.logits[:, -1].float()


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_greedy_matches_transformers_token_for_token(models, name):
    tm, model, params = models[name]
    ids, mask = _prompts()
    N = 12
    free = generate(model, params, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD)
    free_ids = np.asarray(free.completion_ids)
    ref, _ = _hf_generate(tm, ids, mask, N, do_sample=False, eos_token_id=None)
    np.testing.assert_array_equal(free_ids, ref)
    assert np.asarray(free.is_truncated).all() and int(free.num_steps) == N

    # two stop ids: row 0 stops on its 4th token, other rows may stop too or run to N
    eos = [int(free_ids[0, 3]), int(free_ids[2, 5])]
    out = generate(model, params, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    ref, _ = _hf_generate(tm, ids, mask, N, do_sample=False, eos_token_id=eos)
    got = np.asarray(out.completion_ids)
    np.testing.assert_array_equal(got, ref)
    trunc = np.asarray(out.is_truncated)
    assert not trunc[0] and not trunc[2]
    np.testing.assert_array_equal(np.asarray(out.completion_mask), np.asarray(completion_mask_from_ids(got, eos)))


def test_greedy_repetition_penalty_and_logprobs_match_transformers(models):
    tm, model, params = models["qwen3"]
    ids, mask = _prompts(seed=5)
    N = 10
    out = generate(model, params, ids, mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD,
                   repetition_penalty=1.5)
    ref, scores = _hf_generate(tm, ids, mask, N, do_sample=False, eos_token_id=None, repetition_penalty=1.5)
    got = np.asarray(out.completion_ids)
    np.testing.assert_array_equal(got, ref)
    assert len({int(t) for t in got[0]}) > 3  # the penalty does change the (otherwise repetitive) greedy path
    ref_lp = np.stack([torch.log_softmax(s, -1).gather(1, torch.as_tensor(ref[:, t:t + 1])).numpy()[:, 0]
                       for t, s in enumerate(scores)], axis=1)  # HF scores = processed logits
    np.testing.assert_allclose(np.asarray(out.logprobs), ref_lp, atol=2e-5)


def test_sampled_logprobs_are_transformers_processed_logprobs(models):
    """Teacher-force our sampled completions through the torch model + transformers' processor chain."""
    tm, model, params = models["qwen3"]
    ids, mask = _prompts(seed=7)
    N = 8
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    out = generate(model, params, ids, mask, jax.random.key(3), max_new_tokens=N, pad_token_id=PAD, **kw)
    comp, lps = np.array(out.completion_ids), np.array(out.logprobs)
    procs = _hf_processors(tm, ids, mask, do_sample=True, **kw)
    full_mask = np.concatenate([mask, np.ones_like(comp)], axis=1)
    for t in range(N):
        seq = np.concatenate([ids, comp[:, :t]], axis=1)
        scores = procs(torch.as_tensor(seq, dtype=torch.long), _hf_last_logits(tm, seq, full_mask[:, :seq.shape[1]]))
        ref = torch.log_softmax(scores, -1).gather(1, torch.as_tensor(comp[:, t:t + 1], dtype=torch.long))
        np.testing.assert_allclose(lps[:, t], ref.numpy()[:, 0], atol=1e-4)
    assert np.isfinite(lps).all() and (lps <= 0).all()


def test_sampling_is_reproducible_with_a_fixed_key(models):
    _, model, params = models["qwen3"]
    ids, mask = _prompts()
    kw = dict(max_new_tokens=10, temperature=1.2, pad_token_id=PAD)
    a = generate(model, params, ids, mask, jax.random.key(0), **kw)
    compiled = _generate_jit._cache_size()
    b = generate(model, params, ids, mask, jax.random.key(0), **kw)
    c = generate(model, params, ids, mask, jax.random.key(1), **kw)
    assert _generate_jit._cache_size() == compiled  # same (B, P, N) bucket and options: no recompile
    # also callable inside a user's jit (e.g. a rollout step), with the same result
    inner = jax.jit(lambda p, i, m, k: generate(model, p, i, m, k, **kw).completion_ids)
    np.testing.assert_array_equal(np.asarray(inner(params, ids, mask, jax.random.key(0))),
                                  np.asarray(a.completion_ids))
    np.testing.assert_array_equal(np.asarray(a.completion_ids), np.asarray(b.completion_ids))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.completion_ids) != np.asarray(c.completion_ids)).any()


DIST_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.5, top_k=5),
    dict(top_p=0.8),
    dict(temperature=1.5, min_p=0.2),
    dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
]


@pytest.mark.parametrize("kw", DIST_CASES)
def test_first_token_frequencies_match_processed_softmax(models, kw):
    tm, model, params = models["qwen3"]
    n = 4096
    ids1, mask1 = _prompts(B=1, P=6, seed=11, pads=(1,))
    batch = repeat_for_generations({"ids": ids1, "mask": mask1}, n)
    out = generate(model, params, batch["ids"], batch["mask"], jax.random.key(42), max_new_tokens=1,
                   pad_token_id=PAD, **kw)
    first = np.asarray(out.completion_ids)[:, 0]
    logits = _hf_last_logits(tm, ids1, mask1)
    procs = _hf_processors(tm, ids1, mask1, do_sample=True, top_k=kw.pop("top_k", 0), **kw)
    p = torch.softmax(procs(torch.as_tensor(ids1, dtype=torch.long), logits.clone()), -1).numpy()[0]
    raw = torch.softmax(logits, -1).numpy()[0]
    freq = np.bincount(first, minlength=p.size) / n
    tv = 0.5 * np.abs(freq - p).sum()
    noise = 0.5 * np.sqrt(2 * p * (1 - p) / (np.pi * n)).sum()  # E[TV] of n exact draws (normal approx.)
    assert tv < 3 * noise + 0.005, (tv, noise)
    assert 0.5 * np.abs(raw - p).sum() > 3 * noise + 0.005  # the processing is visible at this sample size
    assert freq[p == 0].sum() == 0  # filtered tokens are never drawn
    # returned log-probs are those of the processed distribution
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.log(p[first]), atol=1e-4)


def test_eos_padding_mask_truncation_and_early_stop(models):
    _, model, params = models["qwen3"]
    ids, mask = _prompts(seed=2)
    N, pad = 12, 96
    base = np.asarray(generate(model, params, ids, mask, jax.random.key(5), max_new_tokens=N, pad_token_id=pad,
                               temperature=1.5).completion_ids)
    # stop ids drawn so every row finishes within its first 3 tokens -> loop exits early
    eos = sorted({int(base[r, 2]) for r in range(ids.shape[0])})
    out = generate(model, params, ids, mask, jax.random.key(5), max_new_tokens=N, pad_token_id=pad,
                   temperature=1.5, eos_token_id=eos)
    got, cm = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    first = [int(np.flatnonzero(np.isin(base[r], eos))[0]) for r in range(ids.shape[0])]
    assert max(first) <= 2
    for r, f in enumerate(first):
        np.testing.assert_array_equal(got[r, : f + 1], base[r, : f + 1])  # same key -> same tokens up to EOS
        assert (got[r, f + 1:] == pad).all()
        np.testing.assert_array_equal(cm[r], (np.arange(N) <= f).astype(np.int32))
        assert (np.asarray(out.logprobs)[r, f + 1:] == 0).all()
    np.testing.assert_array_equal(np.asarray(out.completion_lengths), np.array(first) + 1)
    assert not np.asarray(out.is_truncated).any()
    assert int(out.num_steps) == max(first) + 1 < N

    # a row without EOS is truncated and fully masked in; the others stop
    eos_one = [int(base[0, 1])]
    out = generate(model, params, ids, mask, jax.random.key(5), max_new_tokens=N, pad_token_id=pad,
                   temperature=1.5, eos_token_id=eos_one)
    trunc = np.asarray(out.is_truncated)
    has_eos = np.isin(base, eos_one).any(axis=1)
    np.testing.assert_array_equal(trunc, ~has_eos)
    assert trunc.any() and not trunc[0]
    np.testing.assert_array_equal(np.asarray(out.completion_mask)[trunc], 1)
    np.testing.assert_array_equal(np.asarray(out.completion_ids)[trunc], base[trunc])
    assert int(out.num_steps) == N


def test_sharded_call_equals_unsharded(models):
    _, model, params = models["qwen3"]
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids, mask = _prompts(B=8, seed=9)
    kw = dict(max_new_tokens=10, pad_token_id=PAD, temperature=0.9, top_p=0.95, repetition_penalty=1.1,
              eos_token_id=[int(ids[0, -1])])
    ref = generate(model, params, ids, mask, jax.random.key(7), **kw)
    sh_params = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
    b = shard_batch({"ids": ids, "mask": mask}, mesh)
    out = generate(model, sh_params, b["ids"], b["mask"], jax.random.key(7), mesh=mesh, **kw)
    assert len(out.completion_ids.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out.completion_ids), np.asarray(ref.completion_ids))
    np.testing.assert_array_equal(np.asarray(out.completion_mask), np.asarray(ref.completion_mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_input_errors(models):
    _, model, params = models["qwen3"]
    ids, mask = _prompts()
    right = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, params, ids, right, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="do_sample=False"):
        generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="rng"):
        generate(model, params, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        generate(model, params, ids[0], mask[0], max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=2, top_p=1.5)
