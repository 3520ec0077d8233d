"""Train-step benchmark for ``trl_jax.train.make_train_step``.

CPU mode (default): step time of the same small model on 1 vs 8 simulated CPU devices (each in its own
subprocess, since the device count is fixed at JAX start-up). The 8 "devices" share the same physical cores, so
this measures sharding overhead, not speed-up.

GPU mode: model TFLOP/s and MFU of the SFT step (fused log-probs, AdamW, bf16 compute) for the Qwen3-0.6B
shape. FLOPs per token = 6 N + 12 L H d T (N: parameters used in matmuls -- every parameter, the tied
embedding counted once as the LM head; L layers, H query heads, d head_dim, T sequence length; the 12LHdT term
is causal-unaware attention, the usual MFU convention).

  python benchmarks/bench_train_step.py                      # CPU: 1 vs 8 devices
  python benchmarks/bench_train_step.py --mode gpu           # GPU: Qwen3-0.6B shape, B=8, T=1024
  python benchmarks/bench_train_step.py --mode gpu --config tiny   # exercise the GPU path anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

CONFIGS = {
    # Qwen/Qwen3-0.6B config.json
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_theta=1000000.0),
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
}


def build(config_name: str, batch: int, seq: int, mesh_shape, dtype: str, remat: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from transformers import Qwen3Config

    from trl_jax.losses.base import LossTerms
    from trl_jax.models.config import config_from_hf
    from trl_jax.models.model import CausalLM
    from trl_jax.ops.logprobs import fused_log_probs
    from trl_jax.parallel import make_mesh, shard_batch
    from trl_jax.train import TrainState, make_optimizer, make_schedule, make_train_step

    hf = Qwen3Config(**CONFIGS[config_name])
    compute = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    cfg = config_from_hf(hf, dtype=compute, param_dtype=jnp.float32, remat_policy=remat)
    model = CausalLM(cfg)

    def loss_fn(params, b, rng):
        ids, mask = b["input_ids"], b["completion_mask"]
        h = model.hidden_states(params, ids)
        w = model.lm_head_weight(params).astype(compute)
        logp = fused_log_probs(h[:, :-1], w, ids[:, 1:])
        m = mask[:, 1:].astype(jnp.float32)
        return LossTerms(-jnp.sum(logp * m), jnp.sum(m), {})

    sched = make_schedule("linear", 1e-5, 1000, 10)
    tx = make_optimizer(sched, optim="adamw_torch", weight_decay=0.01)
    mesh = make_mesh(mesh_shape) if mesh_shape is not None else None
    params = model.init_params(jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    state = TrainState.create(params, tx, mesh=mesh, logical_axes=model.logical_axes() if mesh else None)
    del params
    step = make_train_step(loss_fn, tx, mesh=mesh, max_grad_norm=1.0, learning_rate_fn=sched)
    rng = np.random.default_rng(0)
    host = {
        "input_ids": rng.integers(0, hf.vocab_size, (batch, seq), dtype=np.int32),
        "completion_mask": np.ones((batch, seq), np.int32),
    }
    data = shard_batch(host, mesh) if mesh is not None else jax.device_put(host)
    return state, step, data, n_params, hf


def time_steps(state, step, data, n_steps: int, warmup: int = 2):
    import jax

    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        state, m = step(state, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        state, m = step(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    assert step.compile_count() == 1
    return compile_s, times, float(m["loss"])


def one_cpu_run(args):
    import jax

    n = jax.device_count()
    mesh = None if n == 1 else tuple(int(x) for x in args.mesh.split(","))
    state, step, data, n_params, _ = build(args.config, args.batch, args.seq, mesh, args.dtype, "none")
    compile_s, times, loss = time_steps(state, step, data, args.steps)
    print(json.dumps(dict(devices=n, mesh=mesh, params=n_params, compile_s=compile_s,
                          median_step_s=statistics.median(times), min_step_s=min(times), loss=loss,
                          tokens_per_s=args.batch * args.seq / statistics.median(times))))


def cpu_mode(args):
    rows = []
    for n in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, __file__, "--_child", "--config", args.config, "--batch", str(args.batch), "--seq",
               str(args.seq), "--steps", str(args.steps), "--mesh", args.mesh, "--dtype", args.dtype]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import jax

    print(f"# bench_train_step CPU mode: config={args.config} B={args.batch} T={args.seq} dtype={args.dtype} "
          f"steps={args.steps}; jax {jax.__version__}; {os.cpu_count()} host cores")
    print("| devices | mesh (data,fsdp,tensor) | params | compile s | median step s | tokens/s | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['mesh'] or '-'} | {r['params']:,} | {r['compile_s']:.2f} | "
              f"{r['median_step_s']:.4f} | {r['tokens_per_s']:.0f} | {r['loss']:.4f} |")


def gpu_mode(args):
    import jax

    dev = jax.devices()[0]
    mesh = None if jax.device_count() == 1 else (1, jax.device_count(), 1)
    state, step, data, n_params, hf = build(args.config, args.batch, args.seq, mesh, args.dtype, args.remat)
    compile_s, times, loss = time_steps(state, step, data, args.steps)
    med = statistics.median(times)
    L, H, d, T = hf.num_hidden_layers, hf.num_attention_heads, hf.head_dim, args.seq
    flops_per_token = 6 * n_params + 12 * L * H * d * T
    tokens = args.batch * args.seq
    tflops = flops_per_token * tokens / med / 1e12 / jax.device_count()
    kind = dev.device_kind
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    print(f"# bench_train_step GPU mode: {kind} x{jax.device_count()}, jax {jax.__version__}, config={args.config} "
          f"B={args.batch} T={T} dtype={args.dtype} remat={args.remat}")
    print(json.dumps(dict(params=n_params, compile_s=round(compile_s, 2), median_step_s=round(med, 4),
                          tokens_per_s=round(tokens / med), model_tflops_per_device=round(tflops, 1),
                          mfu=None if peak is None else round(tflops / peak, 3), loss=loss)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--config", choices=tuple(CONFIGS), default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--mesh", default="1,8,1", help="mesh for the 8-device CPU run")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--_child", action="store_true")
    a = ap.parse_args()
    gpu = a.mode == "gpu"
    a.config = a.config or ("qwen3-0.6b" if gpu else "small")
    a.batch = a.batch or (8 if gpu else 16)
    a.seq = a.seq or (1024 if gpu else 128)
    a.steps = a.steps or (10 if gpu else 5)
    a.dtype = a.dtype or ("bf16" if gpu else "fp32")
    if a._child:
        one_cpu_run(a)
    elif gpu:
        gpu_mode(a)
    else:
        cpu_mode(a)


if __name__ == "__main__":
    main()
