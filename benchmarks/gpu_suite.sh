#!/usr/bin/env bash
# Every GPU benchmark preset in one command (about 9 minutes on one H100/H200), one JSON line per figure.
#   bash benchmarks/gpu_suite.sh            # prints the lines; also writes $OUT/gpu_suite.jsonl when OUT is set
# Installs what the GPU image lacks (trl_jax itself, datasets, trl, ...) from wheels in .whl/ when that folder exists
# (no registry needed), else from the package registry.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
else
  python3 -m pip install -q "datasets>=3.0" "trl==1.16.0" 2>/dev/null || echo '{"bench": "suite", "warning": "datasets/trl not installed: TRL sides will be skipped"}'
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
out_args=()
if [ -n "${OUT:-}" ]; then out_args=(--out "$OUT/gpu_suite.jsonl"); fi
python3 benchmarks/suite.py --gpu "${out_args[@]}" "$@"
