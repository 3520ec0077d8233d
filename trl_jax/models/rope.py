"""Rotary position embeddings as transformers 5 computes them (``modeling_rope_utils``).

Supported ``rope_type``: ``default``, ``linear``, ``llama3`` (static inverse frequencies), ``dynamic`` (NTK:
the base grows with ``max(positions) + 1`` once that exceeds ``max_position_embeddings``, computed per call) and
``longrope`` (Phi-3: the short or the long factors, by whether ``max(positions) + 1`` exceeds
``original_max_position_embeddings``, per call as transformers' ``longrope_frequency_update``; cos/sin times the
attention factor). Gemma 3 gives its sliding-window layers a second, default table (``rope_local_theta``):
:func:`rope_cos_sin` then stacks both and :func:`layer_cos_sin` picks one per layer.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from trl_jax.models.config import ModelConfig


def _rotary_dim(cfg: ModelConfig) -> int:
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _longrope_inv_freq(cfg: ModelConfig, factors) -> np.ndarray:
    """transformers' ``_compute_longrope_parameters``: ``1 / (factor_i * theta ** (2i / dim))`` fp32."""
    dim = _rotary_dim(cfg)
    base = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    return (1.0 / (np.asarray(factors, np.float32) * base)).astype(np.float32)


def static_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` fp32 for the non-dynamic rope types (longrope: short factors)."""
    dim = _rotary_dim(cfg)
    if cfg.rope_type == "longrope":
        return _longrope_inv_freq(cfg, cfg.rope_short_factor)
    inv = _default_inv_freq(cfg.rope_theta, dim)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        factor = cfg.rope_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position_embeddings
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv


def inv_freq(cfg: ModelConfig, positions: jnp.ndarray) -> jnp.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` fp32; for ``dynamic`` and ``longrope`` they depend on
    ``max(positions) + 1``."""
    if cfg.rope_type == "longrope":
        long = jnp.max(positions) + 1 > cfg.rope_original_max_position_embeddings
        return jnp.where(long, _longrope_inv_freq(cfg, cfg.rope_long_factor), _longrope_inv_freq(cfg, cfg.rope_short_factor))
    if cfg.rope_type != "dynamic":
        return jnp.asarray(static_inv_freq(cfg))
    dim = _rotary_dim(cfg)
    seq_len = jnp.maximum(jnp.max(positions) + 1, cfg.max_position_embeddings).astype(jnp.float32)
    f = cfg.rope_factor
    base = cfg.rope_theta * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _cos_sin(positions, inv, scaling: float, dtype):
    freqs = positions[..., None].astype(jnp.float32) * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.astype(dtype), sin.astype(dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``cos, sin`` of shape ``[B, T, rotary_dim]`` in ``dtype`` (computed in fp32, then cast, like transformers);
    ``[2, B, T, rotary_dim]`` (global, local) for models with a sliding-layer table (``rope_local_theta``)."""
    scaling = cfg.rope_attention_factor if cfg.rope_type == "longrope" else 1.0
    cos, sin = _cos_sin(positions, inv_freq(cfg, positions), scaling, dtype)
    if cfg.rope_local_theta is None:
        return cos, sin
    lcos, lsin = _cos_sin(positions, jnp.asarray(_default_inv_freq(cfg.rope_local_theta, _rotary_dim(cfg))), 1.0,
                          dtype)
    return jnp.stack([cos, lcos]), jnp.stack([sin, lsin])


def layer_cos_sin(cos, sin, window, no_window: int):
    """The table of one layer: ``cos/sin`` as :func:`rope_cos_sin` returns them, ``window`` the layer's sliding
    window (``None``, an int or a traced scalar; ``no_window`` = full attention). Stacked tables: the local one for
    sliding-window layers, the global one otherwise; a single table is every layer's."""
    if cos.ndim == 3:
        return cos, sin
    if window is None:
        return cos[0], sin[0]
    local = (jnp.asarray(window) < no_window).astype(jnp.int32)
    return cos[local], sin[local]


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x [B, T, heads, head_dim]`` (rotate-half convention) by ``cos/sin [B, T, rotary_dim]``."""
    rd = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = xr * c + rotated * s
    return out if rd == x.shape[-1] else jnp.concatenate([out, xp], axis=-1)
