"""Forward+backward time and peak memory: trl_jax decoder vs transformers (PyTorch), same config and batch.

    # CPU-scaled Qwen3 shape (hidden 256, 4 layers, vocab 8192, batch 4 x 256, fp32)
    python benchmarks/bench_model.py
    # GPU: Qwen3-0.6B shape, batch 8 x 1024, bf16
    python benchmarks/bench_model.py --preset qwen3-0.6b

Both sides compute the mean next-token cross-entropy over all tokens and its gradient w.r.t. every parameter
(random weights; timing only). JAX: ``jit(value_and_grad)``; PyTorch: ``model(input_ids, labels=...)`` +
``backward()``. Reported: median step seconds over ``--steps`` after warmup, peak memory (GPU: allocator peaks;
CPU: JAX's compiled temp+argument+output bytes, PyTorch not measured on CPU), and the PyTorch / JAX time ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

PRESETS = {
    "cpu": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, batch=4, seq=256, dtype="float32"),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, batch=8, seq=1024,
                       dtype="bfloat16"),
}


def _hf_config(p):
    import transformers

    return transformers.Qwen3Config(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], head_dim=p["head_dim"], tie_word_embeddings=True,
        max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )


def bench_jax(p, args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from trl_jax.models import CausalLM, config_from_hf

    dtype = jnp.dtype(p["dtype"])
    cfg = config_from_hf(_hf_config(p), dtype=dtype, param_dtype=dtype if args.param_dtype_same else jnp.float32,
                         scan_layers=not args.unrolled, remat_policy=args.remat, attention_impl=args.attention_impl)
    model = CausalLM(cfg)
    params = jax.jit(model.init_params)(jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, p["vocab_size"], (p["batch"], p["seq"])), jnp.int32)

    def loss_fn(params, ids):
        logits = model.logits(params, ids).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss_fn))
    t0 = time.perf_counter()
    compiled = step.lower(params, ids).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, grads = compiled(params, ids)
        jax.block_until_ready((loss, grads))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mem = None
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        mem = stats["peak_bytes_in_use"]
        mem_kind = "device peak_bytes_in_use"
    else:
        ma = compiled.memory_analysis()
        mem = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
        mem_kind = "compiled temp+args+outputs"
    return dict(framework="jax", step_s=statistics.median(times), compile_s=compile_s, loss=float(loss),
                peak_mem_gb=mem / 1e9, mem_kind=mem_kind, device=str(dev.device_kind), jax=jax.__version__)


def bench_torch(p, args):
    import numpy as np
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, p["dtype"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(p), dtype=dtype, attn_implementation="sdpa")
    model = model.to(dev).train()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, p["vocab_size"], (p["batch"], p["seq"])), device=dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None
    return dict(framework="torch", step_s=statistics.median(times), loss=loss.item(), peak_mem_gb=mem,
                mem_kind="torch.cuda.max_memory_allocated" if mem else "not measured on CPU", device=dev,
                torch=torch.__version__, transformers=transformers.__version__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable",
                                                        "dots_with_no_batch_dims_saveable"])
    ap.add_argument("--unrolled", action="store_true", help="unrolled layers instead of nn.scan")
    ap.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "cudnn"])
    ap.add_argument("--param-dtype-same", action="store_true",
                    help="params in the compute dtype (as the PyTorch model); default fp32 params for jax")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    print(f"# preset={args.preset} {json.dumps(p)} python={platform.python_version()}")
    rows = [bench_jax(p, args)]
    if not args.skip_torch:
        rows.append(bench_torch(p, args))
    for r in rows:
        print(json.dumps(r))
    if len(rows) == 2:
        j, t = rows
        print(f"torch/jax step-time ratio: {t['step_s'] / j['step_s']:.2f}x  (>1: trl_jax faster)")
        if j["peak_mem_gb"] and t["peak_mem_gb"]:
            print(f"torch/jax peak-memory ratio: {t['peak_mem_gb'] / j['peak_mem_gb']:.2f}x")


if __name__ == "__main__":
    main()
