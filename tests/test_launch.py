"""launch/slurm.sbatch under a stand-in SLURM: a fake `srun` starts the job's tasks on this
machine (one per "node", each with its own CPU devices, joined by jax.distributed's own
SLURM detection) and a fake `scontrol` records what the script asks of it. SIGTERM (the
time limit or a preemption) must end in a checkpoint, a requeue and exit 0; the requeued
job (the script run again, same job id) must resume and finish without requeueing."""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE

from hmem.cli import _parser
from hmem.config import load_config

FAKE_SRUN = r'''#!/usr/bin/env bash
# Runs SLURM_NTASKS copies of the command here, with the variables srun gives each task.
out=/dev/stdout
while [[ $1 == --* ]]; do case $1 in --output=*) out=${1#--output=};; esac; shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  env > "$FAKE_SLURM_DIR/task$i.env"
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=node$i "$@" >> "${out//%N/node$i}" 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
  while :; do wait "$pid"; s=$?; kill -0 "$pid" 2>/dev/null || break; done
  [ "$s" = 0 ] || status=$s
done
exit $status
'''
STEPS = 40  # the stop lands after 3 logged steps and takes effect at the next step boundary


def _bin(tmp_path):
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  scripts = {'srun': FAKE_SRUN,
             'scontrol': '#!/usr/bin/env bash\necho "$@" >> "$FAKE_SLURM_DIR/scontrol.log"\n',
             'hmem': f'#!/usr/bin/env bash\nexec {sys.executable} -m hmem.cli "$@"\n'}
  for name, text in scripts.items():
    (bindir / name).write_text(text)
    (bindir / name).chmod(0o755)
  return bindir


