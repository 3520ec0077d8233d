"""Sampler throughput: ``trl_jax.generation.generate`` against transformers ``generate`` on the same model.

Both sides sample (``do_sample=True``, temperature 1.0, no top-k/top-p) exactly ``--new-tokens`` tokens per row
(no EOS), from left-padded prompts of ``--prompt-len`` tokens, and are timed after a warm-up call (JAX compile).

Usage:
  python benchmarks/bench_sampler.py                        # CPU: random Qwen3 (hidden 256, 4 layers), B16 P32 N64
  python benchmarks/bench_sampler.py --preset qwen3-0.6b    # GPU: random Qwen3-0.6B shape, bf16, B64 P128 N256
  python benchmarks/bench_sampler.py --preset qwen3-0.6b --compare-transformers   # + torch CUDA generate

GPU mode reports decode tokens/s (``B * (N - 1) / (t(N) - t(1))``, i.e. prefill and the first sample removed) and
the fraction of the HBM-bandwidth bound: per decode step the weights are read once and the KV cache of the
tokens so far (``2 * L * B * ctx * K * Hd * bytes``); bound = sum over steps / HBM bandwidth (by device name or
``--hbm-tbps``). ``kv_segments`` also gives the bound counting the KV slots trl_jax's attention actually reads:
the decode loop runs in segments (``decode_segments``: 128 tokens, then doubling) over a cache grown to each
segment's end, so a step reads at most about twice the tokens generated so far. ``--num-generations G`` repeats each
prompt G times (GRPO groups): trl_jax prefills each distinct prompt once. ``--decode-layout`` casts/reshards the
weights for decoding first (``auto``/``replicated``/``tensor``). Prints one JSON line per measurement, then a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.generation import decode_segments, generate, repeat_for_generations

PRESETS = {
    "cpu": dict(vocab=16384, hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2, head_dim=64, batch=16,
                prompt_len=32, new_tokens=64, dtype="float32", repeats=3),
    "qwen3-0.6b": dict(vocab=151936, hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8, head_dim=128,
                       batch=64, prompt_len=128, new_tokens=256, dtype="bfloat16", repeats=3),
}

HBM_TBPS = {"H200": 4.8, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "A100-SXM4-80GB": 2.039,
            "A100-PCIE-80GB": 1.935, "A100": 1.555, "L4": 0.3}


def _hbm_tbps(device_kind: str) -> float | None:
    for name, bw in HBM_TBPS.items():  # most specific names first
        if name.lower() in device_kind.lower():
            return bw
    return None


def _hf_config(c):
    import transformers

    return transformers.Qwen3Config(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        head_dim=c["head_dim"], max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )


def _prompts(c, seed=0, num_generations=1):
    rng = np.random.default_rng(seed)
    B, P = c["batch"] // num_generations, c["prompt_len"]
    ids = rng.integers(1, c["vocab"], size=(B, P)).astype(np.int32)
    mask = np.ones_like(ids)
    lengths = rng.integers(P // 2, P + 1, size=B)  # left padding, lengths P/2..P
    for r, n in enumerate(lengths):
        mask[r, : P - n] = 0
    ids[mask == 0] = 0
    return repeat_for_generations(ids, num_generations), repeat_for_generations(mask, num_generations)


def _median_time(fn, repeats):
    fn()  # warm-up (compile)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _torch_model(c, device, dtype_name):
    import torch
    import transformers

    torch.manual_seed(0)
    tm = transformers.AutoModelForCausalLM.from_config(_hf_config(c), attn_implementation="sdpa")
    return tm.to(device=device, dtype=getattr(torch, dtype_name)).eval()


def _jax_model(c, args, tm=None):
    """CPU: the torch model's own weights through ``from_pretrained``; GPU: random bf16 init (no download)."""
    from trl_jax.models import CausalLM, config_from_hf, from_pretrained

    dtype = jnp.dtype(c["dtype"])
    if tm is not None and args.preset == "cpu":
        with tempfile.TemporaryDirectory() as d:
            tm.save_pretrained(d)
            return from_pretrained(d, dtype=dtype, param_dtype=dtype)
    model = CausalLM(config_from_hf(_hf_config(c), dtype=dtype, param_dtype=dtype))
    params = jax.jit(model.init_params)(jax.random.key(0))
    return model, params


