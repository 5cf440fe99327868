"""Multi-host: 2 processes x 4 CPU devices (JAX multi-controller over gloo, launch/local.sh)
train, checkpoint and evaluate the tiny config with memory exactly like one process with
the same 8-device mesh, and a run resumes from 2 processes onto 1 and from 1 onto 2
without losing or repeating a batch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE

from hmem.train.trainer import train

MEMORY = ('memory.levels=(8,4)', 'train.log_every=1')  # every step's loss is compared
FIRST_HALF = ('train.steps=10', 'train.schedule_steps=20')
EVAL_KEYS = ('eval_loss', 'eval_loss_generic', 'eval_loss_anchor')


def _rows(workdir) -> dict[int, dict]:
  rows = {}
  for row in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))):
    assert row['step'] not in rows or not set(rows[row['step']]) & set(row), f'step {row["step"]} logged twice'
    rows.setdefault(row['step'], {}).update(row)
  return rows


def _start(repo, workdir, *overrides):
  env = {**os.environ, 'XLA_FLAGS': FAST_COMPILE}  # launch/local.sh adds the device count
  env['PYTHON'] = sys.executable
  # No persistent cache: when one process finds a step in it and the other compiles it,
  # the first waits longer than gloo's fixed 30 s for the second at their first collective.
  return subprocess.Popen(['bash', str(repo / 'launch/local.sh'), '2', '4', '--config', str(repo / 'configs/tiny.py'),
                           '--workdir', str(workdir), *(f'--config.{o}' for o in overrides),
                           '--config.train.compile_cache=off'],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _launch(repo, workdir, *overrides):
  proc = _start(repo, workdir, *overrides)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


def _checkpoints(workdir):
  ckpts = workdir / 'checkpoints'
  return sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if ckpts.exists() else []


@pytest.fixture(scope='module')
def memory_run(make_config, tmp_path_factory):
  """The tiny config with memory, 20 steps in this process on 8 devices: the reference."""
  workdir = tmp_path_factory.mktemp('memory_run')
  train(make_config(*MEMORY), str(workdir), progress=False)
  return _rows(workdir)


def _assert_same_run(rows, reference):
  assert sorted(rows) == sorted(reference) == list(range(1, 21))
  steps = sorted(reference)
  np.testing.assert_allclose([rows[s]['loss'] for s in steps], [reference[s]['loss'] for s in steps], rtol=1e-5)
  for key in EVAL_KEYS:  # evaluated at steps 10 and 20, with the fetched, generic and no memory
    np.testing.assert_allclose([rows[s][key] for s in (10, 20)], [reference[s][key] for s in (10, 20)], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_across_process_counts(repo, make_config, memory_run, tmp_path):
  """Steps 1-10 on two processes then 11-20 on one, and the other way round. Both runs log
  every step's loss and evaluate (fetched, generic, anchor-only) at steps 10 and 20 exactly
  like the uninterrupted one-process run: two processes train, checkpoint and evaluate
  like one, and the resumed run neither skips nor repeats a batch."""
  out = _launch(repo, tmp_path / 'two_then_one', *MEMORY, *FIRST_HALF)
  summary = json.loads(out.strip().splitlines()[-1])  # printed by process 0 only
  assert summary['step'] == 10 and summary['eval_loss'] == pytest.approx(memory_run[10]['eval_loss'], rel=1e-5)
  assert os.listdir(tmp_path / 'two_then_one' / 'checkpoints') == ['10']
  train(make_config(*MEMORY), str(tmp_path / 'two_then_one'), progress=False)
  _assert_same_run(_rows(tmp_path / 'two_then_one'), memory_run)

  train(make_config(*MEMORY, *FIRST_HALF), str(tmp_path / 'one_then_two'), progress=False)
  _launch(repo, tmp_path / 'one_then_two', *MEMORY)
  _assert_same_run(_rows(tmp_path / 'one_then_two'), memory_run)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step(repo, make_config, tmp_path):
  """Only process 1 gets SIGTERM: both processes agree on a stop step, save it together (a
  collective save that one host skipped would hang the other) and exit 0; the run resumes."""
  fixed = ('train.schedule_steps=1000', 'train.checkpoint_every=5', 'train.log_every=1', 'train.eval_every=0')
  proc = _start(repo, tmp_path, 'train.steps=100000', *fixed)
  for _ in range(2400):  # 2 minutes at most
    if _checkpoints(tmp_path):
      break
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  with open(f'/proc/{proc.pid}/task/{proc.pid}/children') as f:
    workers = [int(p) for p in f.read().split()]
  assert len(workers) == 2
  os.kill(workers[1], signal.SIGTERM)
  try:
    out, err = proc.communicate(timeout=120)
  finally:  # a hang (the bug this guards against) must not leave the workers running
    for pid in workers:
      if proc.poll() is None:
        os.kill(pid, signal.SIGKILL)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])  # printed by process 0, which got no signal
  assert summary['stopped_by_signal']
  stop = summary['step']
  assert _checkpoints(tmp_path)[-1] == stop
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert rows[-1]['step'] == stop

  # Resumes (on one host, which is quicker here) from the step both saved.
  summary = train(make_config(f'train.steps={stop + 3}', *fixed), str(tmp_path), progress=False)
  assert summary['step'] == stop + 3 and not summary['stopped_by_signal']
  assert [r['step'] for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))] == list(range(1, stop + 4))


# Runs `python -m hmem.cli ...` with process 1 alone seeing one checkpoint step differently:
# its reads of the step time out, find a file missing or are refused (a CheckpointError,
# which the user must fix), or its listing of the checkpoints lacks the step.
READ_FAULT = '''
import os, runpy, sys
import orbax.checkpoint as ocp
from hmem.errors import CheckpointError
from hmem.train import checkpoint
kind, step = os.environ['HMEM_TEST_READ_FAULT'].split(':')
checkpoint.RETRY_SECONDS = 0.05
if sys.argv[sys.argv.index('--process-id') + 1] == '1':
  if kind == 'unlisted':
    listed = ocp.CheckpointManager.all_steps
    ocp.CheckpointManager.all_steps = lambda self, *a, **k: [s for s in listed(self, *a, **k) if s != int(step)]
  else:
    read = checkpoint.Checkpoints._restore
    error = {'timeout': TimeoutError, 'missing': FileNotFoundError, 'refused': CheckpointError}[kind]
    def faulty(self, s, abstract_state, items=None):
      if s == int(step):
        raise error(f'injected {kind} reading step {s}')
      return read(self, s, abstract_state, items)
    checkpoint.Checkpoints._restore = faulty
sys.argv = ['hmem'] + sys.argv[3:]  # drop "-m hmem.cli"
runpy.run_module('hmem.cli', run_name='__main__', alter_sys=True)
'''


def _inject_faults(tmp_path, monkeypatch):
  """Makes _start's processes run under READ_FAULT (set HMEM_TEST_READ_FAULT=KIND:STEP)."""
  (tmp_path / 'inject.py').write_text(READ_FAULT)
  (tmp_path / 'python').write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "inject.py"} "$@"\n')
  (tmp_path / 'python').chmod(0o755)
  monkeypatch.setattr(sys, 'executable', str(tmp_path / 'python'))  # _start's PYTHON


