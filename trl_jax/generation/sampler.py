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
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
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

    def __post_init__(self):
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


def _cache_shardings(cache, mesh: Mesh, batch: int):
    """Batch axis of the cache over (data, fsdp); KV heads over ``tensor`` where it divides."""
    from trl_jax.parallel import batch_axes, batch_parallel_size

    b_axes = batch_axes(mesh)
    b = None
    if b_axes and batch % batch_parallel_size(mesh) == 0:
        b = b_axes[0] if len(b_axes) == 1 else b_axes

    def one(x):
        if x.ndim == 5:  # [L, B, S, K, Hd]
            t = "tensor" if "tensor" in mesh.axis_names and x.shape[3] % mesh.shape["tensor"] == 0 else None
            return NamedSharding(mesh, PartitionSpec(None, b, None, t, None))
        if x.ndim == 2:  # [B, S]
            return NamedSharding(mesh, PartitionSpec(b, None))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, cache)


def _generate_impl(model, cfg: SamplingConfig, mesh: Mesh | None, params, prompt_ids, prompt_mask, rng):
    B, P = prompt_ids.shape
    N = cfg.max_new_tokens
    eos = cfg.eos_token_ids
    pad = jnp.int32(cfg.pad_token_id)
    prompt_ids = prompt_ids.astype(jnp.int32)
    mask = prompt_mask.astype(jnp.int32)

    # The last sampled token is never fed back, so P + N - 1 slots suffice.
    cache = model.init_cache(B, P + N - 1, cfg.cache_dtype) if cfg.cache_dtype else model.init_cache(B, P + N - 1)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, _cache_shardings(cache, mesh, B))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.prefill(params, cache, prompt_ids, positions, mask)
    V = logits.shape[-1]
    next_position = jnp.sum(mask, axis=1).astype(jnp.int32)  # position of the first generated token

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

    ids = jnp.full((B, N), pad, jnp.int32)
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

    def cond(state):
        t, _, _, alive, *_ = state
        return (t < N) & jnp.any(alive)

    def body(state):
        t, tok, cache, alive, ids, cmask, lps, seen = state
        logits, cache = model.decode_step(params, cache, tok, next_position + t - 1)
        tok, lp, seen = sample(logits, t, alive, seen)
        ids, cmask, lps, alive = record(t, tok, lp, alive, ids, cmask, lps)
        return t + 1, tok, cache, alive, ids, cmask, lps, seen

    state = (jnp.int32(1), tok, cache, alive, ids, cmask, lps, seen)
    t, _, _, alive, ids, cmask, lps, _ = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(
        completion_ids=ids,
        completion_mask=cmask,
        completion_lengths=jnp.sum(cmask, axis=1),
        is_truncated=alive,
        logprobs=lps,
        num_steps=t,
    )


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1, 2))


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


def generate(
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
    check_inputs: bool = True,
) -> GenerationOutput:
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
      mesh: optional; pins the KV cache's batch axis to the mesh's (data, fsdp) axes and its KV heads to ``tensor``.
        Inputs sharded over a mesh work without it (shardings propagate through ``jit``).
      check_inputs: verify on the host that ``prompt_mask`` is left-padded.

    Returns:
      :class:`GenerationOutput` (``completion_ids [B, N]``, ``completion_mask [B, N]``, ``completion_lengths [B]``,
      ``is_truncated [B]``, ``logprobs [B, N]`` or ``None``, ``num_steps``).
    """
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
    )
    if check_inputs:
        _check_left_padded(prompt_mask)
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    return _generate_jit(model, cfg, mesh, params, prompt_ids, prompt_mask, rng)
