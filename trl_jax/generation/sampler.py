"""A jitted KV-cache sampler: one prefill over a preallocated cache, then a ``lax.while_loop`` of decode steps.

Works with any model that follows trl_jax's cache protocol (:class:`trl_jax.models.CausalLM`)::

    cache = model.init_cache(batch, max_len, dtype)
    logits [B, V], cache = model.prefill(params, cache, input_ids [B, P], positions [B, P], attention_mask [B, P])
    logits [B, V], cache = model.decode_step(params, cache, tokens [B], positions [B])

Shapes are static: the whole call compiles once per ``(B, P, max_new_tokens)`` bucket and sampling options, and
the loop exits as soon as every row has produced an EOS token.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from trl_jax.train.precision import cast_floating
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trl_jax.generation.processors import process_logits, seen_tokens


class GenerationOutput(NamedTuple):
    """What :func:`generate` returns (a pytree; every array is batch-major).

    * ``completion_ids [B, N]`` int32 -- sampled tokens; ``pad_token_id`` after the first EOS (and in the unused
      tail when the loop stopped early).
    * ``completion_mask [B, N]`` int32 -- 1 up to and including the first EOS, 0 after (TRL's rule); all ones for a
      row that never produced EOS.
    * ``completion_lengths [B]`` int32 -- ``completion_mask.sum(-1)``.
    * ``is_truncated [B]`` bool -- no EOS within the ``N`` new tokens.
    * ``logprobs [B, N]`` fp32 or ``None`` -- log-probability of each sampled token under the *processed*
      distribution it was drawn from (after repetition penalty, temperature, top-k, top-p, min-p); 0 where the mask
      is 0.
    * ``num_steps`` int32 scalar -- how many tokens the loop produced per row before it stopped (``<= N``).
    """

    completion_ids: jnp.ndarray
    completion_mask: jnp.ndarray
    completion_lengths: jnp.ndarray
    is_truncated: jnp.ndarray
    logprobs: jnp.ndarray | None
    num_steps: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static (hashable) generation options; field names follow ``transformers.GenerationConfig``."""

    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    return_logprobs: bool = True
    cache_dtype: Any = None
    num_generations: int = 1
    group_layout: str = "consecutive"
    decode_block_size: int = 128

    def __post_init__(self):
        if not isinstance(self.num_generations, (int, np.integer)) or self.num_generations < 1:
            raise ValueError(f"num_generations must be a positive int, got {self.num_generations!r}.")
        if self.group_layout not in ("consecutive", "tiled"):
            raise ValueError(f"group_layout must be 'consecutive' or 'tiled', got {self.group_layout!r}.")
        if not isinstance(self.decode_block_size, (int, np.integer)) or self.decode_block_size < 1:
            raise ValueError(f"decode_block_size must be a positive int, got {self.decode_block_size!r}.")
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature!r}; for greedy decoding pass "
                "do_sample=False."
            )
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int (0 or None disables it), got {self.top_k!r}.")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (1.0 or None disables it), got {self.top_p!r}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (None disables it), got {self.min_p!r}.")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1.0 or None disables it), got {self.repetition_penalty!r}."
            )

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    def process(self, logits, seen=None):
        """transformers' processor chain for these options: ``logits [B, V]`` -> fp32 ``[B, V]``."""
        return process_logits(
            logits,
            do_sample=self.do_sample,
            temperature_value=self.temperature,
            top_k_value=self.top_k,
            top_p_value=self.top_p,
            min_p_value=self.min_p,
            repetition_penalty_value=self.repetition_penalty,
            seen=seen,
        )


def _eos_tuple(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def completion_mask_from_ids(completion_ids: jnp.ndarray, eos_token_ids: int | Sequence[int]) -> jnp.ndarray:
    """TRL's completion mask: ``[B, N]`` int32, 1 up to and including the first EOS of each row (all ones if none)."""
    eos = jnp.asarray(_eos_tuple(eos_token_ids), dtype=completion_ids.dtype)
    is_eos = jnp.isin(completion_ids, eos)
    n = completion_ids.shape[1]
    first = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), n)
    return (jnp.arange(n)[None, :] <= first[:, None]).astype(jnp.int32)


