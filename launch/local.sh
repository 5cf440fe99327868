#!/usr/bin/env bash
# Runs `hmem train` as N local processes, each with its own CPU devices, joined by JAX's
# multi-controller runtime over gloo: a multi-host run on one machine (for testing).
# PYTHON picks the interpreter (default python3).
#   launch/local.sh N DEVICES_PER_PROCESS --config configs/tiny.py --workdir runs/multi [--config.x=y ...]
set -euo pipefail
n=$1; per=$2; shift 2
port=$((20000 + RANDOM % 20000))
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$per"  # keeps the caller's flags
export GLIBC_TUNABLES=${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1  # see quickstart.sh
pids=()
for ((i = 0; i < n; i++)); do
  "${PYTHON:-python3}" -m hmem.cli train "$@" --no-progress --coordinator "127.0.0.1:$port" --num-processes "$n" --process-id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
