"""Resuming a run: damaged metrics, changed configs, damaged checkpoints."""

import json
import logging
import os
import shutil

import pytest

from hmem.errors import CheckpointError, ConfigError
from hmem.files import as_path
from hmem.train import resume
from hmem.train.metrics import MetricsWriter
from hmem.train.trainer import train


@pytest.fixture(params=['local', 'gs'])
def workdir(request, tmp_path):
  """A workdir on local disk and on an object store (a fake gs://, tests/object_store.py)."""
  if request.param == 'local':
    return as_path(tmp_path)
  request.getfixturevalue('gcs')
  return as_path('gs://bucket/run')


def _rows(steps) -> str:
  return ''.join(json.dumps({'step': step, 'loss': 1.0 / step}) + '\n' for step in steps)


def _steps(workdir):
  return [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('cut, kept', [(1, [1, 2]), (7, [1, 2]), (-1, [1, 2, 3])])
def test_a_truncated_last_metrics_line_is_dropped_on_resume(workdir, cut, kept):
  """A kill during a write leaves part of a line: `cut` bytes of it (dropped), or all but
  its newline (a whole row: kept, and the next row starts on a line of its own)."""
  text = _rows([1, 2, 3])
  last = len(json.dumps({'step': 3, 'loss': 1.0 / 3})) + 1
  (workdir / 'metrics.jsonl').write_text(text[:len(text) - last + cut if cut > 0 else len(text) + cut])
  writer = MetricsWriter(str(workdir), resume_step=3)
  writer.write(4, {'loss': 0.5})
  writer.close()
  assert _steps(workdir) == kept + [4]


def test_resume_drops_the_rows_after_the_checkpoint(workdir):
  (workdir / 'metrics.jsonl').write_text(_rows([1, 2, 3, 4]))
  writer = MetricsWriter(str(workdir), resume_step=2)
  writer.write(3, {'loss': 0.5})
  writer.close()
  assert _steps(workdir) == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_an_error(workdir):
  (workdir / 'metrics.jsonl').write_text(_rows([1, 2, 3]).replace('"step": 2', '"st'))
  with pytest.raises(CheckpointError, match='metrics.jsonl line 2'):
    MetricsWriter(str(workdir), resume_step=3)


# --- a run resumed under a changed config

def _copy_run(tiny_run, tmp_path):
  _, workdir, _ = tiny_run
  shutil.copytree(workdir, tmp_path / 'run')
  return tmp_path / 'run'


def test_resume_refuses_shape_and_data_changes_in_one_message(make_config, tiny_run, tmp_path):
  workdir = _copy_run(tiny_run, tmp_path)
  config_json = (workdir / 'config.json').read_text()
  cfg = make_config('model.d_model=32', 'train.seed=1', 'train.steps=30')
  with pytest.raises(ConfigError) as info:
    train(cfg, str(workdir), progress=False)
  message = str(info.value)
  assert 'model.d_model 64 -> 32' in message and 'train.seed 0 -> 1' in message
  assert 'train.steps' not in message and 'delete' not in message
  assert (workdir / 'config.json').read_text() == config_json
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']


def test_resume_allows_and_records_cadence_changes(make_config, tiny_run, tmp_path, caplog):
  workdir = _copy_run(tiny_run, tmp_path)
  cfg = make_config('train.steps=22', 'train.log_every=1', 'train.checkpoint_every=1', 'train.eval_every=0')
  with caplog.at_level(logging.WARNING):
    summary = train(cfg, str(workdir), progress=False)
  expected = {'train.steps': [20, 22], 'train.log_every': [5, 1], 'train.checkpoint_every': [10, 1],
              'train.eval_every': [10, 0]}
  assert summary['step'] == 22 and summary['config_changes'] == expected
  assert 'train.steps 20 -> 22' in caplog.text and 'schedules now end at step 22 instead of 20' in caplog.text
  history = [json.loads(line) for line in open(workdir / 'config_changes.jsonl')]
  assert history == [{'step': 20, 'changes': expected}]
  assert json.loads((workdir / 'config.json').read_text())['train']['steps'] == 22
  assert [r['step'] for r in map(json.loads, open(workdir / 'metrics.jsonl')) if 'loss' in r][-3:] == [20, 21, 22]


# --- a damaged newest checkpoint

def _truncate_largest_file(step_dir):
  largest = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(make_config, tiny_run, tmp_path, caplog):
  from test_train import _assert_trees_equal, _params
  _, full_dir, _ = tiny_run
  workdir = _copy_run(tiny_run, tmp_path)
  _truncate_largest_file(workdir / 'checkpoints' / '20')
  with caplog.at_level(logging.WARNING):
    summary = train(make_config(), str(workdir), progress=False)
  assert 'checkpoint step 20' in caplog.text and 'resuming from step 10' in caplog.text
  assert summary['step'] == 20
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20', '20.unreadable']
  # Steps 11-20 trained again from step 10 give the uninterrupted run's parameters.
  _assert_trees_equal(_params(workdir, 20), _params(full_dir, 20))


def test_no_readable_checkpoint_is_an_error_and_nothing_is_renamed(make_config, tiny_run, tmp_path):
  workdir = _copy_run(tiny_run, tmp_path)
  for step in ('10', '20'):
    _truncate_largest_file(workdir / 'checkpoints' / step)
  with pytest.raises(CheckpointError,
                     match=r'no checkpoint in .* can be restored \(on every process\); the newest, step 20'):
    train(make_config(), str(workdir), progress=False)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']


def test_transient_read_errors_are_retried_and_never_rename_a_step(make_config, tiny_run, tmp_path, monkeypatch):
  """A timeout reading the newest step is retried (the run resumes from it once the read
  succeeds); one that persists stops the run naming the step, and nothing is set aside."""
  from hmem.train import checkpoint
  workdir = _copy_run(tiny_run, tmp_path)
  monkeypatch.setattr(checkpoint, 'RETRY_SECONDS', 0.0)
  read, failures = checkpoint.Checkpoints._restore, []

  def flaky(self, step, abstract_state, items=None):
    if step == 20 and len(failures) < fail_times:
      failures.append(step)
      raise ValueError('DEADLINE_EXCEEDED: reading tensorstore chunk timed out')
    return read(self, step, abstract_state, items)

  monkeypatch.setattr(checkpoint.Checkpoints, '_restore', flaky)
  fail_times = checkpoint.READ_ATTEMPTS
  with pytest.raises(CheckpointError, match='checkpoint step 20 in .* could not be read on process.* after 3 attempts'):
    train(make_config(), str(workdir), progress=False)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']
  failures.clear()
  fail_times = checkpoint.READ_ATTEMPTS - 1
  summary = train(make_config('train.steps=21', 'train.log_every=1'), str(workdir), progress=False)
  assert summary['step'] == 21 and len(failures) == 2
  assert _steps(workdir) == [5, 10, 15, 20, 21]  # resumed from step 20


@pytest.mark.parametrize('error, transient', [
    (TimeoutError('read timed out'), True), (MemoryError(), True), (OSError(5, 'Input/output error'), True),
    (ValueError('RESOURCE_EXHAUSTED: out of memory while reading'), True),
    (FileNotFoundError(2, 'No such file'), False), (ValueError('NOT_FOUND: Error opening "zarr" driver'), False),
    (ValueError('DATA_LOSS: Error reading: unexpected end of chunk'), False), (CheckpointError('has no bank'), False),
])
def test_read_errors_split_into_transient_and_damage(error, transient):
  from hmem.train.storage import transient_read_error
  wrapped = CheckpointError('restore failed')
  wrapped.__cause__ = error
  assert transient_read_error(error) is transient and transient_read_error(wrapped) is transient


# --- which changes stop a resume: derived from the schema and the state, not hand-kept

def _saved(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


@pytest.mark.parametrize('override, shown', [
    ('model.rope_scaling.type=linear', "model.rope_scaling.type 'none' -> 'linear'"),
    ('model.rope_scaling.factor=4.0', 'model.rope_scaling.factor 1.0 -> 4.0'),
    ('model.qkv_bias=True', 'model.qkv_bias False -> True'),
    ('memory.generic_prob=0.0', 'memory.generic_prob -1.0 -> 0.0'),
])
def test_function_and_structure_changes_stop_a_resume(make_config, override, shown):
  """Each of these once resumed (another function) or failed late in orbax's restore."""
  saved = _saved(make_config('memory.levels=(8, 4)'))
  with pytest.raises(ConfigError, match='cannot resume') as info:
    resume.config_changes(saved, make_config('memory.levels=(8, 4)', override), step=10)
  assert shown in str(info.value)


def test_generic_prob_to_zero_names_the_state_change(make_config):
  saved = _saved(make_config('memory.levels=(8, 4)'))
  with pytest.raises(ConfigError, match=r'the train state would change \(\d+ arrays: .*generic.*-> absent'):
    resume.config_changes(saved, make_config('memory.levels=(8, 4)', 'memory.generic_prob=0.0'), step=10)


def test_a_safe_key_that_changes_the_state_still_stops_a_resume(make_config, monkeypatch):
  """The structure check does not trust the safe list: declaring the layer count safe
  still refuses a change to it, by the state's shapes."""
  monkeypatch.setattr(resume, 'SAFE', resume.SAFE | {'model.layers'})
  with pytest.raises(ConfigError, match=r'the train state would change') as info:
    resume.config_changes(_saved(make_config()), make_config('model.layers=3'), step=10)
  assert 'model.layers' not in str(info.value)


def test_a_key_new_to_the_model_section_is_fixed_without_being_listed(make_config, monkeypatch):
  import hmem.config
  schema = hmem.config.default_config

  def with_knob():
    c = schema()
    c.model.new_knob = 1.0
    return c

  monkeypatch.setattr(hmem.config, 'default_config', with_knob)
  monkeypatch.setattr(resume, 'default_config', with_knob)
  saved, cfg = _saved(make_config()), make_config()
  saved['model']['new_knob'] = 1.0
  cfg.model.new_knob = 2.0
  with pytest.raises(ConfigError, match='model.new_knob 1.0 -> 2.0'):
    resume.config_changes(saved, cfg, step=10)


def test_safe_and_cadence_changes_resume(make_config):
  saved = _saved(make_config('memory.levels=(8, 4)'))
  cfg = make_config('memory.levels=(8, 4)', 'model.remat=full', 'memory.lr=3e-4', 'train.steps=40', 'mesh.data=2')
  assert resume.config_changes(saved, cfg, step=10) == {
      'memory.lr': (1e-4, 3e-4), 'mesh.data': (-1, 2), 'model.remat': ('none', 'full'), 'train.steps': (20, 40)}


def test_a_key_added_since_the_checkpoint_counts_as_its_default(make_config):
  saved = _saved(make_config())
  del saved['model']['qkv_bias']
  assert resume.config_changes(saved, make_config(), step=10) == {}
  with pytest.raises(ConfigError, match='model.qkv_bias False -> True'):
    resume.config_changes(saved, make_config('model.qkv_bias=True'), step=10)


def test_resume_refuses_a_rope_scaling_change(make_config, tiny_run, tmp_path):
  """End to end: this resumed silently, a different function under the same parameters."""
  workdir = _copy_run(tiny_run, tmp_path)
  cfg = make_config('model.rope_scaling.type=linear', 'model.rope_scaling.factor=2.0', 'train.steps=22')
  with pytest.raises(ConfigError, match="model.rope_scaling.factor 1.0 -> 2.0, model.rope_scaling.type 'none'"):
    train(cfg, str(workdir), progress=False)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']
