"""Fault injection: kill training at random moments, resume, and demand a bitwise-equal end.

    python benchmarks/faults.py [--trials N] [--sigterm M] [--quick] [--seed S]

Runs configs/tiny.py with memory on (row-sparse bank, async checkpoints every 4 steps, a
metrics row every step). First one uninterrupted run, the reference. Then each trial:

- `kill-save` (every other trial): SIGKILL while an async checkpoint write is in flight.
  The trial's process holds its saves open (a wrapper around orbax's background commit
  thread touches a marker file, then sleeps before the commit), the driver waits for the
  marker of a randomly chosen save and kills at a random moment inside the hold; so the
  kill lands before the step directory is committed, by construction, not by luck.
- `kill-random`: SIGKILL a random time after a randomly chosen step was logged.
- `sigterm` (the `--sigterm` trials): SIGTERM after a random step; the process must save,
  exit 0 and report `stopped_by_signal`; the time from signal to exit is measured.

Every trial then resumes in a fresh process to the end, and is checked: anchor params,
anchor optimizer state, bank and bank optimizer state of the final checkpoint bitwise equal
to the reference's; metrics.jsonl has each step exactly once and the reference's values
(timings aside). `resume_s` is the resumed process's wall time, launch to exit (imports,
restore, compile from the persistent cache, and the remaining steps).

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
STEPS, SAVE_EVERY = 24, 4
OVERRIDES = (f'train.steps={STEPS}', f'train.checkpoint_every={SAVE_EVERY}', 'train.log_every=1',
             'train.eval_every=8', 'memory.levels=(16,16)')
HOLD_S = 1.0  # how long a held save stays in flight
TIMINGS = ('step_time', 'tokens_per_s', 'mfu')  # metrics that legitimately differ between runs


def _hold_async_saves(marker_dir: str, hold_s: float) -> None:
  """In a trial's process: each async checkpoint commit announces itself, then waits."""
  from orbax.checkpoint._src.checkpointers import async_checkpointer

  commit = async_checkpointer._background_wait_for_commit_futures

  def held(directory, *args, **kwargs):
    open(os.path.join(marker_dir, f'saving-{directory.name}'), 'w').close()
    time.sleep(hold_s)
    return commit(directory, *args, **kwargs)

  async_checkpointer._background_wait_for_commit_futures = held


def _child(argv: list[str]) -> int:
  """`faults.py --child WORKDIR HOLD_S [overrides]`: `hmem train`, saves held when HOLD_S > 0."""
  workdir, hold_s, overrides = argv[0], float(argv[1]), argv[2:]
  if hold_s > 0:
    _hold_async_saves(workdir, hold_s)
  from hmem.cli import main
  return main(['train', '--config', CONFIG, '--workdir', workdir, '--no-progress',
               *(f'--config.{o}' for o in overrides)])


