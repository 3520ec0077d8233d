"""trl_jax vs TRL trainers side by side: training tokens/s and peak memory, SFT and DPO (and KTO).

Each (trainer, side) runs in its own subprocess so peak memory is its own: host RSS (``ru_maxrss``) on CPU; on
GPU ``torch.cuda.max_memory_allocated`` (TRL) vs JAX ``memory_stats()["peak_bytes_in_use"]`` (trl_jax).
Both sides load the same random-init Qwen3-shaped checkpoint (``save_pretrained`` to a temp dir, with trl_jax's
character tokenizer, so ``n`` characters = ``n`` tokens) and train on the same synthetic rows.
Throughput: tokens (the logged ``num_tokens`` counter, identical on both sides) between the log of step
``--warmup`` and the log of the last step, divided by the wall time between them (compilation excluded).

The same measurement for a user's own config (with the per-step parity check and a plot): ``trl-jax compare``
(:mod:`trl_jax.compare`); this script builds its trainers with :func:`trl_jax.compare.build_jax_trainer` and
:func:`trl_jax_compare.build_trl_trainer`.

Presets:

* ``cpu-tiny`` (default): hidden 64, 2 layers, SFT batch 8 x 128, DPO 4 pairs prompt 32 + completion 96, fp32.
* ``qwen3-0.6b``: the Qwen3-0.6B shape of ``../shared/baselines`` (hidden 1024, 28 layers, vocab 151936, tied),
  bf16 weights, no gradient checkpointing / no remat; SFT batch 8 x 1024, DPO 4 pairs prompt 256 + completion 768.
  Meant for one GPU.

Usage::

    python benchmarks/bench_trainers.py                         # CPU tiny, sft + dpo + kto
    python benchmarks/bench_trainers.py --preset qwen3-0.6b --trainers sft dpo --steps 20
    python benchmarks/bench_trainers.py --out results.md         # append the markdown table
    python benchmarks/bench_trainers.py --preset qwen3-0.6b --trainers sft --lora 16   # LoRA r=16 (all-linear),
                                                                  # TRL + peft vs trl_jax; trainable params reported
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

PRESETS = {
    "cpu-tiny": dict(hidden_size=64, num_layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                     vocab_size=None, tied=False, dtype="float32", sft_batch=8, sft_len=128, dpo_pairs=4,
                     prompt_len=32, completion_len=96, steps=8, warmup=3, jax_platform="cpu"),
    "qwen3-0.6b": dict(hidden_size=1024, num_layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                       vocab_size=151936, tied=True, dtype="bfloat16", sft_batch=8, sft_len=1024, dpo_pairs=4,
                       prompt_len=256, completion_len=768, steps=20, warmup=5, jax_platform=None),
}


# ---------------------------------------------------------------------------------------------------- data/model
def make_model_dir(path: str, p: dict) -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trl_jax.assets import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen3Config(
        vocab_size=p["vocab_size"] or len(tok), hidden_size=p["hidden_size"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["num_layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"], max_position_embeddings=max(2048, p["sft_len"] + 1), tie_word_embeddings=p["tied"],
        attention_dropout=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, p["dtype"]))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _text(rng, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +=."
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))


def make_dataset(kind: str, p: dict, rows: int):
    """Fixed-length rows: ``n`` characters = ``n`` tokens with the char tokenizer (EOS included in the length)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)
    if kind == "sft":
        data = [{"text": _text(rng, p["sft_len"] - 1)} for _ in range(rows)]
    elif kind == "dpo":
        data = [{"prompt": _text(rng, p["prompt_len"]), "chosen": _text(rng, p["completion_len"] - 1),
                 "rejected": _text(rng, p["completion_len"] - 1)} for _ in range(rows)]
    else:
        data = [{"prompt": _text(rng, p["prompt_len"]), "completion": _text(rng, p["completion_len"] - 1),
                 "label": bool(i % 2)} for i in range(rows)]
    return Dataset.from_list(data)


def _batch(kind, p):
    return p["sft_batch"] if kind == "sft" else p["dpo_pairs"]


def _max_length(kind, p):
    return p["sft_len"] if kind == "sft" else p["prompt_len"] + p["completion_len"]


