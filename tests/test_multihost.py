"""Multi-host: 2 processes x 4 CPU devices (JAX multi-controller over gloo) train exactly like
one process with 8 devices, and a run resumes on a different number of hosts."""

import json
import os
import subprocess
import sys

import numpy as np

from hmem.train.trainer import train


def _losses(workdir):
  return {r['step']: r['loss'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if 'loss' in r}


def _launch(repo, workdir, *overrides):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHON'] = sys.executable
  out = subprocess.run(['bash', str(repo / 'launch/local.sh'), '2', '4', '--config', str(repo / 'configs/tiny.py'),
                        '--workdir', str(workdir), *overrides], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


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
