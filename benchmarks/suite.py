"""Run every benchmark preset of one machine class and print one JSON line per figure.

    python benchmarks/suite.py --gpu          # every GPU preset, about 9 minutes on one H100/H200
    python benchmarks/suite.py --cpu          # the CPU presets (a smoke run of the same scripts)

Each benchmark runs in its own process with its own time limit; every JSON line it prints comes out tagged
``{"bench": name, ...}``, followed by one ``{"bench": name, "status": ..., "seconds": ...}`` line. A benchmark that
fails or runs out of time is reported and the suite goes on. ``--out FILE`` also appends every line to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, arguments, time limit in seconds). GPU limits add up to 8.5 minutes.
GPU = [
    ("logprobs", ["bench_logprobs.py", "--preset", "h200"], 50),
    ("model", ["bench_model.py", "--preset", "qwen3-0.6b"], 50),
    ("train_step", ["bench_train_step.py", "--mode", "gpu"], 50),
    ("trainers", ["bench_trainers.py", "--preset", "qwen3-0.6b", "--trainers", "sft", "dpo", "kto", "--steps", "12"],
     150),
    ("trainers-lora", ["bench_trainers.py", "--preset", "qwen3-0.6b", "--trainers", "sft", "--lora", "16",
                       "--steps", "12"], 90),
    ("sampler", ["bench_sampler.py", "--preset", "qwen3-0.6b", "--compare-transformers"], 60),
    ("sampler-lora", ["bench_sampler.py", "--preset", "qwen3-0.6b", "--lora", "16"], 60),
    ("grpo", ["bench_grpo.py", "--preset", "gpu-qwen3-0.6b", "--steps", "3", "--warmup", "1"], 90),
    ("moe", ["bench_moe.py", "--preset", "qwen3-30b-a3b", "--steps", "3"], 60),
]
CPU = [
    ("logprobs", ["bench_logprobs.py", "--preset", "cpu", "--no-torch"], 120),
    ("model", ["bench_model.py", "--preset", "cpu", "--skip-torch"], 120),
    ("sampler", ["bench_sampler.py", "--preset", "cpu", "--no-torch"], 180),
    ("grpo", ["bench_grpo.py", "--preset", "cpu-tiny", "--steps", "2", "--warmup", "1"], 300),
]


def run(name: str, args: list[str], limit: float, emit) -> None:
    start = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=limit, env=env)
        status, out, err = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timeout after {limit:.0f} s"
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            line = line[len("RESULT "):]
        if line.startswith("{"):
            try:
                emit({"bench": name, **json.loads(line)})
            except json.JSONDecodeError:
                pass
    record = {"bench": name, "status": status, "seconds": round(time.time() - start, 1)}
    if status != "ok":
        record["stderr_tail"] = err[-1500:]
    emit(record)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="run only these benchmark names")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args(argv)
    sink = open(a.out, "a") if a.out else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    import jax  # what the suite ran on
    emit({"bench": "suite", "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "jax": jax.__version__, "python": sys.version.split()[0],
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    benches = GPU if a.gpu else CPU
    failed = 0
    for name, args, limit in benches:
        if a.only and name not in a.only:
            continue
        run(name, args, limit, emit)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
