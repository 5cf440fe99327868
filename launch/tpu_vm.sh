#!/usr/bin/env bash
# hmem on every worker of a Cloud TPU VM slice (jax.distributed.initialize() finds the peers).
#   launch/tpu_vm.sh setup TPU ZONE            copy this checkout (git HEAD) to ~/hmem on every worker
#                                              and install it into ~/hmem/.venv (Python 3.11 + jax[tpu])
#   launch/tpu_vm.sh run TPU ZONE ARGS...      start `hmem train --distributed ARGS` on every worker,
#                                              detached, so it survives the ssh session closing;
#                                              each worker logs to ~/hmem/logs/<hostname>.log
#   launch/tpu_vm.sh logs TPU ZONE [WORKER]    the end of worker WORKER's log (default 0)
#   launch/tpu_vm.sh stop TPU ZONE             SIGTERM every worker's hmem: it checkpoints and exits
# The workdir must be a filesystem every worker mounts (NFS, Filestore, gcsfuse). Running
# `run` again after a stop or a preemption resumes from the workdir's last checkpoint.
set -euo pipefail
action=$1; tpu=$2; zone=$3; shift 3
on_workers() {  # on_workers WORKERS COMMAND
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker="$1" --command "$2"
}
case $action in
  setup)
    archive=$(mktemp --suffix .tar.gz)
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$tpu":hmem.tar.gz --zone "$zone" --worker=all
    # TPU VM images ship Python 3.10; uv installs a 3.11 interpreter beside it.
    on_workers all 'set -e; rm -rf ~/hmem && mkdir -p ~/hmem && tar xzf ~/hmem.tar.gz -C ~/hmem && cd ~/hmem
      python3 -m pip install --quiet --user uv
      python3 -m uv venv --python 3.11 .venv
      python3 -m uv pip install --quiet --python .venv/bin/python -e . "jax[tpu]"
      .venv/bin/python -c "import jax; print(jax.device_count(), jax.devices()[0].device_kind)"'
    ;;
  run)
    args=$(printf '%q ' "$@")
    # The braces keep `&` to hmem alone: ssh returns at once, and the pid file is hmem's.
    on_workers all "cd ~/hmem && mkdir -p logs && { nohup setsid .venv/bin/hmem train --distributed --no-progress \
      $args >> logs/\$(hostname).log 2>&1 < /dev/null & echo \$! > logs/hmem.pid; } && echo started on \$(hostname)"
    ;;
  logs)
    on_workers "${1:-0}" 'tail -n 40 ~/hmem/logs/$(hostname).log'
    ;;
  stop)
    on_workers all 'kill -TERM "$(cat ~/hmem/logs/hmem.pid)" 2>/dev/null || true'
    ;;
  *)
    echo "usage: $0 setup|run|logs|stop TPU ZONE [ARGS...]" >&2
    exit 2
    ;;
esac
