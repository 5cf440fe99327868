#!/usr/bin/env bash
# Runs hmem on every worker of a TPU VM slice; jax.distributed.initialize() finds its peers.
#   launch/tpu_vm.sh TPU_NAME ZONE --config configs/160m.py --workdir /mnt/shared/runs/160m
# The workdir must be a filesystem every worker mounts (NFS, Filestore, gcsfuse).
set -euo pipefail
tpu=$1; zone=$2; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd ~/hmem && .venv/bin/hmem train --distributed --no-progress $args"