def _is_finished(tokens, eos: tuple[int, ...]):
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, tokens.dtype))


# ------------------------------------------------------------------------------------------------- decode layout
DECODE_LAYOUTS = ("auto", "replicated", "tensor")
#: ``layout="auto"`` replicates the compute-dtype weights when they take at most this fraction of a device's memory.
REPLICATE_FRACTION = 0.3


def _is_fast_model(model) -> bool:
    from trl_jax.models.model import CausalLM

    return isinstance(model, CausalLM)


def _compute_dtype(model, dtype):
    if dtype is not None:
        return jnp.dtype(dtype)
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "dtype", None)
    return jnp.dtype(d) if d is not None else None


def _tp_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes a ``tensor`` decode layout splits the weights over: every axis but ``data``."""
    return tuple(a for a in mesh.axis_names if a != "data" and mesh.shape[a] > 1)


def resolve_decode_layout(model, params, mesh: Mesh | None, layout: str = "auto", dtype=None) -> str:
    """``"replicated"`` or ``"tensor"`` (``layout="auto"``: replicated when the compute-dtype weights take at most
    :data:`REPLICATE_FRACTION` of one device's memory, or the device does not report its memory, e.g. CPU)."""
    if layout not in DECODE_LAYOUTS:
        raise ValueError(f"decode layout {layout!r} is unknown; choose one of {DECODE_LAYOUTS}.")
    if layout != "auto":
        return layout
    if mesh is None or mesh.size == 1 or not _tp_axes(mesh):
        return "replicated"
    dt = _compute_dtype(model, dtype)
    nbytes = sum(int(np.prod(x.shape)) * (dt.itemsize if dt is not None and jnp.issubdtype(x.dtype, jnp.floating)
                                          else jnp.dtype(x.dtype).itemsize) for x in jax.tree.leaves(params))
    try:
        stats = mesh.devices.flat[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = {}
    limit = stats.get("bytes_limit")
    return "replicated" if not limit or nbytes <= REPLICATE_FRACTION * limit else "tensor"


def decode_param_shardings(model, params, mesh: Mesh, layout: str):
    """``NamedSharding`` tree of the decode layout: everything replicated, or (``"tensor"``) Megatron-style
    tensor parallelism over every mesh axis but ``data`` (heads, KV heads, MLP and vocabulary dimensions split
    where they divide; the model dimension never split, so no weight is gathered while decoding)."""
    if layout == "replicated":
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    if layout != "tensor":
        raise ValueError(f"decode layout {layout!r} is unknown; choose 'replicated' or 'tensor'.")
    if not hasattr(model, "logical_axes"):
        raise ValueError("decode layout 'tensor' needs a model with logical_axes() (trl_jax.models.CausalLM); use "
                         "'replicated'.")
    from trl_jax.models.sharding import spec_for

    tp = _tp_axes(mesh)
    rules = tuple((n, tp or None) for n in ("vocab", "heads", "kv_heads", "mlp"))
    logical = model.logical_axes()
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, spec_for(spec, x.shape, mesh, rules)), logical, params,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


_PREPARE_CACHE: dict = {}


def prepare_decode_params(model, params, *, mesh: Mesh | None = None, layout: str = "auto", dtype=None):
    """The policy in its decode layout: floating leaves cast to the compute dtype (``dtype``, default the model's
    ``config.dtype``) and resharded for decoding (see :func:`decode_param_shardings`). One jitted cast+reshard per
    call (call it once per generation batch); the result feeds :func:`generate` so the decode loop runs without any
    collective on weights. Without a mesh only the cast happens."""
    dt = _compute_dtype(model, dtype)
    resolved = None if mesh is None else resolve_decode_layout(model, params, mesh, layout, dt)
    leaves, treedef = jax.tree.flatten(params)
    key = (id(model), mesh, resolved, None if dt is None else dt.name, treedef,
           tuple((x.shape, jnp.dtype(x.dtype).name) for x in leaves))
    fn = _PREPARE_CACHE.get(key)
    if fn is None:
        def cast(p):
            if dt is None:
                return p
            return cast_floating(p, dt)  # quantization scales (kernel_absmax, kernel_scb) stay fp32

        shardings = None if mesh is None else decode_param_shardings(model, params, mesh, resolved)
        fn = jax.jit(cast, out_shardings=shardings)
        if len(_PREPARE_CACHE) > 32:
            _PREPARE_CACHE.clear()
        _PREPARE_CACHE[key] = fn
    return fn(params)


def _decode_batch_axes(mesh: Mesh, layout: str | None, batch: int):
    """Mesh axes the decode batch is split over: all axes free of weights (``replicated``: every axis; ``tensor``:
    ``data``; no decode layout: the training batch axes), trimmed until they divide ``batch``."""
    from trl_jax.parallel import batch_axes

    if layout == "replicated":
        axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    elif layout == "tensor":
        axes = tuple(a for a in mesh.axis_names if a not in _tp_axes(mesh) and mesh.shape[a] > 1)
    else:
        axes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    while axes and batch % int(np.prod([mesh.shape[a] for a in axes])):
        axes = axes[:-1]
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _cache_shardings(cache, mesh: Mesh, b, layout):
    """Batch axis of the cache over the decode batch axes ``b``; KV heads over the tensor-parallel axes."""
    heads = _tp_axes(mesh) if layout == "tensor" else ("tensor",) if layout is None and "tensor" in mesh.axis_names \
        else ()

    def one(x):
        if x.ndim == 5:  # [L, B, S, K, Hd]
            t = heads if heads and x.shape[3] % int(np.prod([mesh.shape[a] for a in heads])) == 0 else None
            t = t[0] if t and len(t) == 1 else t
            return NamedSharding(mesh, PartitionSpec(None, b, None, t, None))
        if x.ndim == 2:  # [B, S]
            return NamedSharding(mesh, PartitionSpec(b, None))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, cache)


