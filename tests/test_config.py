"""Config files, overrides and the CLI's one-line errors."""

import json
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from hmem.cli import main
from hmem.config import apply_overrides, default_config, load_config
from hmem.errors import ConfigError
from hmem.sweep import spec


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


def test_cli_prints_one_line_and_no_traceback(capsys):
  code, _, err = _main(capsys, 'sizes', '--config', TINY, '--config.train.stpes=3')
  assert code == 2
  assert err == ["hmem: error: unknown config key 'train.stpes'; did you mean train.steps, train.eps, train.seed?"]


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


def test_cli_reports_a_config_syntax_error_in_one_line(tmp_path, capsys):
  path = tmp_path / 'broken.py'
  path.write_text('from hmem.config import default_config\n\ndef get_config()\n  return default_config()\n')
  code, _, lines = _main(capsys, 'sizes', '--config', str(path))
  assert code == 2
  assert len(lines) == 1 and lines[0].startswith('hmem: error: config file') and 'line 3' in lines[0], lines


# --- CLI conventions an absl / ml_collections user expects

TINY = str(REPO / 'configs' / 'tiny.py')


def _main(capsys, *argv) -> tuple[int, list[str], list[str]]:
  code = main(list(argv))
  out = capsys.readouterr()
  return code, out.out.splitlines(), out.err.splitlines()


def test_a_space_separated_override_is_one_override(capsys):
  code, out, _ = _main(capsys, 'config', '--config', TINY, '--config.model.layers', '4', '--config.memory.levels',
                       '(8, 4)', '--json')
  cfg = json.loads('\n'.join(out))
  assert code == 0 and cfg['model']['layers'] == 4 and cfg['memory']['levels'] == [8, 4]


def test_hmem_config_prints_overrides_that_paste_back(capsys):
  code, out, _ = _main(capsys, 'config', '--config', TINY, '--config.data.text_field=body text',
                       '--config.memory.levels=(8,4)', '--config.data.path=2024', '--config.model.norm=rmsnorm')
  assert code == 0 and all(line.startswith(("--config.", "'--config.")) for line in out)
  pasted = [arg for line in out for arg in shlex.split(line)]
  assert len(pasted) == len(out)
  again = load_config(TINY, pasted)
  assert again.to_dict() == load_config(TINY, ['data.text_field=body text', 'memory.levels=(8,4)',
                                               'data.path=2024', 'model.norm=rmsnorm']).to_dict()
  assert again.data.path == '2024' and again.mesh.rules == default_config().mesh.rules


def test_hmem_version(capsys):
  with pytest.raises(SystemExit) as info:
    main(['--version'])
  assert info.value.code == 0 and re.fullmatch(r'hmem \S+', capsys.readouterr().out.strip())


@pytest.mark.parametrize('body, message', [
    ('def get_config():\n  raise ValueError("no such anchor")\n',
     r"hmem: error: config file '.*bad.py' line 2 raised ValueError: no such anchor"),
])
def test_a_config_whose_get_config_raises_is_one_line(capsys, tmp_path, body, message):
  (tmp_path / 'bad.py').write_text(body)
  code, _, err = _main(capsys, 'sizes', '--config', str(tmp_path / 'bad.py'))
  assert code == 2 and len(err) == 1 and re.fullmatch(message, err[0]), err


def test_a_sweep_file_with_a_syntax_error_is_one_line(capsys, tmp_path):
  (tmp_path / 'bad.py').write_text('def sweep(:\n  yield {}\n')
  code, _, err = _main(capsys, 'sweep', 'run', str(tmp_path / 'bad.py'), '--dry-run')
  assert code == 2 and len(err) == 1 and re.fullmatch(r"hmem: error: sweep file '.*bad.py' line 1: .*", err[0]), err


def test_plan_on_a_platform_that_is_absent_is_one_line():
  out = subprocess.run([sys.executable, '-m', 'hmem.cli', 'plan', '--config', TINY, '--devices', '2', '--platform',
                        'gpu'], capture_output=True, text=True)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith('hmem: error: --platform gpu: no such '), lines


def test_train_stopped_by_a_config_error_leaves_no_workdir(capsys, tmp_path):
  code, _, err = _main(capsys, 'train', '--config', TINY, '--workdir', str(tmp_path / 'run'),
                       '--config.data.source=prepared')
  assert code == 2 and 'data.path' in err[0]
  assert not (tmp_path / 'run').exists()


def test_sweep_dry_run_prints_commands_that_run_as_printed(capsys, tmp_path):
  sweep = tmp_path / 'grid.py'
  sweep.write_text("from hmem.config import default_config\nget_config = default_config\n"
                   "def sweep():\n  yield {'memory.levels': (8, 4), 'data.text_field': \"it's\"}\n")
  root = tmp_path / 'runs with space'
  code, out, _ = _main(capsys, 'sweep', 'run', str(sweep), '--dry-run', '--root', str(root))
  workdir, state, command = out[0].split('  ', 2)
  argv = shlex.split(command)
  run = spec.expand(str(sweep), str(root))[0]
  assert code == 0 and state == '[not started]'
  assert argv == ['hmem', 'train', '--config', str(sweep), '--workdir', run.workdir, '--no-progress', *run.args()]
  assert workdir == run.workdir and load_config(argv[3], argv[7:]).data.text_field == "it's"
