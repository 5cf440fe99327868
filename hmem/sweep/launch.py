"""Launching a sweep's runs: as local subprocesses (at most N at once) or one SLURM job each.

Every run is `hmem train` on its own workdir, so re-running a sweep is safe: a finished
run (its final checkpoint is committed) is skipped, any other one is started again and resumes
from its latest checkpoint. The local launcher records each exit status in
WORKDIR/sweep_status.json and the output in WORKDIR/train.log; the SLURM launcher records
the job id, and does not submit a run whose job is still queued or running.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

from etils import epath
from tqdm import tqdm

from hmem import resources
from hmem.errors import ConfigError
from hmem.files import open_append
from hmem.sweep.spec import Run
from hmem.train.storage import committed_steps

STATUS_FILE = 'sweep_status.json'


def train_command(sweep_file: str, run: Run, prog: tuple[str, ...] = (sys.executable, '-m', 'hmem.cli')) -> list[str]:
  return [*prog, 'train', '--config', sweep_file, '--workdir', run.workdir, '--no-progress',
          *run.args()]


def _read_status(run: Run) -> dict:
  path = epath.Path(run.workdir) / STATUS_FILE
  return json.loads(path.read_text()) if path.exists() else {}


def _write_status(run: Run, status: dict) -> None:
  (epath.Path(run.workdir) / STATUS_FILE).write_text(json.dumps(status))


def run_state(run: Run, steps: int) -> str:
  """'finished' (the checkpoint of the last step is committed), 'failed' (the last local
  attempt exited non-zero), 'unfinished' (started, stopped early: resumable) or 'not started'."""
  workdir = epath.Path(run.workdir)
  if steps in committed_steps(workdir / 'checkpoints'):
    return 'finished'
  if not workdir.is_dir():
    return 'not started'
  return 'failed' if _read_status(run).get('returncode', 0) != 0 else 'unfinished'


def _run_one(sweep_file: str, run: Run) -> int:
  workdir = epath.Path(run.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # Streamed line by line, so the log may live on any filesystem epath writes (gs://, ...).
  with open_append(workdir / 'train.log') as log, subprocess.Popen(
      train_command(sweep_file, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
    for line in proc.stdout:
      log.write(line)
      log.flush()
  returncode = proc.returncode
  _write_status(run, {'launcher': 'local', 'returncode': returncode})
  return returncode


def run_local(sweep_file: str, runs: list[Run], max_parallel: int = 1, progress: bool = True) -> dict[str, int]:
  """Runs `runs` as subprocesses, `max_parallel` at a time; returns {name: exit status}."""
  if max_parallel < 1:
    raise ConfigError(f'--max-parallel={max_parallel} must be >= 1')
  codes = {}
  with concurrent.futures.ThreadPoolExecutor(max_parallel) as pool, \
       tqdm(total=len(runs), disable=not progress, desc='sweep', unit='run') as bar:
    futures = {pool.submit(_run_one, sweep_file, run): run for run in runs}
    for future in concurrent.futures.as_completed(futures):
      codes[futures[future].name] = future.result()
      bar.update(1)
  return codes


def _job_alive(job_id: str) -> bool:
  if not shutil.which('squeue'):
    return False
  out = subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True, text=True)
  return out.returncode == 0 and out.stdout.strip() in ('PENDING', 'RUNNING', 'CONFIGURING', 'REQUEUED',
                                                        'SUSPENDED', 'COMPLETING')


def run_slurm(sweep_file: str, runs: list[Run], sbatch_script: str | None = None,
              sbatch_args: tuple[str, ...] = ()) -> dict[str, str]:
  """Submits one `sbatch launch/slurm.sbatch` job per run; returns {name: job id or 'queued'}."""
  sbatch_script = sbatch_script or resources.launcher_file('slurm.sbatch')
  if not shutil.which('sbatch'):
    raise ConfigError('--launcher slurm needs `sbatch` on PATH; run on a SLURM login node, or use --launcher local')
  jobs = {}
  for run in runs:
    previous = _read_status(run).get('job_id')
    if previous and _job_alive(previous):
      jobs[run.name] = 'queued'
      continue
    epath.Path(run.workdir).mkdir(parents=True, exist_ok=True)
    logs = os.path.abspath(run.workdir)
    cmd = ['sbatch', '--parsable', f'--job-name=hmem-{run.name}'[:120], f'--output={logs}/slurm-%j.log',
           f'--export=ALL,HMEM_LOGS={logs}/logs', *sbatch_args, sbatch_script,
           '--config', sweep_file, '--workdir', run.workdir, *run.args()]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
      raise ConfigError(f'sbatch failed for run {run.name}: {out.stderr.strip()}')
    job_id = out.stdout.strip().split(';')[0]
    _write_status(run, {'launcher': 'slurm', 'job_id': job_id})
    jobs[run.name] = job_id
  return jobs