# ------------------------------------------------------------------------------------------------- step functions
def make_decode_fns(model):
    """Jitted ``(prefill, decode_step)`` over :func:`trl_jax.models.decoder.init_decode_cache` caches, the cache
    donated (its k/v buffers are updated in place, one token per layer), for callers that drive their own loop::

        cache = init_decode_cache(model.config, B, P + N - 1)
        logits [B, V], cache = prefill(params, cache, prompt_ids [B, P], prompt_mask [B, P])
        logits [B, V], cache = decode_step(params, cache, tokens [B], positions [B])

    Attention covers the cache's slots, so allocate it to the length needed (or grow it, as :func:`generate` does).
    """
    if not _is_fast_model(model):
        raise ValueError("make_decode_fns needs a trl_jax.models.CausalLM; other models: model.prefill/decode_step.")
    from trl_jax.models.decoder import decode_forward

    mc = model.config

    def prefill(params, cache, prompt_ids, prompt_mask):
        mask = prompt_mask.astype(jnp.int32)
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        h, cache = decode_forward(mc, params, cache, prompt_ids.astype(jnp.int32), pos, mask)
        return model.logits_from_hidden(params, h[:, -1]), cache

    def decode_step(params, cache, tokens, positions):
        B = tokens.shape[0]
        h, cache = decode_forward(mc, params, cache, tokens[:, None].astype(jnp.int32),
                                  positions[:, None].astype(jnp.int32), jnp.ones((B, 1), jnp.int32))
        return model.logits_from_hidden(params, h[:, 0]), cache

    return jax.jit(prefill, donate_argnums=(1,)), jax.jit(decode_step, donate_argnums=(1,))


