"""Attention kernels: the Pallas splash kernel (run in Pallas' interpreter on CPU) against the XLA reference.

Outputs and gradients of ``splash_attention`` equal ``xla_attention`` under ``build_mask`` on padded (left and
right), packed and GQA/MQA batches, with a sliding window, under an 8-device mesh with ``activation_sharding``, and
through the model (``attention_impl="splash"`` vs ``"xla"``). Dispatch: ``auto`` is XLA on CPU; calls the kernel
cannot take (cached attention, per-layer windows) fall back to XLA with a log line.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trl_jax.models import attention as A
from trl_jax.models.config import ModelConfig
from trl_jax.models.model import CausalLM
from trl_jax.parallel import activation_sharding, make_mesh


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setattr(A, "SPLASH_INTERPRET", True)


def _segments(b: int, t: int) -> np.ndarray:
    """Row 0 left-padded, row 1 packed (3 documents) + right padding, rows 2.. right-padded / full."""
    seg = np.ones((b, t), np.int32)
    seg[0, : t // 5] = 0
    if b > 1:
        seg[1, t // 3:] = 2
        seg[1, t // 2:] = 3
        seg[1, t - 7:] = 0
    for r in range(2, b):
        seg[r, t - 3 * r:] = 0
    return seg


def _qkv(b, t, n, k, h, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))


def _mask(seg, window=None):
    t = seg.shape[1]
    slots = jnp.arange(t, dtype=jnp.int32)
    mask = A.build_mask(slots, slots, jnp.asarray(seg), jnp.asarray(seg))
    return mask if window is None else mask & A.window_mask(slots, slots, window)


def _loss_and_grads(fn, q, k, v):
    """A loss that weighs every output element differently, and its gradients w.r.t. q, k, v."""
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape) * 0.37)
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "b,t,n,k,window",
    [
        (2, 128, 4, 2, None),  # GQA, one 128 block
        (2, 200, 2, 1, 37),  # MQA, T padded to 256 (one 256 block), sliding window
        (2, 256, 2, 2, None),  # MHA, one 256 block
    ],
    ids=["gqa-128", "mqa-window-200", "mha-256"],
)
def test_splash_equals_xla_outputs_and_grads(b, t, n, k, window):
    h = 16
    q, kk, v = _qkv(b, t, n, k, h)
    seg = _segments(b, t)
    scale = h**-0.5
    mask = _mask(seg, window)
    ref = jax.jit(lambda q, k, v: A.xla_attention(q, k, v, mask, scale=scale))
    got = jax.jit(lambda q, k, v: A.splash_attention(q, k, v, jnp.asarray(seg), scale=scale, window=window))
    _close(got(q, kk, v), ref(q, kk, v))
    (lr, gr), (lg, gg) = _loss_and_grads(ref, q, kk, v), _loss_and_grads(got, q, kk, v)
    _close(lg, lr, 1e-4)
    for a, r in zip(gg, gr):
        _close(a, r, 5e-5)


def test_splash_multi_block_causal_and_segments():
    """T = 384: three 128 blocks, so off-diagonal blocks (fully visible, partly masked, skipped) all occur."""
    b, t, n, k, h = 1, 384, 2, 1, 8
    q, kk, v = _qkv(b, t, n, k, h, seed=3)
    seg = np.ones((b, t), np.int32)
    seg[0, 150:] = 2
    seg[0, 300:] = 3
    seg[0, 380:] = 0
    mask = _mask(seg)
    out = jax.jit(lambda q, k, v: A.splash_attention(q, k, v, jnp.asarray(seg), scale=0.3))(q, kk, v)
    _close(out, A.xla_attention(q, kk, v, mask, scale=0.3))


def test_splash_bf16_close_to_xla():
    b, t, n, k, h = 2, 128, 4, 2, 16
    q, kk, v = (x.astype(jnp.bfloat16) for x in _qkv(b, t, n, k, h))
    seg = _segments(b, t)
    out = A.splash_attention(q, kk, v, jnp.asarray(seg), scale=h**-0.5)
    assert out.dtype == jnp.bfloat16
    ref = A.xla_attention(q, kk, v, _mask(seg), scale=h**-0.5)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=["2x2x2", "1x2x4"])
def test_splash_under_mesh_is_per_device(shape):
    """Under ``activation_sharding`` the kernel runs in ``shard_map`` (batch over data+fsdp, heads over tensor where
    both head counts divide): same outputs and gradients as XLA attention, and no cross-device collective
    inside attention's forward."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    b, t, n, k, h = 4, 128, 4, 4 if shape[2] == 4 else 2, 8
    q, kk, v = _qkv(b, t, n, k, h, seed=5)
    seg = jnp.asarray(_segments(b, t))
    mask = _mask(np.asarray(seg))
    mesh = make_mesh(shape)

    def sharded(q, k, v):
        with activation_sharding(mesh):
            return A.splash_attention(q, k, v, seg, scale=h**-0.5)

    ref_fn = lambda q, k, v: A.xla_attention(q, k, v, mask, scale=h**-0.5)  # noqa: E731
    _close(jax.jit(sharded)(q, kk, v), ref_fn(q, kk, v))
    (lr, gr), (lg, gg) = _loss_and_grads(ref_fn, q, kk, v), jax.jit(lambda *a: _loss_and_grads(sharded, *a))(q, kk, v)
    _close(lg, lr, 1e-4)
    for a, r in zip(gg, gr):
        _close(a, r, 5e-5)
    hlo = jax.jit(sharded).lower(q, kk, v).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo and "all-to-all" not in hlo


