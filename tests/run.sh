#!/usr/bin/env bash
# The README's test command: the whole suite on CPU, with 8 simulated devices for the sharding tests.
set -uo pipefail
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
export TRL_EXPERIMENTAL_SILENCE=1
python -m pytest -q "$@"  # no path given: testpaths (tests/) from pyproject.toml
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit $rc