def _time_transformers(tm, ids, mask, N, repeats):
    import torch

    dev = next(tm.parameters()).device
    x, m = torch.as_tensor(ids, dtype=torch.long, device=dev), torch.as_tensor(mask, device=dev)

    def run():
        with torch.no_grad():
            out = tm.generate(input_ids=x, attention_mask=m, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + N, out.shape
        return out

    return _median_time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for k in ("batch", "prompt_len", "new_tokens", "layers", "repeats"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    ap.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth override (TB/s)")
    ap.add_argument("--compare-transformers", action="store_true", help="GPU mode: also time torch generate")
    ap.add_argument("--no-torch", action="store_true", help="CPU mode: skip transformers")
    ap.add_argument("--num-generations", type=int, default=1, help="completions per prompt (shared prefill)")
    ap.add_argument("--decode-layout", default=None, choices=("auto", "replicated", "tensor"),
                    help="cast/reshard the weights for decoding first (default: use them as loaded)")
    ap.add_argument("--lora", type=int, default=0,
                    help="LoRA rank: also time sampling with adapters (all-linear) applied on the fly vs merged into "
                         "the weights first (merge included in each call, as a rollout would pay it)")
    args = ap.parse_args()
    c = dict(PRESETS[args.preset])
    for k in ("batch", "prompt_len", "new_tokens", "layers", "repeats"):
        if getattr(args, k) is not None:
            c[k] = getattr(args, k)
    B, P, N = c["batch"], c["prompt_len"], c["new_tokens"]
    dev = jax.devices()[0]
    env = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, python=platform.python_version(),
               preset=args.preset, num_generations=args.num_generations, decode_layout=args.decode_layout,
               **{k: c[k] for k in ("batch", "prompt_len", "new_tokens", "layers", "hidden", "vocab", "dtype")})
    rows = []

    def emit(**r):
        r = {**env, **r}
        rows.append(r)
        print(json.dumps(r), flush=True)

    use_torch = (args.preset == "cpu" and not args.no_torch) or args.compare_transformers
    tm = None
    if use_torch:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_threads=torch.get_num_threads())
        tm = _torch_model(c, "cuda" if dev.platform == "gpu" else "cpu", c["dtype"])
    model, params = _jax_model(c, args, tm)
    G = args.num_generations
    if B % G:
        raise SystemExit(f"--batch {B} must be a multiple of --num-generations {G}")
    ids, mask = _prompts(c, num_generations=G)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    key = jax.random.key(0)

    def jax_run(n):
        def run():
            out = generate(model, params, ids_j, mask_j, key, max_new_tokens=n, temperature=1.0, pad_token_id=0,
                           check_inputs=False, num_generations=G, decode_layout=args.decode_layout)
            jax.block_until_ready(out)
            return out
        return run

    t0 = time.perf_counter()
    jax_run(N)()
    compile_s = time.perf_counter() - t0
    t_full = _median_time(jax_run(N), c["repeats"])
    t_one = _median_time(jax_run(1), c["repeats"])
    decode_s = max(t_full - t_one, 1e-9)
    emit(impl="trl_jax", seconds=t_full, tokens_per_s=B * N / t_full, prefill_plus_first_s=t_one,
         decode_tokens_per_s=B * (N - 1) / decode_s, ms_per_decode_step=1e3 * decode_s / (N - 1),
         first_call_s=compile_s)

    if args.lora:
        from trl_jax.models.lora import LoraConfig, merge_adapters, resolve_lora
        from trl_jax.models.peft_io import add_adapters, with_lora

        spec = resolve_lora(LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear",
                                       init_lora_weights=False), model.config)  # random B: a trained adapter
        lmodel, lparams = add_adapters(model, params, spec)
        plain = with_lora(lmodel, None)
        merge = jax.jit(lambda p: merge_adapters(p, spec, dtype=jnp.dtype(c["dtype"])))

        def lora_run(merged):
            def run():
                m, p = (plain, merge(lparams)) if merged else (lmodel, lparams)
                out = generate(m, p, ids_j, mask_j, key, max_new_tokens=N, temperature=1.0, pad_token_id=0,
                               check_inputs=False, num_generations=G, decode_layout=args.decode_layout)
                jax.block_until_ready(out)
                return out
            return run

        for merged in (False, True):
            t = _median_time(lora_run(merged), c["repeats"])
            emit(impl="trl_jax_lora_" + ("merged" if merged else "on_the_fly"), lora_rank=args.lora, seconds=t,
                 tokens_per_s=B * N / t, vs_base=t_full / t)

    if dev.platform == "gpu" or args.hbm_tbps:
        cfg = model.config
        w_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        kv_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(c["dtype"]).itemsize
        ctx = P + np.arange(1, N)  # cache length read while producing tokens 1..N-1
        bound_bytes = (N - 1) * w_bytes + kv_tok * B * ctx.sum()
        seg_slots = sum((e - s) * (P + e - 1) for s, e in decode_segments(N, 128))  # slots trl_jax reads
        full_bytes = (N - 1) * w_bytes + kv_tok * B * seg_slots
        bw = args.hbm_tbps or _hbm_tbps(dev.device_kind)
        r = dict(impl="hbm_bound", weight_bytes=int(w_bytes), kv_bytes_per_step_mean=float(kv_tok * B * ctx.mean()),
                 hbm_tbps=bw)
        if bw:
            bound_s, full_s = bound_bytes / (bw * 1e12), full_bytes / (bw * 1e12)
            r.update(bound_decode_s=bound_s, bound_decode_tokens_per_s=B * (N - 1) / bound_s,
                     fraction_of_bound=bound_s / decode_s, fraction_of_bound_kv_segments=full_s / decode_s)
        emit(**r)

    if tm is not None:
        t_hf = _time_transformers(tm, ids, mask, N, max(1, c["repeats"] - 1))
        emit(impl="transformers", seconds=t_hf, tokens_per_s=B * N / t_hf)
        emit(impl="speedup", trl_jax_over_transformers=t_hf / t_full)

    print("\n| impl | seconds | tokens/s | notes |\n|---|---|---|---|")
    for r in rows:
        if r["impl"].startswith("trl_jax_lora"):
            print(f"| {r['impl']} (r={r['lora_rank']}) | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['vs_base']:.2f}x the base model's speed |")
        elif r["impl"] in ("trl_jax", "transformers"):
            note = ""
            if r["impl"] == "trl_jax":
                note = (f"prefill + first token {r['prefill_plus_first_s']:.3f} s; decode {r['decode_tokens_per_s']:.0f} "
                        f"tok/s, {r['ms_per_decode_step']:.2f} ms/step; first call (compile) {r['first_call_s']:.1f} s")
            print(f"| {r['impl']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {note} |")
        elif r["impl"] == "speedup":
            print(f"| speedup | | | trl_jax is {r['trl_jax_over_transformers']:.2f}x transformers |")
        elif r["impl"] == "hbm_bound" and r.get("hbm_tbps"):
            print(f"| HBM bound @ {r['hbm_tbps']} TB/s | {r['bound_decode_s']:.3f} | "
                  f"{r['bound_decode_tokens_per_s']:.0f} | decode at {100 * r['fraction_of_bound']:.1f}% of the bound "
                  f"({100 * r['fraction_of_bound_kv_segments']:.1f}% counting the cache slots the segments read) |")


if __name__ == "__main__":
    main()
