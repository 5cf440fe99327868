"""`train` checks its input before any expensive work: a bad data path, a workdir it
cannot write, a paper config without data each fail in one line, before the state exists."""

import pytest

from hmem.config import load_config
from hmem.errors import CheckpointError, DataError
from hmem.train import trainer


@pytest.fixture
def no_state(monkeypatch):
  """Fails the test if train gets as far as building the state."""
  def forbidden(*args, **kwargs):
    raise AssertionError('the train state was built before the input was checked')
  monkeypatch.setattr(trainer, 'state_spec', forbidden)


def test_a_missing_dataset_fails_before_the_state_is_built(make_config, tmp_path, no_state):
  cfg = make_config('data.source=prepared', f'data.path={tmp_path / "nope"}')
  with pytest.raises(DataError, match='does not exist'):
    trainer.train(cfg, str(tmp_path / 'run'), progress=False)


def test_an_unwritable_workdir_fails_before_the_state_is_built(make_config, tmp_path, no_state):
  (tmp_path / 'file').write_text('')
  with pytest.raises(CheckpointError, match='is not writable'):
    trainer.train(make_config(), str(tmp_path / 'file' / 'run'), progress=False)


@pytest.mark.parametrize('name', ['160m', '410m', '1b'])
def test_paper_configs_require_a_prepared_dataset(repo, tmp_path, no_state, name):
  cfg = load_config(str(repo / 'configs' / f'{name}.py'))
  assert cfg.data.source == 'prepared'
  with pytest.raises(DataError, match='data.path is empty'):
    trainer.train(cfg, str(tmp_path), progress=False)
