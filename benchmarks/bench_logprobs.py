"""Log-prob paths side by side: time and compiled temporary memory (XLA memory analysis).

Measured, on identical inputs:
  * jax naive      ``take_along_axis(log_softmax(logits.astype(f32)))``
  * jax selective  ``trl_jax.ops.selective_log_softmax`` (chunked, fp32 per chunk)
  * torch TRL      ``trl.trainer.utils.selective_log_softmax`` (the reference; skipped if torch/trl are missing)
  * from hidden states, forward + backward: naive ``hidden @ W`` -> log_softmax-gather, versus
    ``trl_jax.ops.fused_log_probs`` (token chunks, rematerialised).

Usage:
  python benchmarks/bench_logprobs.py                 # CPU-sized shape (default)
  python benchmarks/bench_logprobs.py --preset h200   # bf16 [8, 1024, 151936], hidden 1024 (GPU)
Prints one JSON line per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.ops import fused_log_probs, selective_log_softmax

PRESETS = {
    "cpu": dict(batch=4, seq=256, vocab=32768, hidden=256, chunk=128),
    "h200": dict(batch=8, seq=1024, vocab=151936, hidden=1024, chunk=1024),
}


def _time(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def naive_logps(logits, index):
    return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), index[..., None], -1)[..., 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    b, t, v, d, chunk = cfg["batch"], cfg["seq"], cfg["vocab"], cfg["hidden"], cfg["chunk"]
    dtype = jnp.dtype(args.dtype)
    key = jax.random.PRNGKey(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    logits = (jax.random.normal(k1, (b, t, v), jnp.float32) * 3).astype(dtype)
    index = jax.random.randint(k2, (b, t), 0, v)
    hidden = jax.random.normal(k3, (b, t, d), jnp.float32).astype(dtype)
    weight = (jax.random.normal(k4, (d, v), jnp.float32) * d**-0.5).astype(dtype)
    logits_bytes = logits.size * logits.dtype.itemsize
    header = dict(
        device=str(jax.devices()[0].device_kind),
        platform=jax.default_backend(),
        jax=jax.__version__,
        python=platform.python_version(),
        shape=[b, t, v],
        hidden=d,
        dtype=str(dtype),
        chunk=chunk,
    )
    print(json.dumps({"header": header}))
    rows = []

    def record(name, seconds, temp=None, extra=None):
        row = {"name": name, "ms": round(seconds * 1e3, 3)}
        if temp is not None:
            row["temp_MiB"] = round(temp / 2**20, 1)
        if extra:
            row.update(extra)
        rows.append(row)
        print(json.dumps(row))

    naive = jax.jit(naive_logps)
    sel = jax.jit(lambda lg, ix: selective_log_softmax(lg, ix))
    sel_chunked = jax.jit(lambda lg, ix: selective_log_softmax(lg, ix, chunk_size=chunk))
    for name, fn in [
        ("jax naive log_softmax-gather", naive),
        ("jax selective_log_softmax (fused)", sel),
        (f"jax selective_log_softmax (chunk {chunk})", sel_chunked),
    ]:
        s = _time(fn, logits, index, repeats=args.repeats)
        record(name, s, _temp_bytes(fn, logits, index), {"effective_TBps": round(logits_bytes / s / 1e12, 3)})

    if not args.no_torch:
        try:
            import torch
            from trl.trainer.utils import selective_log_softmax as trl_sls

            tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[str(dtype)]
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            tl = torch.from_numpy(np.array(logits.astype(jnp.float32))).to(dev, tdtype)
            ti = torch.from_numpy(np.array(index)).long().to(dev)

            def run_torch():
                out = trl_sls(tl, ti)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return out

            run_torch()
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run_torch()
                ts.append(time.perf_counter() - t0)
            s = float(np.median(ts))
            record(f"torch TRL selective_log_softmax ({dev})", s, None, {"effective_TBps": round(logits_bytes / s / 1e12, 3)})
        except ImportError as e:  # torch/trl are benchmark extras
            print(json.dumps({"skipped": f"torch reference: {e}"}))

    # From hidden states, forward + backward (what a trainer runs).
    def naive_hidden_loss(h, w, ix):
        z = jnp.dot(h, w, preferred_element_type=jnp.float32)
        return jnp.sum(naive_logps(z, ix))

    def fused_hidden_loss(h, w, ix):
        return jnp.sum(fused_log_probs(h, w, ix, chunk_size=chunk))

    results = {}
    for name, loss in [("hidden->logps naive fwd+bwd", naive_hidden_loss), ("hidden->logps fused fwd+bwd", fused_hidden_loss)]:
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        s = _time(g, hidden, weight, index, repeats=args.repeats)
        temp = _temp_bytes(jax.grad(loss, argnums=(0, 1)), hidden, weight, index)
        results[name] = (s, temp)
        record(name, s, temp)

    (sn, tn), (sf, tf) = results["hidden->logps naive fwd+bwd"], results["hidden->logps fused fwd+bwd"]
    summary = {"fused_over_naive_time": round(sf / sn, 3), "fused_over_naive_temp_memory": round(tf / max(tn, 1), 4)}
    print(json.dumps({"summary": summary}))
    print()
    print(f"| measurement | ms | temp MiB | effective TB/s |")
    print(f"|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ms']} | {r.get('temp_MiB', '-')} | {r.get('effective_TBps', '-')} |")


if __name__ == "__main__":
    main()
