"""Jitted KV-cache sampling: prefill + ``lax.while_loop`` decode with transformers' sampling semantics.

Public API::

    out = generate(model, params, prompt_ids, prompt_mask, jax.random.key(0), max_new_tokens=256,
                   temperature=0.9, top_p=0.95, eos_token_id=[eos_id], pad_token_id=pad_id)
    out.completion_ids, out.completion_mask, out.logprobs, out.is_truncated
    # rollouts: bf16 weights replicated (or tensor-parallel) for decoding, each prompt prefilled once per group
    out = generate(model, params, ids, mask, key, max_new_tokens=256, mesh=mesh, decode_layout="auto",
                   num_generations=8)
    batch = repeat_for_generations({"prompt_ids": ids, "prompt_mask": mask}, num_generations=8)
"""

from trl_jax.generation.processors import (
    min_p,
    process_logits,
    repetition_penalty,
    seen_tokens,
    temperature,
    top_k,
    top_p,
)
from trl_jax.generation.repeat import RepeatSampler, TorchCPUGenerator, repeat_for_generations
from trl_jax.generation.sampler import (
    DECODE_LAYOUTS,
    GenerationOutput,
    SamplingConfig,
    completion_mask_from_ids,
    decode_segments,
    generate,
    lower_generate,
    make_decode_fns,
    prepare_decode_params,
    rows_grouped,
)

__all__ = [
    "DECODE_LAYOUTS",
    "GenerationOutput",
    "RepeatSampler",
    "SamplingConfig",
    "TorchCPUGenerator",
    "completion_mask_from_ids",
    "decode_segments",
    "generate",
    "lower_generate",
    "make_decode_fns",
    "min_p",
    "prepare_decode_params",
    "process_logits",
    "repeat_for_generations",
    "repetition_penalty",
    "rows_grouped",
    "seen_tokens",
    "temperature",
    "top_k",
    "top_p",
]
