"""Config files, overrides and the CLI's one-line errors."""

import json
import subprocess
import sys

import pytest

from hmem.config import apply_overrides, default_config, load_config
from hmem.errors import ConfigError


def test_overrides_parse_to_the_field_types():
  cfg = default_config()
  apply_overrides(cfg, ['--config.train.steps=7', '--config.train.lr=1', 'model.norm=rmsnorm',
                        '--config.memory.levels=(256,64,16,0)', '--config.model.qk_norm=false'])
  assert cfg.train.steps == 7 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
  assert cfg.model.norm == 'rmsnorm' and cfg.memory.levels == (256, 64, 16, 0)
  assert cfg.model.qk_norm is False


@pytest.mark.parametrize('override, expected', [
    ('--config.train.stpes=3', "unknown config key 'train.stpes'; did you mean train.steps"),
    ('--config.train.steps=abc', "config key 'train.steps' expects int"),
    ('--config.model.qk_norm=3', "config key 'model.qk_norm' expects bool"),
    ('--config.train.steps', 'has no value'),
])
def test_bad_overrides_name_the_key(override, expected):
  with pytest.raises(ConfigError, match=expected.replace('(', r'\(')):
    apply_overrides(default_config(), [override])


def test_missing_config_file_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match='not found'):
    load_config(str(tmp_path / 'nope.py'))


def test_cli_prints_one_line_and_no_traceback(repo):
  out = subprocess.run([sys.executable, '-m', 'hmem.cli', 'sizes', '--config', str(repo / 'configs/tiny.py'),
                        '--config.train.stpes=3'], capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "hmem: error: unknown config key 'train.stpes'; did you mean train.steps, train.eps, train.seed?"]


@pytest.mark.parametrize('name, anchor', [('160m', 163_510_016), ('410m', 411_665_408), ('1b', 1_439_893_504)])
def test_paper_anchor_sizes_are_exact(repo, name, anchor):
  out = subprocess.run([sys.executable, '-m', 'hmem.cli', 'sizes', '--config', str(repo / f'configs/{name}.py')],
                       capture_output=True, text=True, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1])['anchor_params'] == anchor


@pytest.mark.parametrize('body, message', [
    ('def get_config(:\n  pass\n', r"line 1: invalid syntax"),
    ('from hmem.config import default_config\n\ndef get_config():\n  return default_config()\n\nx = 1 / 0\n',
     r'line 6 raised ZeroDivisionError'),
])
def test_a_broken_config_file_names_its_line(tmp_path, body, message):
  path = tmp_path / 'broken.py'
  path.write_text(body)
  with pytest.raises(ConfigError, match=f'broken.py.*{message}'):
    load_config(str(path))


def test_cli_reports_a_config_syntax_error_in_one_line(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text('from hmem.config import default_config\n\ndef get_config()\n  return default_config()\n')
  out = subprocess.run([sys.executable, '-m', 'hmem.cli', 'sizes', '--config', str(path)], capture_output=True,
                       text=True)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('hmem: error: config file') and 'line 3' in lines[0], lines
