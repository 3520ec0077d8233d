"""4-bit weight storage for the frozen base of QLoRA (bitsandbytes' NF4 / FP4 blockwise formats, no torch).

bitsandbytes quantizes a linear weight ``W [out, in]`` row-major in blocks of ``blocksize`` (64) consecutive
input elements: ``absmax`` per block (fp32), each element ``x / absmax`` mapped to the nearest of 16 code values
(``bucketize`` against the midpoints), two 4-bit codes per byte (first element in the high nibble). trl_jax keeps
the same blocks and codes in its kernel layout: a kernel ``[*in, *out]`` viewed as ``K [IN, *out]`` (``W = K.T``)
is stored as

    kernel_q       uint8 [IN / 2, *out]           codes of K[2k] (high nibble) and K[2k + 1] (low nibble)
    kernel_absmax  fp32  [IN / blocksize, *out]

so the dequantized kernel equals bitsandbytes' ``dequantize_4bit`` of the same weight exactly, and both arrays
shard like the kernel (the first input axis's logical name on the ``IN`` axis, the output axes unchanged).
``IN`` must be a multiple of ``blocksize`` (true of every real model's hidden, head and MLP sizes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, normalised to [-1, 1] as bitsandbytes does
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def code_values(quant_type: str) -> np.ndarray:
    """The 16 code values (fp32) of ``nf4`` / ``fp4``, indexed by the 4-bit code."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"bnb_4bit_quant_type {quant_type!r}: choose one of {QUANT_TYPES}.")
    data = np.asarray(_NF4 if quant_type == "nf4" else _FP4, np.float32)
    return (data / np.abs(data).max()).astype(np.float32)


def _bounds(quant_type: str):
    code = code_values(quant_type)
    order = np.argsort(code, kind="stable")
    return (code[order[:-1]] + code[order[1:]]) / 2, order.astype(np.uint8)


def quantize_kernel(kernel, n_in: int, quant_type: str = "nf4", blocksize: int = BLOCKSIZE):
    """``(kernel_q uint8 [IN/2, *out], kernel_absmax fp32 [IN/blocksize, *out])`` of ``kernel [*in, *out]``
    (``n_in`` input axes), bitsandbytes' blockwise 4-bit quantization of ``W = K.T``."""
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    IN = int(np.prod(in_shape))
    if IN % blocksize or IN % 2:
        raise ValueError(f"4-bit quantization needs the input size ({IN}) to be a multiple of the block size "
                         f"{blocksize}; this layer cannot be stored in 4 bits.")
    bounds, order = _bounds(quant_type)
    k = kernel.astype(jnp.float32).reshape((IN // blocksize, blocksize) + out_shape)
    absmax = jnp.max(jnp.abs(k), axis=1)
    scaled = jnp.clip(k * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    q = jnp.searchsorted(jnp.asarray(bounds), scaled.reshape(-1), side="left").reshape((IN,) + out_shape)
    q = jnp.asarray(order)[q] if quant_type != "nf4" else q.astype(jnp.uint8)
    q = q.reshape((IN // 2, 2) + out_shape)
    packed = (q[:, 0] << 4) | q[:, 1]
    return packed.astype(jnp.uint8), absmax


def dequantize_kernel(kernel_q, kernel_absmax, in_shape: tuple, quant_type: str, dtype=jnp.float32):
    """``kernel [*in_shape, *out]`` in ``dtype`` from :func:`quantize_kernel`'s arrays (fp32 products, as
    bitsandbytes)."""
    half, out_shape = kernel_q.shape[0], kernel_q.shape[1:]
    codes = jnp.stack([kernel_q >> 4, kernel_q & 0xF], axis=1).reshape((2 * half,) + out_shape)
    values = jnp.asarray(code_values(quant_type))[codes.astype(jnp.int32)]
    nblocks = kernel_absmax.shape[0]
    w = values.reshape((nblocks, 2 * half // nblocks) + out_shape) * kernel_absmax.astype(jnp.float32)[:, None]
    return w.reshape(tuple(in_shape) + out_shape).astype(dtype)


def quantize_params(params, quant_type: str = "nf4", blocksize: int = BLOCKSIZE, in_axes=None):
    """Every projection kernel of a decoder's params replaced, in place and one leaf at a time, by its 4-bit
    ``kernel_q`` / ``kernel_absmax`` (``in_axes``: the number of input axes per projection name; layers stacked
    under ``layers`` keep their leading axis). Returns ``params`` (the same dict)."""
    n_in = in_axes or {p: (2 if p == "o_proj" else 1) for p in PROJECTIONS}

    def walk(node, name):
        if not isinstance(node, dict):
            return
        if name in PROJECTIONS and "kernel" in node:
            k = node.pop("kernel")
            stacked = k.ndim == 1 + n_in[name] + (2 if name in ("q_proj", "k_proj", "v_proj") else 1)
            f = jax.jit(lambda x: quantize_kernel(x, n_in[name], quant_type, blocksize))
            q, a = jax.vmap(lambda x: quantize_kernel(x, n_in[name], quant_type, blocksize))(k) if stacked else f(k)
            node["kernel_q"], node["kernel_absmax"] = q, a
            del k
            return
        for key, child in node.items():
            walk(child, key)

    walk(params, None)
    return params


def _is_stacked(q, name):
    """``q [IN/2, *out]`` per layer (q/k/v: two output axes; o_proj and the MLP: one); a leading ``[L]`` when the
    layers are scanned."""
    per_layer = 1 + (2 if name in ("q_proj", "k_proj", "v_proj") else 1)
    return q.ndim == per_layer + 1


def dequantize_model_params(model, params, dtype=jnp.float32):
    """``params`` of a 4-bit ``model`` with full kernels (``dtype``), shaped as the unquantized model's."""
    cfg = model.config
    in_shapes = {"o_proj": (cfg.num_attention_heads, cfg.head_dim),
                 "down_proj": (cfg.intermediate_size,),
                 **{p: (cfg.hidden_size,) for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}}

    def walk(node, name):
        if not isinstance(node, dict):
            return node
        if "kernel_q" in node:
            q, a = node["kernel_q"], node["kernel_absmax"]
            f = lambda qq, aa: dequantize_kernel(qq, aa, in_shapes[name], cfg.quantization, dtype)  # noqa: E731
            out = {k: v for k, v in node.items() if k not in ("kernel_q", "kernel_absmax")}
            out["kernel"] = jax.vmap(f)(q, a) if _is_stacked(q, name) else f(q, a)
            return out
        return {k: walk(v, k) for k, v in node.items()}

    return walk(params, None)


__all__ = ["BLOCKSIZE", "QUANT_TYPES", "code_values", "dequantize_kernel", "dequantize_model_params",
           "quantize_kernel", "quantize_params"]
