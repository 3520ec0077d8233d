"""Rotary position embeddings as transformers 5 computes them (``modeling_rope_utils``).

Supported ``rope_type``: ``default``, ``linear``, ``llama3`` (static inverse frequencies) and ``dynamic`` (NTK:
the base grows with ``max(positions) + 1`` once that exceeds ``max_position_embeddings``, computed per call).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from trl_jax.models.config import ModelConfig


def _rotary_dim(cfg: ModelConfig) -> int:
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def static_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` fp32 for the non-dynamic rope types."""
    dim = _rotary_dim(cfg)
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
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
    """Inverse frequencies ``[rotary_dim // 2]`` fp32; for ``dynamic`` they depend on ``max(positions) + 1``."""
    if cfg.rope_type != "dynamic":
        return jnp.asarray(static_inv_freq(cfg))
    dim = _rotary_dim(cfg)
    seq_len = jnp.maximum(jnp.max(positions) + 1, cfg.max_position_embeddings).astype(jnp.float32)
    f = cfg.rope_factor
    base = cfg.rope_theta * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``cos, sin`` of shape ``[B, T, rotary_dim]`` in ``dtype`` (computed in fp32, then cast, like transformers)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq(cfg, positions)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x [B, T, heads, head_dim]`` (rotate-half convention) by ``cos/sin [B, T, rotary_dim]``."""
    rd = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = xr * c + rotated * s
    return out if rd == x.shape[-1] else jnp.concatenate([out, xp], axis=-1)