def _tiny(impl, **kw):
    base = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, attention_impl=impl)
    return CausalLM(ModelConfig(**{**base, **kw}))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_model_with_splash_equals_xla(scan):
    """``attention_impl="splash"`` through the decoder: padded and packed rows (T not a multiple of 128) give the
    XLA model's hidden states and parameter gradients."""
    xla, splash = _tiny("xla", scan_layers=scan), _tiny("splash", scan_layers=scan)
    params = xla.init_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, size=(3, 20)), jnp.int32)
    seg = np.ones((3, 20), np.int32)
    seg[0, :6] = 0  # left padding
    seg[1, 8:] = 2  # packed
    seg[1, 15:] = 0
    pos = jnp.asarray(np.concatenate([np.maximum(np.arange(20) - 6, 0)[None], np.arange(20)[None] % 8,
                                      np.arange(20)[None]]), jnp.int32)
    seg = jnp.asarray(seg)
    live = (seg != 0)[..., None]

    def loss(model):
        return lambda p: jnp.sum(jnp.where(live, jnp.sin(model.hidden_states(p, ids, pos, seg)), 0.0))

    _close(jnp.where(live, splash.hidden_states(params, ids, pos, seg), 0),
           jnp.where(live, xla.hidden_states(params, ids, pos, seg), 0), 1e-4)
    gx, gs = jax.jit(jax.grad(loss(xla)))(params), jax.jit(jax.grad(loss(splash)))(params)
    for a, r in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
        _close(a, r, 1e-4)


def test_model_uniform_sliding_window_uses_splash(monkeypatch):
    """A window on every layer (Mistral) is static, so splash takes it (a local mask); the result is XLA's."""
    calls = []
    real = A.splash_attention
    monkeypatch.setattr(A, "splash_attention", lambda *a, **kw: calls.append(kw["window"]) or real(*a, **kw))
    xla, splash = (_tiny(i, model_type="mistral", qk_norm=False, sliding_windows=(5, 5)) for i in ("xla", "splash"))
    params = xla.init_params(jax.random.PRNGKey(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 64, size=(2, 16)), jnp.int32)
    _close(splash.hidden_states(params, ids), xla.hidden_states(params, ids), 1e-4)
    assert calls and set(calls) == {5}


def test_dispatch_and_fallbacks(caplog, monkeypatch):
    q, k, v = _qkv(1, 16, 2, 1, 8)
    seg = jnp.ones((1, 16), jnp.int32)
    mask = _mask(np.asarray(seg))
    ref = A.xla_attention(q, k, v, mask, scale=0.5)
    calls = []
    real = A.splash_attention
    monkeypatch.setattr(A, "splash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(A, "_FALLBACKS", set())
    # auto on CPU: XLA (splash is for TPU)
    _close(A.attend(q, k, v, mask, scale=0.5, impl="auto", segment_ids=seg), ref)
    assert not calls
    # explicit splash: the kernel
    _close(A.attend(q, k, v, mask, scale=0.5, impl="splash", segment_ids=seg), ref)
    assert calls == [1]
    with caplog.at_level(logging.INFO, logger="trl_jax"):
        # per-layer windows (traced): XLA + a warning, logged once
        for _ in range(2):
            _close(A.attend(q, k, v, mask, scale=0.5, impl="splash", segment_ids=seg, window=A.TRACED_WINDOW), ref)
        # cached attention (no segment ids): XLA, said at INFO
        _close(A.attend(q, k, v, mask, scale=0.5, impl="splash"), ref)
    assert calls == [1]
    warned = [r for r in caplog.records if "splash attention cannot run" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING, logging.INFO]
    assert "differ between layers" in warned[0].getMessage()
    assert A.static_window(None) is None and A.static_window((None, None)) is None
    assert A.static_window((7, 7)) == 7 and A.static_window((7, None)) == A.TRACED_WINDOW


def test_splash_decode_path_runs_xla():
    """Generation's cached path with ``attention_impl="splash"`` (no segment ids): XLA, same logits."""
    xla, splash = _tiny("xla"), _tiny("splash")
    params = xla.init_params(jax.random.PRNGKey(2))
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 64, size=(2, 6)), jnp.int32)
    outs = []
    for m in (xla, splash):
        cache = m.init_cache(2, 8)
        logits, cache = m.prefill(params, cache, ids)
        step, _ = m.decode_step(params, cache, jnp.argmax(logits, -1).astype(jnp.int32), jnp.full((2,), 6))
        outs.append((logits, step))
    for a, r in zip(outs[1], outs[0]):
        _close(a, r, 1e-5)
