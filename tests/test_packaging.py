"""`pip install .` (not editable) gives a working `hmem` outside the repository: configs and
launcher files ship in the wheel and are found by name."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from hmem import resources


def test_names_resolve_to_the_shipped_files(repo, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  configs = repo / 'configs'
  assert resources.config_file('160m') == str(configs / '160m.py')
  assert resources.config_file('configs/tiny.py') == str(configs / 'tiny.py')
  assert resources.config_file('paper/a2') == str(configs / 'paper' / 'a2.py')
  assert resources.config_file('sweeps/tiny') == str(configs / 'sweeps' / 'tiny.py')
  assert resources.config_file('nonesuch') is None
  assert resources.launcher_file('slurm.sbatch') == str(repo / 'launch' / 'slurm.sbatch')
  (tmp_path / '160m').write_text('')  # a path that exists is the user's, not ours
  assert resources.config_file('160m') == '160m'


@pytest.fixture(scope='module')
def installed(repo, tmp_path_factory):
  """A fresh venv holding the hmem wheel built from this tree, over the test venv's packages
  (so the install needs no network): its bin directory."""
  tmp = tmp_path_factory.mktemp('wheel')
  src = tmp / 'src'
  src.mkdir()
  for name in ('setup.py', 'setup.cfg', 'pyproject.toml', 'README.md', 'hmem-lm-eval.pth'):
    shutil.copy(repo / name, src / name)
  for name in ('hmem', 'configs', 'launch'):
    shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns('__pycache__'))
  pip = [sys.executable, '-m', 'pip']
  subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-q', str(src), '-w', str(tmp / 'dist')],
                 check=True, capture_output=True)
  env_dir = tmp / 'venv'
  venv.create(env_dir, with_pip=False)
  clean = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # no other hmem in sight
  subprocess.run([*pip, '--python', str(env_dir / 'bin' / 'python'), 'install', '--no-deps', '-q',
                  *map(str, (tmp / 'dist').glob('*.whl'))], check=True, capture_output=True, env=clean)
  # Then the test venv's packages, as a plain path: its .pth files (the editable hmem) stay unread.
  purelib = sysconfig.get_path('purelib', vars={'base': str(env_dir), 'platbase': str(env_dir)})
  with open(f'{purelib}/test_venv.pth', 'w') as f:
    f.write(sysconfig.get_path('purelib') + '\n')
  return env_dir / 'bin'


@pytest.mark.slow
def test_an_installed_wheel_runs_outside_the_repository(installed, tmp_path):
  env = {'PATH': f'{installed}:/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu', 'HOME': str(tmp_path)}
  run = lambda *argv: subprocess.run([str(installed / 'hmem'), *argv], cwd=tmp_path, env=env, capture_output=True,
                                     text=True)
  out = run('sizes', '--config', '160m')
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.splitlines()[-1])['anchor_params'] == 163_510_016
  out = run('sweep', 'run', 'sweeps/paper_table7', '--dry-run')
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert json.loads(lines[-1])['runs'] == 10
  # The runs load the packaged sweep file, not the repository's.
  assert f'{installed.parent}/lib/' in lines[0] and '/site-packages/hmem/configs/sweeps/paper_table7.py' in lines[0]
  out = run('--version')
  assert out.stdout.strip() == 'hmem 0.1.0'
