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

8-bit (``"int8"``, bitsandbytes' LLM.int8: ``Int8Params`` + ``MatMul8bitLt``) keeps the kernel's own layout:

    kernel_int8  int8 [*in, *out]    CB.T: round(W16 * 127 / SCB), W16 = the weight rounded to fp16
    kernel_scb   fp32 [*out]         SCB: max |W16| over each output feature's inputs

and :func:`int8_matmul` is bitsandbytes' forward: activations rounded to fp16, feature columns holding any
``|x| >= threshold`` (over every row of the call; in the model, over its real tokens: padding rows are left out,
see :func:`int8_token_rows`) taken out and multiplied in the input dtype against the dequantized weight, the rest
quantized row-wise to int8 (absmax per token), an int32 product, then
``acc * (row_absmax * SCB) * 6.200124e-05`` (bitsandbytes' constant) plus the bias. Its gradient is
bitsandbytes' straight-through one: ``dy @ dequant(W)`` for the input, the bias gets ``sum dy``, the weight none.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

QUANT_TYPES = ("nf4", "fp4")
INT8 = "int8"  # ModelConfig.quantization of an LLM.int8 base
LLM_INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig default
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


# ------------------------------------------------------------------------------------------ 8-bit (LLM.int8)
_INV127 = np.float32(7.874015718698502e-3)  # 1 / 127 as bitsandbytes writes it
_MM_DEQUANT = np.float32(6.200124e-05)  # bitsandbytes' int8_mm_dequant constant (~ 1 / 127**2)


def _rdiv127(stats):
    """``127.0 / stats`` as torch evaluates a Python number over a tensor: ``reciprocal(stats) * 127`` (two fp32
    roundings; a single division differs in the last bit, which moves codes sitting at .5)."""
    return (jnp.float32(1.0) / stats) * jnp.float32(127.0)


def quantize_int8_kernel(kernel, n_in: int):
    """``(kernel_int8 int8 [*in, *out], kernel_scb fp32 [*out])`` of ``kernel [*in, *out]``: bitsandbytes'
    ``Int8Params`` (the weight rounded to fp16, then ``int8_vectorwise_quant`` row-wise over ``W = K.T``)."""
    w16 = kernel.astype(jnp.float16)
    in_axes = tuple(range(n_in))
    scb = jnp.max(jnp.abs(w16), axis=in_axes).astype(jnp.float32)
    scaled = w16.astype(jnp.float32) * _rdiv127(scb)
    q = jnp.where(scb == 0, 0.0, jnp.round(scaled))  # an all-zero row: codes 0 (bitsandbytes: 0 * inf)
    return q.astype(jnp.int8), scb


def dequantize_int8_kernel(kernel_int8, kernel_scb, dtype=jnp.float32):
    """``(CB * SCB) / 127`` in fp32, cast to ``dtype``: bitsandbytes' ``int8_vectorwise_dequant`` (PEFT's
    ``dequantize_bnb_weight``: merging, DoRA norms)."""
    return (kernel_int8.astype(jnp.float32) * kernel_scb.astype(jnp.float32) * _INV127).astype(dtype)


def _int8_backward_kernel(kernel_int8, kernel_scb, dtype):
    """``CB * (SCB / 127)`` in ``dtype``: the weight bitsandbytes' ``MatMul8bitLt.backward`` multiplies by."""
    return (kernel_int8.astype(jnp.float32) * (kernel_scb.astype(jnp.float32) * _INV127)).astype(dtype)


_INT8_ROWS: contextvars.ContextVar = contextvars.ContextVar("trl_jax_int8_rows", default=None)


@contextlib.contextmanager
def int8_token_rows(rows):
    """Within the block, 8-bit projections whose input rows have the shape of ``rows`` (bool ``[B, T]``: the real
    tokens) take LLM.int8's outlier columns over those rows only. bitsandbytes takes them over every row of its
    call, padding included; trl_jax pads to other lengths than transformers (and its padding rows hold other
    values), so leaving padding out is what keeps a real token's output independent of the batch's padding and
    equal to bitsandbytes' on the same tokens unpadded (a packed, padding-free batch)."""
    token = _INT8_ROWS.set(rows)
    try:
        yield
    finally:
        _INT8_ROWS.reset(token)


def current_int8_rows():
    return _INT8_ROWS.get()


def _int8_forward(x, kernel_int8, kernel_scb, bias, rows, n_in, threshold):
    in_ax = tuple(range(x.ndim - n_in, x.ndim))
    k_ax = tuple(range(n_in))
    x16 = x.astype(jnp.float16)
    if threshold > 0:
        outlier = jnp.abs(x16) >= jnp.float16(threshold)
        counted = outlier if rows is None else outlier & rows.reshape(rows.shape + (1,) * n_in)
        cols = jnp.any(counted, axis=tuple(range(x.ndim - n_in)))  # [*in]: columns with an outlier in any row
        a = jnp.where(outlier, jnp.float16(0), x16)
    else:
        cols, a = None, x16
    row = jnp.max(jnp.abs(a), axis=in_ax, keepdims=True).astype(jnp.float32)
    ca = jnp.round(a.astype(jnp.float32) * _rdiv127(row))
    ca = jnp.where(row == 0, 0.0, ca)
    if cols is not None:
        ca = jnp.where(cols, 0.0, ca)
    dims = ((in_ax, k_ax), ((), ()))
    acc = jax.lax.dot_general(ca.astype(jnp.int8), kernel_int8, dims, preferred_element_type=jnp.int32)
    out_nd = kernel_scb.ndim
    row = row.reshape(row.shape[:x.ndim - n_in] + (1,) * out_nd)
    y = acc.astype(jnp.float32) * (row * kernel_scb.astype(jnp.float32)) * _MM_DEQUANT
    if bias is not None:
        y = y + bias.astype(x.dtype).astype(jnp.float32)
    y = y.astype(x.dtype)
    if cols is not None:  # the outlier columns in the input dtype against the dequantized weight columns
        sub_x = jnp.where(cols, x, jnp.zeros((), x.dtype))
        w = dequantize_int8_kernel(kernel_int8, kernel_scb, x.dtype)
        y = y + jax.lax.dot_general(sub_x, w, dims).astype(x.dtype)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _int8_matmul(x, kernel_int8, kernel_scb, bias, rows, n_in, threshold):
    return _int8_forward(x, kernel_int8, kernel_scb, bias, rows, n_in, threshold)


def _int8_fwd(x, kernel_int8, kernel_scb, bias, rows, n_in, threshold):
    return (_int8_forward(x, kernel_int8, kernel_scb, bias, rows, n_in, threshold),
            (x, kernel_int8, kernel_scb, bias, rows))


def _int8_bwd(n_in, threshold, res, g):
    x, kernel_int8, kernel_scb, bias, rows = res
    w = _int8_backward_kernel(kernel_int8, kernel_scb, x.dtype)
    out_nd = kernel_scb.ndim
    g_ax = tuple(range(g.ndim - out_nd, g.ndim))
    dx = jax.lax.dot_general(g.astype(x.dtype), w, ((g_ax, tuple(range(n_in, n_in + out_nd))), ((), ())))
    db = None if bias is None else jnp.sum(g, axis=tuple(range(g.ndim - out_nd))).astype(bias.dtype)
    return (dx.astype(x.dtype), np.zeros(kernel_int8.shape, jax.dtypes.float0),
            jnp.zeros_like(kernel_scb), db, None if rows is None else np.zeros(rows.shape, jax.dtypes.float0))


_int8_matmul.defvjp(_int8_fwd, _int8_bwd)


def int8_matmul(x, kernel_int8, kernel_scb, bias=None, *, n_in: int = 1, threshold: float = LLM_INT8_THRESHOLD,
                rows=None):
    """``x [..., *in] @ W (+ bias) -> [..., *out]`` in ``x``'s dtype, bitsandbytes' ``MatMul8bitLt`` on
    :func:`quantize_int8_kernel`'s arrays (see the module docstring); ``threshold <= 0``: no outlier columns;
    ``rows`` (bool ``x.shape[:-n_in]``): the rows whose outliers count (default all). The gradient reaches ``x``
    (through ``CB * SCB / 127``) and ``bias``; the stored weight gets none."""
    return _int8_matmul(x, kernel_int8, kernel_scb, bias, rows, int(n_in), float(threshold))


def quantize_params(params, quant_type: str = "nf4", blocksize: int = BLOCKSIZE, in_axes=None):
    """Every projection kernel of a decoder's params replaced, in place and one leaf at a time, by its 4-bit
    ``kernel_q`` / ``kernel_absmax`` (``quant_type="int8"``: ``kernel_int8`` / ``kernel_scb``) (``in_axes``: the
    number of input axes per projection name; layers stacked under ``layers`` keep their leading axis).
    Returns ``params`` (the same dict)."""
    n_in = in_axes or {p: (2 if p == "o_proj" else 1) for p in PROJECTIONS}

    def walk(node, name):
        if not isinstance(node, dict):
            return
        if name in PROJECTIONS and "kernel" in node:
            k = node.pop("kernel")
            stacked = k.ndim == 1 + n_in[name] + (2 if name in ("q_proj", "k_proj", "v_proj") else 1)
            if quant_type == INT8:
                f8 = lambda x: quantize_int8_kernel(x, n_in[name])  # noqa: E731
                node["kernel_int8"], node["kernel_scb"] = jax.jit(jax.vmap(f8) if stacked else f8)(k)
                del k
                return
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
    """``params`` of a 4-bit (or 8-bit) ``model`` with full kernels (``dtype``), shaped as the unquantized model's."""
    cfg = model.config
    in_shapes = {"o_proj": (cfg.num_attention_heads, cfg.head_dim),
                 "down_proj": (cfg.intermediate_size,),
                 **{p: (cfg.hidden_size,) for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}}

    def walk(node, name):
        if not isinstance(node, dict):
            return node
        if "kernel_int8" in node:
            out = {k: v for k, v in node.items() if k not in ("kernel_int8", "kernel_scb")}
            f8 = lambda q, s: dequantize_int8_kernel(q, s, dtype)  # noqa: E731
            stacked = _is_stacked(node["kernel_scb"][None], name)  # scb [*out] per layer, [L, *out] scanned
            out["kernel"] = (jax.vmap(f8) if stacked else f8)(node["kernel_int8"], node["kernel_scb"])
            return out
        if "kernel_q" in node:
            q, a = node["kernel_q"], node["kernel_absmax"]
            f = lambda qq, aa: dequantize_kernel(qq, aa, in_shapes[name], cfg.quantization, dtype)  # noqa: E731
            out = {k: v for k, v in node.items() if k not in ("kernel_q", "kernel_absmax")}
            out["kernel"] = jax.vmap(f)(q, a) if _is_stacked(q, name) else f(q, a)
            return out
        return {k: walk(v, k) for k, v in node.items()}

    return walk(params, None)


__all__ = ["BLOCKSIZE", "INT8", "LLM_INT8_THRESHOLD", "QUANT_TYPES", "code_values", "dequantize_int8_kernel",
           "dequantize_kernel", "dequantize_model_params", "int8_matmul", "int8_token_rows", "quantize_int8_kernel",
           "quantize_kernel", "quantize_params"]
