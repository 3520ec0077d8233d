"""The distillation loss equals TRL 1.16's own code on identical inputs: ``DistillationTrainer``'s chunked
divergence (``_chunked_divergence_loss``: value, student entropy, gradients to the student's hidden states and LM
head) and GKD's ``generalized_jsd_loss`` (every reduction, with and without labels)."""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.gkd import GKDTrainer
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from trl_jax.losses.distillation import distillation_loss, generalized_jsd_loss, per_token_divergence

B, K, DS, DT, V = 3, 5, 8, 12, 40


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    hs = r.normal(size=(B, K, DS)).astype(np.float32)
    ht = r.normal(size=(B, K, DT)).astype(np.float32)
    ws = (r.normal(size=(V, DS)) * 0.7).astype(np.float32)  # torch layout [V, D]
    wt = (r.normal(size=(V, DT)) * 0.9).astype(np.float32)
    mask = (r.random((B, K)) > 0.3).astype(np.int64)
    mask[0, 0] = 1
    return hs, ht, ws, wt, mask


def _trl(hs, ht, ws, wt, mask, beta, temperature, num_items=None, **kw):
    hs_t = torch.tensor(hs, requires_grad=True)
    ws_t = torch.tensor(ws, requires_grad=True)
    loss, ent_sum, n = _chunked_divergence_loss(hs_t, torch.tensor(ht), ws_t, torch.tensor(wt), torch.tensor(mask),
                                                beta, num_items_in_batch=num_items, temperature=temperature, **kw)
    loss.backward()
    return float(loss.detach()), float(ent_sum / n), hs_t.grad.numpy(), ws_t.grad.numpy()


def _ours(hs, ht, ws, wt, mask, beta, temperature, chunk_size, den=None, **kw):
    def f(h, w):
        t = distillation_loss(h, w.T, jnp.asarray(ht), jnp.asarray(wt).T, jnp.asarray(mask), beta=beta,
                              temperature=temperature, chunk_size=chunk_size, **kw)
        return t.numerator / (t.denominator if den is None else den), t.metrics["entropy"]

    (loss, ent), (gh, gw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(hs), jnp.asarray(ws))
    return float(loss), float(ent), np.asarray(gh), np.asarray(gw)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_distillation_loss_equals_trl_chunked_divergence(beta, temperature, chunk_size):
    x = _inputs(int(beta * 10) + int(temperature * 3))
    l_trl, e_trl, gh_trl, gw_trl = _trl(*x, beta, temperature)
    l, e, gh, gw = _ours(*x, beta, temperature, chunk_size)
    np.testing.assert_allclose(l, l_trl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e, e_trl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gh, gh_trl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gw, gw_trl, rtol=1e-4, atol=1e-6)
    assert l > 0


def test_num_items_in_batch_bias_scale_and_softcap_equal_trl():
    """A global token count (gradient accumulation), LM-head biases, logit scale and final-logit softcapping."""
    hs, ht, ws, wt, mask = _inputs(7)
    r = np.random.default_rng(1)
    bs, bt = r.normal(size=V).astype(np.float32), r.normal(size=V).astype(np.float32)
    kw_trl = dict(student_lm_head_bias=torch.tensor(bs), teacher_lm_head_bias=torch.tensor(bt),
                  student_logit_scale=0.5, teacher_logit_scale=1.5, student_final_logit_softcapping=3.0,
                  teacher_final_logit_softcapping=5.0)
    kw = dict(student_lm_head_bias=jnp.asarray(bs), teacher_lm_head_bias=jnp.asarray(bt), student_logit_scale=0.5,
              teacher_logit_scale=1.5, student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=5.0)
    for beta in (0.0, 0.5, 1.0):
        l_trl, e_trl, gh_trl, gw_trl = _trl(hs, ht, ws, wt, mask, beta, 1.3, num_items=torch.tensor(23.0), **kw_trl)
        l, e, gh, gw = _ours(hs, ht, ws, wt, mask, beta, 1.3, 4, den=23.0, **kw)
        np.testing.assert_allclose(l, l_trl, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e, e_trl, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gh, gh_trl, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gw, gw_trl, rtol=1e-4, atol=1e-6)


def test_fully_masked_batch_is_zero_not_nan():
    hs, ht, ws, wt, mask = _inputs(3)
    t = distillation_loss(jnp.asarray(hs), jnp.asarray(ws).T, jnp.asarray(ht), jnp.asarray(wt).T,
                          jnp.zeros_like(jnp.asarray(mask)), beta=0.5)
    assert float(t.loss) == 0.0 and float(t.metrics["entropy"]) == 0.0 and float(t.denominator) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("reduction,with_labels,num_items", [
    ("batchmean", True, None), ("batchmean", False, None), ("sum", True, None), ("mean", True, None),
    ("mean", False, None), ("batchmean", True, 17.0)])
def test_generalized_jsd_loss_equals_gkd(beta, reduction, with_labels, num_items):
    r = np.random.default_rng(int(beta * 10))
    s = (r.normal(size=(B, K, V)) * 2).astype(np.float32)
    t = (r.normal(size=(B, K, V)) * 2).astype(np.float32)
    labels = np.where(r.random((B, K)) > 0.3, r.integers(0, V, (B, K)), -100)
    s_t = torch.tensor(s, requires_grad=True)
    ref = GKDTrainer.generalized_jsd_loss(s_t, torch.tensor(t), torch.tensor(labels) if with_labels else None,
                                          beta=beta, temperature=0.8, reduction=reduction,
                                          num_items_in_batch=num_items)
    ref.backward()
    ours, grad = jax.value_and_grad(lambda x: generalized_jsd_loss(
        x, jnp.asarray(t), jnp.asarray(labels) if with_labels else None, beta=beta, temperature=0.8,
        reduction=reduction, num_items_in_batch=num_items))(jnp.asarray(s))
    np.testing.assert_allclose(float(ours), float(ref.detach()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), s_t.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_divergence_limits():
    """beta=0 / 1 are the forward / reverse KL; identical distributions give 0; beta outside [0, 1] is refused."""
    r = np.random.default_rng(0)
    s, t = jnp.asarray(r.normal(size=(4, V))), jnp.asarray(r.normal(size=(4, V)))
    fwd, _ = per_token_divergence(s, t, beta=0.0)
    rev, _ = per_token_divergence(s, t, beta=1.0)
    fwd_swapped, _ = per_token_divergence(t, s, beta=1.0)
    np.testing.assert_allclose(fwd, fwd_swapped, rtol=1e-6)
    assert not np.allclose(fwd, rev)
    same, _ = per_token_divergence(s, s, beta=0.5)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="beta must be in"):
        per_token_divergence(s, t, beta=1.5)
