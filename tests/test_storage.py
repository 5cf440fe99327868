"""Storage faults: a full disk and a read-only workdir stop the run with one clear line, and
leave the last good checkpoint intact (byte for byte) and restorable. The workdir is a small
tmpfs mounted for the test (needs root, as in our CI container)."""

import os
import subprocess

import pytest

from hmem.cli import main
from hmem.train.trainer import train

MEMORY = ('memory.levels=(16,16)',)


@pytest.fixture
def small_disk(tmp_path):
  mount = tmp_path / 'disk'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)], capture_output=True).returncode:
    pytest.skip('mounting a tmpfs needs root')
  yield mount
  subprocess.run(['umount', '-l', str(mount)], check=True)


def _files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = open(path, 'rb').read()
  return out


def _train_cli(repo, workdir, capsys, *overrides):
  rc = main(['train', '--config', str(repo / 'configs/tiny.py'), '--workdir', str(workdir), '--no-progress',
             *(f'--config.{o}' for o in overrides)])
  return rc, capsys.readouterr().err.strip().splitlines()[-1]


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(repo, make_config, small_disk, capsys):
  workdir = small_disk / 'run'
  train(make_config('train.steps=10', *MEMORY), str(workdir), progress=False)
  good = _files(workdir / 'checkpoints' / '10')
  free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
  with open(small_disk / 'filler', 'wb') as f:  # leaves room for metrics rows, not for a checkpoint
    f.write(b'\0' * (free - 40 * 1024))
  rc, line = _train_cli(repo, workdir, capsys, 'train.steps=20', *MEMORY)
  assert rc == 2
  assert line.startswith('hmem: error: writing a checkpoint to ') and 'No space left on device' in line
  assert 'step 10, is intact' in line
  assert _files(workdir / 'checkpoints' / '10') == good
  os.remove(small_disk / 'filler')
  assert train(make_config('train.steps=20', *MEMORY), str(workdir), progress=False)['step'] == 20
  assert sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()) == [10, 20]


def test_read_only_workdir_is_one_line_and_keeps_the_last_checkpoint(repo, make_config, small_disk, capsys):
  workdir = small_disk / 'run'
  train(make_config('train.steps=10', *MEMORY), str(workdir), progress=False)
  good = _files(workdir)
  subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
  try:
    rc, line = _train_cli(repo, workdir, capsys, 'train.steps=20', *MEMORY)
  finally:
    subprocess.run(['mount', '-o', 'remount,rw', str(small_disk)], check=True)
  assert rc == 2
  assert line.startswith('hmem: error:') and 'read-only' in line.lower()
  assert _files(workdir) == good
  assert train(make_config('train.steps=20', *MEMORY), str(workdir), progress=False)['step'] == 20