# ------------------------------------------------------------------------------------------------- decode segments
def decode_segments(max_new_tokens: int, block: int) -> tuple[tuple[int, int], ...]:
    """The decode loop's segments ``(start, end)`` over steps ``t`` (step ``t`` feeds token ``t - 1`` and samples
    token ``t``; ``t = 0`` is sampled from the prefill): the first ends at ``block``, each next one at twice the
    previous end, the last at ``max_new_tokens``. Segment ``[start, end)`` runs over a cache of ``P + end - 1``
    slots, so attention reads at most twice the tokens generated so far (plus the prompt), never the whole budget;
    one compiled loop body per segment (``log2(N / block) + 1`` of them)."""
    N = int(max_new_tokens)
    if N <= 1:
        return ()
    ends, e = [], min(int(block), N)
    while True:
        ends.append(e)
        if e >= N:
            break
        e = min(2 * e, N)
    starts = [1] + ends[:-1]
    return tuple((s, e) for s, e in zip(starts, ends) if e > s)


def _grow(cache, size: int):
    """Pad ``k, v [L, B, S, K, Hd]`` and ``segment_ids [B, S]`` with empty slots up to ``size`` (one copy)."""
    S = cache["segment_ids"].shape[1]
    if size <= S:
        return cache
    pad5 = ((0, 0), (0, 0), (0, size - S), (0, 0), (0, 0))
    return {"k": jnp.pad(cache["k"], pad5), "v": jnp.pad(cache["v"], pad5),
            "segment_ids": jnp.pad(cache["segment_ids"], ((0, 0), (0, size - S))), "index": cache["index"]}


def _prompt_rows(B: int, G: int, group_layout: str):
    """``(unique-row selector, row -> unique-prompt index)`` for ``B`` rows made of ``B / G`` prompts x ``G``."""
    U = B // G
    if group_layout == "consecutive":  # p0 p0 p1 p1 (TRL's RepeatSampler)
        return np.arange(U) * G, np.arange(B) // G
    return np.arange(U), np.arange(B) % U  # tiled: p0 p1 p0 p1 (online DPO's two halves)