def _start(repo, tmp_path, bindir, workdir, job_id):
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.update(PATH=f'{bindir}:{env["PATH"]}', HMEM=str(bindir / 'hmem'), HMEM_LOGS=str(tmp_path / 'logs'),
             FAKE_SLURM_DIR=str(tmp_path), SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME='hmem',
             SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2', SLURM_STEP_NUM_NODES='2',
             SLURM_CPUS_PER_TASK='1', SLURM_GPUS_ON_NODE='8', JAX_PLATFORMS='cpu',
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS=f'--xla_force_host_platform_device_count=4 {FAST_COMPILE}')
  return subprocess.Popen(
      ['bash', str(repo / 'launch/slurm.sbatch'), '--config', str(repo / 'configs/tiny.py'), '--workdir', str(workdir),
       '--config.memory.levels=(8,4)', f'--config.train.steps={STEPS}', '--config.train.log_every=1',
       '--config.train.checkpoint_every=1000', '--config.train.compile_cache=off'],
      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(ready, what: str, hang_s: float = 600) -> None:
  """Polls `ready` until it holds. Not a timing check: a guard against a hung launcher,
  raising only after `hang_s`."""
  give_up = time.monotonic() + hang_s
  while not ready():
    if time.monotonic() > give_up:
      raise TimeoutError(f'still waiting for {what} after {hang_s:.0f} s: hung?')
    time.sleep(0.5)


def _steps(workdir):
  path = workdir / 'metrics.jsonl'
  return [json.loads(line)['step'] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_slurm_sigterm_checkpoints_requeues_and_the_requeued_job_resumes(repo, tmp_path):
  bindir, workdir = _bin(tmp_path), tmp_path / 'run'
  job_id = random.randrange(1000, 1_000_000)
  proc = _start(repo, tmp_path, bindir, workdir, job_id)
  _wait_for(lambda: len(_steps(workdir)) >= 3 or proc.poll() is not None, 'three logged steps')
  assert proc.poll() is None, (proc.communicate()[1][-3000:], sorted(os.listdir(tmp_path / 'logs')))
  proc.send_signal(signal.SIGTERM)  # what SLURM sends the batch script (--signal=B:TERM@120)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', str(job_id)]
  stopped = max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert 3 <= stopped < STEPS and _steps(workdir)[-1] == stopped
  logs = {p: (tmp_path / 'logs' / p).read_text() for p in os.listdir(tmp_path / 'logs')}
  assert sorted(logs) == ['node0.log', 'node1.log']  # one log per host
  for i in range(2):  # each task was told to drive all 8 GPUs of its node, not GPU $SLURM_LOCALID
    task_env = dict(line.split('=', 1) for line in (tmp_path / f'task{i}.env').read_text().splitlines() if '=' in line)
    assert task_env['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3,4,5,6,7'

  (tmp_path / 'scontrol.log').unlink()
  proc = _start(repo, tmp_path, bindir, workdir, job_id)  # SLURM runs the requeued job's script again
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert not (tmp_path / 'scontrol.log').exists()  # finished: not requeued
  assert _steps(workdir) == list(range(1, STEPS + 1))  # resumed after `stopped`: no step lost or repeated
  # Process 0's log, appended across the requeue, holds both runs' summaries.
  summaries = [json.loads(line) for line in (tmp_path / 'logs' / 'node0.log').read_text().splitlines()
               if line.startswith('{"step"')]
  assert [(s['step'], s['stopped_by_signal']) for s in summaries] == [(stopped, True), (STEPS, False)]


def _jobset(repo, name):
  import yaml
  jobset = yaml.safe_load((repo / 'launch' / 'gke' / name).read_text())
  (job,) = jobset['spec']['replicatedJobs']
  pod = job['template']['spec']['template']['spec']
  (container,) = pod['containers']
  (command,) = container['args']
  argv = shlex.split(command.replace('"$PROCESS_ID"', '0'))
  assert argv[:2] == ['exec', 'hmem'], command
  args = _parser().parse_args([a for a in argv[2:] if not a.startswith('--config.')])
  load_config(str(repo / args.config), [a for a in argv if a.startswith('--config.')])  # every key exists
  return jobset, job, pod, container, args


def test_gke_jobsets_wire_jax_and_name_real_flags(repo):
  """Every flag the manifests pass exists; GPU pods get the coordinator wiring JAX needs
  (process 0's DNS name under the JobSet's headless service, the process count, the pod's
  completion index); TPU pods let JAX read GKE's TPU environment; all get time to save."""
  jobset, job, pod, container, args = _jobset(repo, 'jobset-gpu.yaml')
  spec, name = job['template']['spec'], jobset['metadata']['name']
  assert jobset['spec']['network']['enableDNSHostnames']
  host, port = args.coordinator.split(':')
  assert host == f'{name}-{job["name"]}-0-0.{name}' and {'containerPort': int(port)} in container['ports']
  assert args.num_processes == spec['parallelism'] == spec['completions'] and spec['completionMode'] == 'Indexed'
  (env,) = container['env']
  assert env['name'] == 'PROCESS_ID'
  assert env['valueFrom']['fieldRef']['fieldPath'].endswith("['batch.kubernetes.io/job-completion-index']")
  for manifest in ('jobset-gpu.yaml', 'jobset-tpu.yaml'):
    jobset, job, pod, container, args = _jobset(repo, manifest)
    assert args.command == 'train' and pod['terminationGracePeriodSeconds'] >= 120
    assert jobset['spec']['failurePolicy']['maxRestarts'] > 0  # a preempted run comes back and resumes
    assert (not args.coordinator) == args.distributed == manifest.endswith('tpu.yaml')
  chips = np.prod([int(n) for n in pod['nodeSelector']['cloud.google.com/gke-tpu-topology'].split('x')])
  assert job['template']['spec']['parallelism'] * container['resources']['limits']['google.com/tpu'] == chips


FAKE_GCLOUD = r'''#!/usr/bin/env bash
# `gcloud compute tpus tpu-vm ssh TPU --zone Z --worker=W --command CMD`: runs CMD on each
# worker (here: a HOME and a hostname of its own) and returns when CMD does, as ssh would.
set -e
[ "$1 $2 $3 $4" = "compute tpus tpu-vm ssh" ] || { echo "fake gcloud: unsupported: $*" >&2; exit 2; }
shift 5
while [ $# -gt 0 ]; do
  case $1 in --worker=*) worker=${1#--worker=};; --command) command=$2; shift;; esac; shift
done
if [ "$worker" = all ]; then workers=$(seq 0 $((FAKE_WORKERS - 1))); else workers=$worker; fi
for w in $workers; do
  # jax.distributed's SLURM detection stands in for the TPU VM's metadata server.
  HOME=$FAKE_TPU/worker$w FAKE_HOSTNAME=worker$w SLURM_PROCID=$w SLURM_LOCALID=0 bash -c "$command"
done
'''


@pytest.mark.slow
def test_tpu_vm_run_outlives_ssh_logs_per_worker_and_stop_checkpoints(repo, tmp_path):
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  for name, text in (('gcloud', FAKE_GCLOUD), ('hostname', '#!/usr/bin/env bash\necho "$FAKE_HOSTNAME"\n')):
    (bindir / name).write_text(text)
    (bindir / name).chmod(0o755)
  for w in range(2):  # what `setup` leaves on a worker: ~/hmem with its venv's hmem
    venv = tmp_path / 'tpu' / f'worker{w}' / 'hmem' / '.venv' / 'bin'
    venv.mkdir(parents=True)
    (venv / 'hmem').write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m hmem.cli "$@"\n')
    (venv / 'hmem').chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.update(PATH=f'{bindir}:{env["PATH"]}', FAKE_TPU=str(tmp_path / 'tpu'), FAKE_WORKERS='2',
             SLURM_JOB_ID=str(random.randrange(1000, 1_000_000)), SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2',
             JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS=f'--xla_force_host_platform_device_count=4 {FAST_COMPILE}', PYTHONPATH=str(repo))
  workdir, script = tmp_path / 'run', str(repo / 'launch' / 'tpu_vm.sh')
  run_args = ['--config', str(repo / 'configs/tiny.py'), '--workdir', str(workdir), f'--config.train.steps={STEPS}',
              '--config.train.log_every=1', '--config.train.checkpoint_every=1000', '--config.train.compile_cache=off']

  def launch(*argv):
    out = subprocess.run(['bash', script, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

  def pids():
    return [int((tmp_path / 'tpu' / f'worker{w}' / 'hmem' / 'logs' / 'hmem.pid').read_text()) for w in range(2)]

  def alive(pid):
    try:
      os.kill(pid, 0)
      return True
    except ProcessLookupError:
      return False

  def summaries(w):
    log = tmp_path / 'tpu' / f'worker{w}' / 'hmem' / 'logs' / f'worker{w}.log'
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"step"')]

  try:
    assert launch('run', 'tpu', 'zone', *run_args).split() == ['started', 'on', 'worker0', 'started', 'on', 'worker1']
    assert all(map(alive, pids()))  # the ssh sessions have ended; hmem runs on, detached
    _wait_for(lambda: len(_steps(workdir)) >= 3 or not all(map(alive, pids())), 'three logged steps')
    assert all(map(alive, pids()))
    launch('stop', 'tpu', 'zone')
    _wait_for(lambda: not any(map(alive, pids())), 'hmem to exit after `stop`')
    stopped = max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
    assert 3 <= stopped < STEPS and [s['stopped_by_signal'] for s in summaries(0)] == [True]
    launch('run', 'tpu', 'zone', *run_args)  # again, after a stop or a preemption: resumes
    _wait_for(lambda: not any(map(alive, pids())), 'the resumed run to finish')
    assert _steps(workdir) == list(range(1, STEPS + 1))
    # One log per worker, appended across the two runs (process 0 prints the summaries).
    assert [(s['step'], s['stopped_by_signal']) for s in summaries(0)] == [(stopped, True), (STEPS, False)]
    assert (tmp_path / 'tpu' / 'worker1' / 'hmem' / 'logs' / 'worker1.log').stat().st_size > 0
  finally:
    for pid in pids() if (tmp_path / 'tpu' / 'worker0' / 'hmem' / 'logs' / 'hmem.pid').exists() else []:
      if alive(pid):
        os.kill(pid, signal.SIGKILL)