def _communicate(proc, timeout: float):
  """proc's (stdout, stderr); a hang past `timeout` kills its workers and fails the test."""
  try:
    return proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    with open(f'/proc/{proc.pid}/task/{proc.pid}/children') as f:
      for pid in map(int, f.read().split()):
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate()
    pytest.fail(f'the processes hung: {err[-3000:]}')


@pytest.mark.slow
def test_processes_agree_on_the_step_they_restore(repo, make_config, tmp_path, monkeypatch):
  """Checkpoints 5 and 10; process 1 alone fails to read step 10. A timeout there is
  retried, then stops both processes with one message naming the step, and step 10 is
  kept; a missing file on process 1 only makes both resume from step 5 (they step
  together to 12: a split restore would hang their first collective) and keeps step 10."""
  workdir = tmp_path / 'run'
  fixed = ('train.checkpoint_every=5', 'train.log_every=1', 'train.eval_every=0')
  train(make_config('train.steps=10', *fixed), str(workdir), progress=False)
  assert _checkpoints(workdir) == [5, 10]
  _inject_faults(tmp_path, monkeypatch)

  monkeypatch.setenv('HMEM_TEST_READ_FAULT', 'timeout:10')
  proc = _start(repo, workdir, 'train.steps=12', *fixed)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode != 0
  assert 'checkpoint step 10 in' in err and 'could not be read on process(es) [1] after 3 attempts' in err, err[-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '5']

  monkeypatch.setenv('HMEM_TEST_READ_FAULT', 'missing:10')
  out = _launch(repo, workdir, 'train.steps=12', 'train.checkpoint_every=100', 'train.log_every=1',
                'train.eval_every=0')
  assert json.loads(out.strip().splitlines()[-1])['step'] == 12
  assert [r['step'] for r in map(json.loads, open(workdir / 'metrics.jsonl'))] == list(range(1, 13))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '12', '5']


@pytest.mark.slow
def test_processes_agree_when_their_listings_differ_or_one_refuses(repo, make_config, tmp_path, monkeypatch):
  """Checkpoints 5 and 10. A CheckpointError reading step 10 on process 1 alone stops both
  processes with its one message (raised there alone, it would leave process 0 waiting in
  the outcome all-gather). Then process 1's listing lacks step 10 (an NFS directory cache,
  a step committed between the two listings): both restore step 10 all the same, and
  steps 11-12 equal a one-process run's resumed from it (process 1 restoring step 5 would
  hang or train other batches)."""
  workdir, reference = tmp_path / 'run', tmp_path / 'reference'
  fixed = ('train.checkpoint_every=5', 'train.log_every=1', 'train.eval_every=0')
  train(make_config('train.steps=10', *fixed), str(workdir), progress=False)
  assert _checkpoints(workdir) == [5, 10]
  shutil.copytree(workdir, reference)
  train(make_config('train.steps=12', *fixed), str(reference), progress=False)
  _inject_faults(tmp_path, monkeypatch)

  monkeypatch.setenv('HMEM_TEST_READ_FAULT', 'refused:10')
  proc = _start(repo, workdir, 'train.steps=12', *fixed)
  _, err = _communicate(proc, timeout=300)
  assert proc.returncode != 0
  assert err.count('hmem: error: injected refused reading step 10') == 2, err[-3000:]
  assert _checkpoints(workdir) == [5, 10]

  monkeypatch.setenv('HMEM_TEST_READ_FAULT', 'unlisted:10')
  proc = _start(repo, workdir, 'train.steps=12', *fixed)
  out, err = _communicate(proc, timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert json.loads(out.strip().splitlines()[-1])['step'] == 12
  rows, expected = _rows(workdir), _rows(reference)
  assert sorted(rows) == sorted(expected) == list(range(1, 13))
  np.testing.assert_allclose([rows[s]['loss'] for s in (11, 12)], [expected[s]['loss'] for s in (11, 12)], rtol=1e-5)