def _generate_impl(model, cfg: SamplingConfig, mesh: Mesh | None, layout, params, prompt_ids, prompt_mask, rng):
    B, P = prompt_ids.shape
    N = cfg.max_new_tokens
    eos = cfg.eos_token_ids
    pad = jnp.int32(cfg.pad_token_id)
    prompt_ids = prompt_ids.astype(jnp.int32)
    mask = prompt_mask.astype(jnp.int32)
    b = None if mesh is None else _decode_batch_axes(mesh, layout, B)

    def constrain(x, spec):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def constrain_cache(cache, rows):
        if mesh is None:
            return cache
        bb = _decode_batch_axes(mesh, layout, rows)
        return jax.lax.with_sharding_constraint(cache, _cache_shardings(cache, mesh, bb, layout))

    prompt_ids, mask = constrain(prompt_ids, PartitionSpec(b, None)), constrain(mask, PartitionSpec(b, None))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    next_position = jnp.sum(mask, axis=1).astype(jnp.int32)  # position of the first generated token
    segments = decode_segments(N, cfg.decode_block_size)
    fast = _is_fast_model(model)
    cache_dtype = cfg.cache_dtype

    if fast:  # in-place per-layer KV cache, growing by segments, prefix shared within groups
        from trl_jax.models.decoder import decode_forward, init_decode_cache

        mc = model.config
        G = cfg.num_generations
        U = B // G
        u_ids, u_mask, u_pos = prompt_ids, mask, positions
        if G > 1:
            sel, row_of = _prompt_rows(B, G, cfg.group_layout)
            u_ids, u_mask, u_pos = prompt_ids[sel], mask[sel], positions[sel]
        cache = constrain_cache(init_decode_cache(mc, U, P, cache_dtype), U)
        h, cache = decode_forward(mc, params, cache, u_ids, u_pos, u_mask)
        logits = model.logits_from_hidden(params, h[:, -1])
        if G > 1:  # broadcast each prompt's cache and next-token logits to its G completions
            logits = logits[row_of]
            cache = {"k": jnp.take(cache["k"], row_of, axis=1), "v": jnp.take(cache["v"], row_of, axis=1),
                     "segment_ids": mask, "index": cache["index"]}
        cache = constrain_cache(_grow(cache, P + segments[0][1] - 1) if segments else cache, B)

        def step(cache, tok, pos):
            h, cache = decode_forward(mc, params, cache, tok[:, None], pos[:, None].astype(jnp.int32),
                                      jnp.ones((B, 1), jnp.int32))
            return model.logits_from_hidden(params, h[:, 0]), cache
    else:  # any model with the cache protocol: one full-size cache, every row prefilled
        # The last sampled token is never fed back, so P + N - 1 slots suffice.
        cache = model.init_cache(B, P + N - 1, cache_dtype) if cache_dtype else model.init_cache(B, P + N - 1)
        if mesh is not None:
            cache = jax.lax.with_sharding_constraint(cache, _cache_shardings(cache, mesh, b, layout))
        logits, cache = model.prefill(params, cache, prompt_ids, positions, mask)
        segments = ((1, N),) if N > 1 else ()

        def step(cache, tok, pos):
            return model.decode_step(params, cache, tok, pos)

    V = logits.shape[-1]
    seen = None
    if cfg.uses_repetition_penalty:  # presence of each token in the row: unpadded prompt tokens, then samples
        seen = seen_tokens(prompt_ids, mask, V)

    def sample(logits, t, alive, seen):
        processed = cfg.process(logits, seen)
        if cfg.do_sample:
            tok = jax.random.categorical(jax.random.fold_in(rng, t), processed, axis=-1).astype(jnp.int32)
        else:
            tok = jnp.argmax(processed, axis=-1).astype(jnp.int32)
        tok = jnp.where(alive, tok, pad)
        lp = None
        if cfg.return_logprobs:
            lp = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), tok[:, None], axis=-1)[:, 0]
            lp = jnp.where(alive, lp, 0.0)
        if seen is not None:
            seen = seen.at[jnp.arange(B), tok].set(True)
        return tok, lp, seen

    ids = constrain(jnp.full((B, N), pad, jnp.int32), PartitionSpec(b, None))
    cmask = jnp.zeros((B, N), jnp.int32)
    lps = jnp.zeros((B, N), jnp.float32) if cfg.return_logprobs else None

    def record(t, tok, lp, alive, ids, cmask, lps):
        ids = ids.at[:, t].set(tok)
        cmask = cmask.at[:, t].set(alive.astype(jnp.int32))
        if lps is not None:
            lps = lps.at[:, t].set(lp)
        return ids, cmask, lps, alive & ~_is_finished(tok, eos)

    alive = jnp.ones((B,), bool)
    tok, lp, seen = sample(logits, 0, alive, seen)
    ids, cmask, lps, alive = record(0, tok, lp, alive, ids, cmask, lps)

    def body(state):
        t, tok, cache, alive, ids, cmask, lps, seen = state
        logits, cache = step(cache, tok, next_position + t - 1)
        tok, lp, seen = sample(logits, t, alive, seen)
        ids, cmask, lps, alive = record(t, tok, lp, alive, ids, cmask, lps)
        return t + 1, tok, cache, alive, ids, cmask, lps, seen

    state = (jnp.int32(1), tok, cache, alive, ids, cmask, lps, seen)
    for i, (_, end) in enumerate(segments):
        if fast and i:
            t, tok, cache, alive, ids, cmask, lps, seen = state
            state = (t, tok, constrain_cache(_grow(cache, P + end - 1), B), alive, ids, cmask, lps, seen)

        def cond(state, end=end):
            t, _, _, alive, *_ = state
            return (t < end) & jnp.any(alive)

        state = jax.lax.while_loop(cond, body, state)
    t, _, _, alive, ids, cmask, lps, _ = state
    return GenerationOutput(
        completion_ids=ids,
        completion_mask=cmask,
        completion_lengths=jnp.sum(cmask, axis=1),
        is_truncated=alive,
        logprobs=lps,
        num_steps=t,
    )


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1, 2, 3))


