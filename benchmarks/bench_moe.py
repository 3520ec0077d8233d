"""Mixture-of-experts dispatch: dense vs ragged (``ModelConfig.moe_impl``), forward + backward of the decoder.

    # CPU: a small Qwen3-MoE-shaped model (hidden 128, 32 experts of width 64, top 4, 2 layers, batch 4 x 128, fp32)
    python benchmarks/bench_moe.py
    # GPU: one layer of Qwen3-30B-A3B (hidden 2048, 128 experts of width 768, top 8, 32/4 heads), batch 4 x 2048, bf16
    python benchmarks/bench_moe.py --preset qwen3-30b-a3b
    # any preset's FLOP counts and compiled memory without running it (abstract params)
    python benchmarks/bench_moe.py --preset qwen3-30b-a3b --compile-only

The step is ``jit(value_and_grad)`` of ``mean(hidden_states**2)`` (the decoder layers and final norm, no LM head,
so the figures are the layers' own) w.r.t. every parameter, random weights. Reported per dispatch, one JSON line
each: median step seconds over ``--steps`` after one warmup, the compiled program's matmul FLOPs as the backend
runs them (``trl_jax.utils.hlo_cost``: dots/convolutions of the compiled HLO, loop trip counts included), the
grouped-matmul FLOPs counted on the jaxpr (``ragged_dot`` rows counted once: what a grouped kernel does), and XLA's
compiled temp memory. On CPU JAX lowers ``ragged_dot`` to a dense dot over a masked per-expert copy of the rows, so
the ragged program's compiled FLOPs are ``top_k`` times the dense dispatch's expert FLOPs; on GPU/TPU it lowers to a
grouped matmul.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

PRESETS = {
    "cpu": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64, batch=4, seq=128,
                dtype="float32"),
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=1, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, batch=4, seq=2048, dtype="bfloat16"),
}


def run(preset: str, impl: str, steps: int, compile_only: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from trl_jax.models import CausalLM
    from trl_jax.models.config import ModelConfig
    from trl_jax.utils.hlo_cost import hlo_cost
    from trl_jax.utils.jaxpr_cost import jaxpr_matmul_flops

    p = dict(PRESETS[preset])
    B, T, dtype = p.pop("batch"), p.pop("seq"), jnp.dtype(p.pop("dtype"))
    cfg = ModelConfig("qwen3_moe", intermediate_size=6144, qk_norm=True, norm_topk_prob=True, dtype=dtype,
                      param_dtype=jnp.float32, moe_impl=impl, **p)
    model = CausalLM(cfg)
    if compile_only:  # shapes only: count and compile without allocating (a GPU preset checked on CPU)
        params, ids = model.abstract_params(), jax.ShapeDtypeStruct((B, T), jnp.int32)
    else:
        params = model.init_params(jax.random.PRNGKey(0))
        ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (B, T)), jnp.int32)

    def loss(params, ids):
        h = model.hidden_states(params, ids).astype(jnp.float32)
        return jnp.mean(h * h)

    grad = jax.value_and_grad(loss)
    step = jax.jit(grad)
    compiled = step.lower(params, ids).compile()
    grouped = jaxpr_matmul_flops(jax.make_jaxpr(grad)(params, ids).jaxpr)
    mem = compiled.memory_analysis()
    times = []
    if not compile_only:
        jax.block_until_ready(step(params, ids))  # warmup
    for _ in range(0 if compile_only else steps):
        t = time.perf_counter()
        jax.block_until_ready(step(params, ids))
        times.append(time.perf_counter() - t)
    return dict(bench="moe_dispatch", preset=preset, moe_impl=impl, backend=jax.default_backend(),
                device=jax.devices()[0].device_kind, batch=B, seq=T, dtype=str(dtype),
                experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, layers=cfg.num_hidden_layers,
                step_s=round(statistics.median(times), 4) if times else None,
                compiled_matmul_gflops=round(hlo_cost(compiled)["matmul_flops"] / 1e9, 3),
                grouped_matmul_gflops=round(grouped / 1e9, 3),
                temp_mib=round(getattr(mem, "temp_size_in_bytes", 0) / 2**20, 1) if mem is not None else None,
                jax=jax.__version__, python=platform.python_version())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--impl", default="dense,ragged", help="comma-separated dispatches to run")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile-only", action="store_true", help="count FLOPs and compile on abstract params; no run")
    args = ap.parse_args()
    for impl in args.impl.split(","):
        print(json.dumps(run(args.preset, impl, args.steps, args.compile_only)), flush=True)


if __name__ == "__main__":
    main()