def _config_kwargs(kind, p, steps, out):
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=_batch(kind, p),
                gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant", optim="adamw_torch",
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                bf16=p["dtype"] == "bfloat16", seed=0, train_sampling_strategy="sequential",
                gradient_checkpointing=False, max_length=_max_length(kind, p), disable_tqdm=True)


# ---------------------------------------------------------------------------------------------------- workers
class _Times:
    """Callback (both libraries call ``on_log(args, state, control, logs=...)``): wall time of each step's log."""

    def __init__(self, sync=None):
        self.times, self.sync = [], sync

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            if self.sync:
                self.sync()
            self.times.append(time.perf_counter())
        return control


def _throughput(log_history, times, warmup):
    logs = [h for h in log_history if "loss" in h and "num_tokens" in h and "train_runtime" not in h]
    w = min(warmup, len(logs) - 1)
    tokens = logs[-1]["num_tokens"] - logs[w - 1]["num_tokens"] if w >= 1 else logs[-1]["num_tokens"]
    dt = times[-1] - times[w - 1] if w >= 1 else times[-1]
    return tokens / dt, dt / (len(logs) - w)


def _lora_kwargs(rank: int) -> dict:
    """LoRA on every linear layer, alpha = 2r, no dropout (both sides)."""
    return dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def worker_trl(kind, model_dir, p, steps, warmup, lora=0):
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from trl_jax_compare import build_trl_trainer

    gpu = torch.cuda.is_available()
    times = _Times(torch.cuda.synchronize if gpu else None)
    cb = type("Times", (TrainerCallback,), {"on_log": times.on_log})()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = tempfile.mkdtemp()
    kw = _config_kwargs(kind, p, steps, out)
    kw["model_init_kwargs"] = {"dtype": p["dtype"]}
    ds = make_dataset(kind, p, steps * _batch(kind, p))
    extra = {}
    if lora:
        import peft

        extra["peft_config"] = peft.LoraConfig(**_lora_kwargs(lora))
    trainer = build_trl_trainer(kind, model_dir, kw, ds, processing_class=tok, callbacks=[cb], **extra)
    trainable = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tps, step_s = _throughput(trainer.state.log_history, times.times, warmup)
    res = {"tokens_per_s": tps, "step_s": step_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_train_mb": rss_before, "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
           "final_loss": trainer.state.log_history[-2].get("loss"), "trainable_params": trainable}
    if gpu:
        res["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def worker_jax(kind, model_dir, p, steps, warmup, lora=0):
    import jax

    from trl_jax.compare import build_jax_trainer

    n = jax.device_count()
    times = _Times()
    out = tempfile.mkdtemp()
    kw = _config_kwargs(kind, p, steps, out)
    if _batch(kind, p) % n:
        raise SystemExit(f"batch {_batch(kind, p)} is not a multiple of {n} devices")
    kw["per_device_train_batch_size"] = _batch(kind, p) // n  # same global batch as TRL, data parallel
    kw.update(param_dtype=p["dtype"], compute_dtype=p["dtype"], remat_policy="none")
    ds = make_dataset(kind, p, steps * _batch(kind, p))
    extra = {}
    if lora:
        from trl_jax.models.lora import LoraConfig

        extra["peft_config"] = LoraConfig(**_lora_kwargs(lora))
    trainer = build_jax_trainer(kind, model_dir, kw, ds, callbacks=[times], **extra)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.train()
    tps, step_s = _throughput(trainer.log_history, times.times, warmup)
    dev = jax.devices()[0]
    res = {"tokens_per_s": tps, "step_s": step_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_train_mb": rss_before, "device": f"{dev.device_kind} x{n}",
           "final_loss": [h for h in trainer.log_history if "loss" in h and "train_loss" not in h][-1]["loss"],
           "trainable_params": getattr(trainer, "num_trainable_parameters", None)
           or sum(x.size for x in jax.tree.leaves(trainer.state.params)),
           "optimizer_state_mb": sum(x.nbytes for x in jax.tree.leaves(trainer.state.opt_state)) / 2 ** 20}
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        res["peak_device_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
    return res


# ---------------------------------------------------------------------------------------------------- driver
def _versions():
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="trl_jax vs TRL trainer throughput and peak memory")
    ap.add_argument("--preset", default="cpu-tiny", choices=list(PRESETS))
    ap.add_argument("--trainers", nargs="*", default=["sft", "dpo", "kto"], choices=["sft", "dpo", "kto"])
    ap.add_argument("--sides", nargs="*", default=["trl", "trl_jax"], choices=["trl", "trl_jax"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per side (torch.set_num_threads / XLA intra-op); default 1 for cpu-tiny, "
                         "because 2-thread OpenMP on shared cores stalls torch by 100x")
    ap.add_argument("--out", default=None, help="append the markdown report to this file")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (all-linear, alpha 2r) on both sides; 0 = full")
    ap.add_argument("--worker", nargs=3, metavar=("SIDE", "KIND", "MODEL_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    steps, warmup = a.steps or p["steps"], a.warmup or p["warmup"]
    threads = a.threads if a.threads is not None else (1 if a.preset == "cpu-tiny" else 0)
    if a.worker:
        if threads:
            import torch

            torch.set_num_threads(threads)
        side, kind, model_dir = a.worker
        res = (worker_trl if side == "trl" else worker_jax)(kind, model_dir, p, steps, warmup, lora=a.lora)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(os.path.join(tmp, "model"), p)
        for kind in a.trainers:
            for side in a.sides:
                env = dict(os.environ)
                if side == "trl_jax" and p["jax_platform"]:
                    env["JAX_PLATFORMS"] = p["jax_platform"]
                    # one CPU device, like TRL's single process (no simulated devices splitting the cores)
                    env.pop("XLA_FLAGS", None)
                if threads:
                    env["OMP_NUM_THREADS"] = str(threads)
                    if side == "trl_jax" and threads == 1:
                        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                            "intra_op_parallelism_threads=1").strip()
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--preset", a.preset, "--steps", str(steps),
                                       "--threads", str(threads), "--lora", str(a.lora),
                                       "--warmup", str(warmup), "--worker", side, kind, model_dir],
                                      capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    rows.append({"trainer": kind, "side": side, "error": f"exit {proc.returncode}"})
                    continue
                res = json.loads(line[0][7:])
                res.update(trainer=kind, side=side, process_wall_s=wall)
                rows.append(res)
                print(json.dumps(res), flush=True)
    report = format_report(rows, a.preset, p, steps, warmup, threads)
    print(report)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write(report + "\n")
    return 0


def format_report(rows, preset, p, steps, warmup, threads=0):
    v = _versions()
    shape = (f"SFT batch {p['sft_batch']} x {p['sft_len']}; DPO/KTO {p['dpo_pairs']} rows, prompt {p['prompt_len']} + "
             f"completion {p['completion_len']}")
    lines = [f"### Trainer throughput, preset `{preset}` ({time.strftime('%Y-%m-%d')})", "",
             f"Model: Qwen3-shaped, hidden {p['hidden_size']}, {p['num_layers']} layers, {p['dtype']}; {shape}; "
             f"{steps} steps, tokens/s measured after {warmup} warm-up steps (compilation excluded); "
             f"{'CPU threads per side: ' + str(threads) if threads else 'default threads'}. "
             f"Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", "",
             "| trainer | side | device | tokens/s | s/step | peak host RSS (MB) | RSS before train (MB) | "
             "peak device mem (MB) | process wall (s) | trl_jax / TRL tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["trainer"], r["side"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['trainer']} | {r['side']} | - | {r['error']} | | | | | | |")
            continue
        ratio = ""
        base = by.get((r["trainer"], "trl"))
        if r["side"] == "trl_jax" and base and "tokens_per_s" in base:
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
        dev_mem = f"{r['peak_device_mb']:.0f}" if "peak_device_mb" in r else "-"
        lines.append(f"| {r['trainer']} | {r['side']} | {r['device']} | {r['tokens_per_s']:.0f} | {r['step_s']:.4f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_before_train_mb']:.0f} | {dev_mem} | {r['process_wall_s']:.1f} "
                     f"| {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