def _check_left_padded(prompt_mask) -> None:
    if isinstance(prompt_mask, jax.core.Tracer):
        return  # called under an outer jit: nothing concrete to check
    if isinstance(prompt_mask, jax.Array) and not prompt_mask.is_fully_addressable:
        return  # multi-host global array: the caller is responsible
    m = np.asarray(prompt_mask) != 0
    if m.shape[1] and np.any(m[:, :-1] & ~m[:, 1:]):
        rows = np.nonzero(np.any(m[:, :-1] & ~m[:, 1:], axis=1))[0][:5].tolist()
        raise ValueError(
            f"generate: prompts must be left-padded (padding before the tokens), but rows {rows} have padding after "
            "a token. Re-pad with padding_side='left' (e.g. trl_jax.ops.padding / tokenizer.padding_side='left')."
        )


def _prepare(
    model,
    params,
    prompt_ids,
    prompt_mask,
    rng=None,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    return_logprobs: bool = True,
    cache_dtype=None,
    mesh: Mesh | None = None,
    decode_layout: str | None = None,
    num_generations: int = 1,
    group_layout: str = "consecutive",
    decode_block_size: int = 128,
    check_inputs: bool = True,
):
    if not hasattr(prompt_ids, "ndim"):
        prompt_ids = np.asarray(prompt_ids)
    if not hasattr(prompt_mask, "ndim"):
        prompt_mask = np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or np.shape(prompt_mask) != np.shape(prompt_ids):
        raise ValueError(
            f"generate: prompt_ids and prompt_mask must both be [B, P]; got shapes {np.shape(prompt_ids)} and "
            f"{np.shape(prompt_mask)}."
        )
    if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"generate: prompt_ids must be integer token ids, got dtype {prompt_ids.dtype}.")
    if do_sample and rng is None:
        raise ValueError(
            "generate: do_sample=True needs an `rng` key (e.g. jax.random.key(0)); or pass do_sample=False."
        )
    eos = _eos_tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad_token_id is None:
        if not eos:
            raise ValueError(
                "generate: no pad_token_id (argument or model.config) and no eos_token_id to fall back on; pass one."
            )
        pad_token_id = eos[0]
    cfg = SamplingConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p),
        min_p=None if min_p is None else float(min_p),
        repetition_penalty=None if repetition_penalty is None else float(repetition_penalty),
        eos_token_ids=eos,
        pad_token_id=int(pad_token_id),
        return_logprobs=bool(return_logprobs),
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
        num_generations=int(num_generations),
        group_layout=group_layout,
        decode_block_size=int(decode_block_size),
    )
    if prompt_ids.shape[0] % cfg.num_generations:
        raise ValueError(f"generate: the batch ({prompt_ids.shape[0]} rows) is not a multiple of num_generations "
                         f"({cfg.num_generations}).")
    if check_inputs:
        _check_left_padded(prompt_mask)
        _check_groups(prompt_ids, prompt_mask, cfg.num_generations, cfg.group_layout)
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    layout = None
    if decode_layout is not None:
        if mesh is not None:
            layout = resolve_decode_layout(model, params, mesh, decode_layout)
        params = prepare_decode_params(model, params, mesh=mesh, layout=decode_layout)
    return (model, cfg, mesh, layout), (params, prompt_ids, prompt_mask, rng)