def start(workdir: str, hold_s: float = 0.0, overrides=OVERRIDES) -> subprocess.Popen:
  os.makedirs(workdir, exist_ok=True)
  env = {'JAX_COMPILATION_CACHE_DIR': os.path.join(REPO, '.jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', **os.environ,
         'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', workdir, str(hold_s), *overrides],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> dict:
  """Waits for a run; its summary (the last stdout line), or an error with its stderr."""
  out, err = proc.communicate(timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f'hmem train exited {proc.returncode}:\n{err[-3000:]}')
  return json.loads(out.strip().splitlines()[-1])


def logged_steps(workdir: str) -> list[int]:
  """Steps of complete metrics rows (a row being written has no newline yet)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.endswith('\n')]


def _wait(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
  """Polls `ready()` every 5 ms; False if the process ended first."""
  deadline = time.monotonic() + timeout
  while not ready():
    if proc.poll() is not None:
      return False
    if time.monotonic() > deadline:
      raise TimeoutError('the trial never reached its fault point')
    time.sleep(0.005)
  return True


def _kill(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGKILL)
  proc.communicate()


def checkpoint_state(workdir: str) -> tuple[int, dict]:
  """The latest checkpoint's step and its state items as numpy trees."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  names = ('params', 'opt_state', 'bank', 'bank_opt')
  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      item_handlers={**{n: ocp.StandardCheckpointHandler() for n in names},
                     'data': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  metadata = manager.item_metadata(step)
  is_array = lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype')
  args = {n: ocp.args.StandardRestore(jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata[n],
                                                   is_leaf=is_array)) for n in names}
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  manager.close()
  return step, {n: jax.tree.map(np.asarray, restored[n]) for n in names}


def bitwise_equal(a: dict, b: dict) -> bool:
  import jax
  if a.keys() != b.keys():
    return False
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  return [p for p, _ in la] == [p for p, _ in lb] and all(
      x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
      for (_, x), (_, y) in zip(la, lb))


def metric_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def trial(kind: str, rng: random.Random, workdir: str, reference: dict, reference_rows: list[dict],
          resume=None) -> dict:
  """One fault and its recovery, checked. `resume(workdir)` replaces the resuming process
  (tests resume in-process); `resume_s` is then None."""
  result = {'kind': kind}
  if kind == 'kill-save':
    save = rng.randrange(SAVE_EVERY, STEPS + 1, SAVE_EVERY)
    proc = start(workdir, HOLD_S)
    marker = os.path.join(workdir, f'saving-{save}')
    hit = _wait(proc, lambda: os.path.exists(marker))
    time.sleep(rng.uniform(0, 0.8 * HOLD_S))
    committed = os.path.isdir(os.path.join(workdir, 'checkpoints', str(save)))
    _kill(proc)
    result.update(fault_step=save, during_save=hit and not committed)
  else:
    after = rng.randrange(1, STEPS + 1)
    proc = start(workdir)
    hit = _wait(proc, lambda: any(s >= after for s in logged_steps(workdir)))
    time.sleep(rng.uniform(0, 0.3))
    result['fault_step'] = max(logged_steps(workdir), default=0)
    if kind == 'sigterm':
      sent = time.perf_counter()
      proc.send_signal(signal.SIGTERM)
      out, err = proc.communicate(timeout=300)
      result['sigterm_exit_s'] = time.perf_counter() - sent
      summary = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {}
      # Saved where it stopped: at the signal, or at the end if the run was finishing.
      result['sigterm_ok'] = bool(proc.returncode == 0 and summary['step'] == checkpoint_state(workdir)[0]
                                  and (summary['stopped_by_signal'] or summary['step'] == STEPS))
    else:
      _kill(proc)
    result['during_save'] = False
  result['killed_before_end'] = hit
  start_s = time.perf_counter()
  if resume is None:
    finish(start(workdir))
    result['resume_s'] = time.perf_counter() - start_s
  else:
    resume(workdir)
    result['resume_s'] = None
  step, final = checkpoint_state(workdir)
  result['bitwise_equal'] = step == STEPS and bitwise_equal(final, reference)
  result['metrics_ok'] = metric_rows(workdir) == reference_rows
  return result


def run(trials: int, sigterms: int, seed: int, root: str, resume=None, reference_dir: str | None = None):
  """The reference (unless `reference_dir` holds one), then the trials; their results."""
  if reference_dir is None:
    reference_dir = os.path.join(root, 'reference')
    finish(start(reference_dir))
  _, reference = checkpoint_state(reference_dir)
  reference_rows = metric_rows(reference_dir)
  assert [r['step'] for r in reference_rows] == list(range(1, STEPS + 1)), 'the reference run logged wrong steps'
  rng = random.Random(seed)
  kinds = ['kill-save' if i % 2 == 0 else 'kill-random' for i in range(trials)] + ['sigterm'] * sigterms
  results = []
  for i, kind in enumerate(kinds):
    results.append(trial(kind, rng, os.path.join(root, f'trial{i}'), reference, reference_rows, resume))
    r = results[-1]
    resume_s = '-' if r['resume_s'] is None else f"{r['resume_s']:.1f}"
    print(f"{i:>5} {kind:>12} {r['fault_step']:>5} {str(r['during_save']):>7} {resume_s:>8} "
          f"{str(r['bitwise_equal']):>8} {str(r['metrics_ok']):>8}"
          + (f"  SIGTERM exit {r['sigterm_exit_s']:.2f} s ok={r['sigterm_ok']}" if kind == 'sigterm' else ''),
          flush=True)
  return results


def summarize(results: list[dict]) -> dict:
  kills = [r for r in results if r['kind'] != 'sigterm']
  terms = [r for r in results if r['kind'] == 'sigterm']
  resumes = [r['resume_s'] for r in results if r['resume_s'] is not None]
  return {
      'trials': len(kills),
      'kills_during_save': sum(r['during_save'] for r in kills),
      'bitwise_equal': sum(r['bitwise_equal'] for r in kills),
      'metrics_ok': sum(r['metrics_ok'] for r in kills),
      'median_resume_s': round(statistics.median(resumes), 2) if resumes else None,
      'sigterm_trials': len(terms),
      'sigterm_ok': sum(r['sigterm_ok'] and r['bitwise_equal'] and r['metrics_ok'] for r in terms),
      'median_sigterm_exit_s': round(statistics.median(r['sigterm_exit_s'] for r in terms), 2) if terms else None,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trials', type=int, default=20, help='SIGKILL trials (half during a checkpoint write)')
  parser.add_argument('--sigterm', type=int, default=4, help='SIGTERM trials')
  parser.add_argument('--quick', action='store_true', help='2 SIGKILL trials and 1 SIGTERM trial')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  trials, sigterms = (2, 1) if args.quick else (args.trials, args.sigterm)
  with tempfile.TemporaryDirectory(prefix='hmem_faults_') as root:
    print(f"{'trial':>5} {'fault':>12} {'step':>5} {'in save':>7} {'resume s':>8} {'bitwise':>8} {'metrics':>8}")
    results = run(trials, sigterms, args.seed, root)
  print(json.dumps(summarize(results)))


if __name__ == '__main__':
  if sys.argv[1:2] == ['--child']:
    sys.exit(_child(sys.argv[2:]))
  main()
