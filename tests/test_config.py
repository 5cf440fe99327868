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