def generate(*args, **kwargs) -> GenerationOutput:
    """Sample ``max_new_tokens`` tokens after each left-padded prompt, with transformers' ``generate`` semantics.

    Args:
      model: a model with the cache protocol (``init_cache``, ``prefill``, ``decode_step``), e.g. from
        ``trl_jax.models.from_pretrained``. Used as a static (hashed by identity) jit argument.
      params: its parameter pytree (may be sharded over a mesh).
      prompt_ids: ``[B, P]`` int, **left-padded**.
      prompt_mask: ``[B, P]`` 0/1 attention mask (0 = padding).
      rng: a ``jax.random`` key; required when ``do_sample``. Step ``t`` samples with ``fold_in(rng, t)``, so a fixed
        key reproduces the same tokens, sharded or not.
      max_new_tokens: ``N``, the completion length (static).
      do_sample: sample (True, TRL's default) or greedy argmax (False; warpers are then skipped, as transformers).
      temperature, top_k, top_p, min_p, repetition_penalty: transformers' meanings and order (see
        :mod:`trl_jax.generation.processors`); ``None`` / 0 / 1.0 disable an option.
      eos_token_id: an int or a list of stop ids; ``None`` never stops before ``N``.
      pad_token_id: written after EOS; defaults to ``model.config.pad_token_id``, else the first EOS id.
      return_logprobs: also return the sampled tokens' log-probs under the processed distribution.
      cache_dtype: KV-cache dtype (default: the model's compute dtype).
      mesh: optional; pins the KV cache's batch axis to the decode batch axes and its KV heads to the
        tensor-parallel axes. Inputs sharded over a mesh work without it (shardings propagate through ``jit``).
      decode_layout: ``None`` samples with ``params`` as given. ``"auto"`` / ``"replicated"`` / ``"tensor"``
        first cast ``params`` to the model's compute dtype and reshard them for decoding
        (:func:`prepare_decode_params`: replicated, or tensor-parallel over every mesh axis but ``data``), so the
        decode loop has no collective on weights; the decode batch is then split over the axes free of weights.
      num_generations: ``G``; rows come in groups of ``G`` identical prompts (``group_layout="consecutive"``:
        ``p0 p0 p1 p1``, TRL's ``RepeatSampler``; ``"tiled"``: ``p0 p1 p0 p1``). Each distinct prompt is then
        prefilled once and its KV cache broadcast to its ``G`` rows (same tokens as ``G=1``, a ``G``-th of the
        prefill). The caller guarantees the grouping (``check_inputs`` verifies it on the host).
      decode_block_size: the first decode segment's length; each next segment doubles, over a KV cache grown to
        match (:func:`decode_segments`), so attention costs follow the tokens generated so far.
      check_inputs: verify on the host that ``prompt_mask`` is left-padded (and the ``num_generations`` groups).

    Returns:
      :class:`GenerationOutput` (``completion_ids [B, N]``, ``completion_mask [B, N]``, ``completion_lengths [B]``,
      ``is_truncated [B]``, ``logprobs [B, N]`` or ``None``, ``num_steps``).
    """
    static, dynamic = _prepare(*args, **kwargs)
    return _generate_jit(*static, *dynamic)


generate.__signature__ = inspect.signature(_prepare).replace(return_annotation=GenerationOutput)


def lower_generate(*args, **kwargs):
    """``generate``'s sampling program, lowered (``.compile()``, ``.as_text()``, for cost analysis); same arguments
    as :func:`generate`. The decode-layout cast/reshard, if asked for, runs eagerly first (it is its own program)."""
    static, dynamic = _prepare(*args, **kwargs)
    return _generate_jit.lower(*static, *dynamic)


def rows_grouped(prompt_ids, prompt_mask, num_generations: int, group_layout: str = "consecutive") -> bool:
    """Host check: are the rows ``B / G`` prompts x ``G`` identical copies in ``group_layout`` order (so
    ``generate(..., num_generations=G)`` may prefill each prompt once)? Numpy-convertible inputs only."""
    G = int(num_generations)
    ids, m = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if G < 1 or ids.shape[0] % G:
        return False
    if G == 1:
        return True
    sel, row_of = _prompt_rows(ids.shape[0], G, group_layout)
    return bool(np.array_equal(ids, ids[sel][row_of]) and np.array_equal(m, m[sel][row_of]))


def _check_groups(prompt_ids, prompt_mask, G: int, group_layout: str) -> None:
    if G == 1 or isinstance(prompt_ids, jax.core.Tracer) or isinstance(prompt_mask, jax.core.Tracer):
        return
    if isinstance(prompt_ids, jax.Array) and not prompt_ids.is_fully_addressable:
        return
    if not rows_grouped(prompt_ids, prompt_mask, G, group_layout):
        raise ValueError(
            f"generate: num_generations={G} with group_layout={group_layout!r} needs rows made of identical "
            "prompts in that order, but some rows differ from their group's first row; pass num_generations=1 or "
            "reorder the rows (trl_jax.generation.repeat_for_generations)."
        )
