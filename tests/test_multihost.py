"""Multi-host: 2 processes x 4 CPU devices (JAX multi-controller over gloo) train exactly like
one process with 8 devices, and a run resumes on a different number of hosts."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from hmem.train.trainer import train


def _losses(workdir):
  return {r['step']: r['loss'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if 'loss' in r}


def _start(repo, workdir, *overrides):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHON'] = sys.executable
  return subprocess.Popen(['bash', str(repo / 'launch/local.sh'), '2', '4', '--config', str(repo / 'configs/tiny.py'),
                           '--workdir', str(workdir), *overrides], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _launch(repo, workdir, *overrides):
  proc = _start(repo, workdir, *overrides)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


def _checkpoints(workdir):
  ckpts = workdir / 'checkpoints'
  return sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if ckpts.exists() else []


def test_two_processes_train_like_one(repo, tiny_run, tmp_path):
  _, single_dir, _ = tiny_run
  _launch(repo, tmp_path)
  single, multi = _losses(single_dir), _losses(tmp_path)
  assert sorted(multi) == sorted(single)
  np.testing.assert_allclose([multi[s] for s in sorted(multi)], [single[s] for s in sorted(single)], rtol=1e-5)


def test_resume_on_a_different_number_of_hosts(repo, make_config, tiny_run, tmp_path):
  """Steps 1-10 on two hosts, steps 11-20 on one: the losses of the uninterrupted run."""
  _, single_dir, _ = tiny_run
  _launch(repo, tmp_path, '--config.train.steps=10', '--config.train.schedule_steps=20')
  train(make_config(), str(tmp_path), progress=False)
  single, resumed = _losses(single_dir), _losses(tmp_path)
  np.testing.assert_allclose([resumed[s] for s in (5, 10, 15, 20)], [single[s] for s in (5, 10, 15, 20)], rtol=1e-5)


def test_sigterm_on_one_host_stops_both_at_the_same_step(repo, make_config, tmp_path):
  """Only process 1 gets SIGTERM: both processes agree on a stop step, save it together (a
  collective save that one host skipped would hang the other) and exit 0; the run resumes."""
  fixed = ('--config.train.schedule_steps=1000', '--config.train.checkpoint_every=5', '--config.train.log_every=1',
           '--config.train.eval_every=0')
  proc = _start(repo, tmp_path, '--config.train.steps=100000', *fixed)
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
  summary = train(make_config(f'train.steps={stop + 3}', *(o[len('--config.'):] for o in fixed)), str(tmp_path),
                  progress=False)
  assert summary['step'] == stop + 3 and not summary['stopped_by_signal']
  assert [r['step'] for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))] == list(range(1, stop + 4))
