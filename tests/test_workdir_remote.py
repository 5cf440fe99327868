"""A training workdir on an object store (the fake gs:// of tests/object_store.py): metrics,
TensorBoard events, config records and checkpoints, through the same code as a local one."""

import json
import struct

import pytest
from conftest import assert_trees_close, saved_items
from test_resume import _truncate_largest_file

from hmem.errors import CheckpointError
from hmem.files import as_path
from hmem.train import trainer
from hmem.train.checkpoint import Checkpoints
from hmem.train.metrics import MetricsWriter
from hmem.train.storage import committed_steps

RUN = 'gs://bucket/run'


def _events(directory):
  """[(tag, step, value)] of the scalars in the one event file under `directory`, each
  record's checksums verified."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  [path] = as_path(directory).glob('events.out.tfevents.*')
  data, at, scalars = path.read_bytes(), 0, []
  while at < len(data):
    header = data[at:at + 8]
    (length,), (header_crc,) = struct.unpack('Q', header), struct.unpack('I', data[at + 8:at + 12])
    record = data[at + 12:at + 12 + length]
    (record_crc,) = struct.unpack('I', data[at + 12 + length:at + 16 + length])
    assert header_crc == masked_crc32c(header) and record_crc == masked_crc32c(record)
    event = event_pb2.Event.FromString(record)
    scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    at += 16 + length
  return scalars


def test_metrics_and_tensorboard_events_on_an_object_store(gcs):
  path = as_path(RUN) / 'metrics.jsonl'
  # Each flush rewrites the whole object, so rows wait for the interval or an explicit
  # flush (the trainer's, before each checkpoint); with no interval each row goes at once.
  writer = MetricsWriter(RUN)
  assert writer.flush_every_s == 30
  writer.write(1, {'loss': 1.0, 'lr': 0.5})
  assert not path.exists()  # nothing flushed yet
  writer.flush()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1]
  writer.flush_every_s = 0
  for step in (2, 3):
    writer.write(step, {'loss': 1.0 / step, 'lr': 0.5})
    assert json.loads(path.read_text().splitlines()[-1])['step'] == step
  writer.close()
  rows = [json.loads(line) for line in (gcs / 'bucket' / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert rows == [{'step': s, 'loss': 1.0 / s, 'lr': 0.5} for s in (1, 2, 3)]
  expected = [(name, s, pytest.approx(value, rel=1e-6)) for s in (1, 2, 3)
              for name, value in (('loss', 1.0 / s), ('lr', 0.5))]
  assert _events(f'{RUN}/tensorboard') == expected
  # A new run (no resume) starts the metrics afresh.
  MetricsWriter(RUN).close()
  assert (as_path(RUN) / 'metrics.jsonl').read_text() == ''


def test_config_records_on_an_object_store(gcs, make_config):
  cfg = make_config('train.steps=22')
  trainer._record_config(cfg, RUN, 20, {'train.steps': (20, 22)})
  trainer._record_config(cfg, RUN, 22, {'train.log_every': (5, 1)})
  run = gcs / 'bucket' / 'run'
  assert json.loads((run / 'config.json').read_text()) == json.loads(cfg.to_json_best_effort())
  assert [json.loads(line) for line in (run / 'config_changes.jsonl').read_text().splitlines()] == [
      {'step': 20, 'changes': {'train.steps': [20, 22]}}, {'step': 22, 'changes': {'train.log_every': [5, 1]}}]


def test_train_killed_and_resumed_on_an_object_store(gcs, make_config):
  """A run on gs:// whose newest checkpoint was not committed (killed while writing it), or
  is damaged, resumes from the previous one and ends where the uninterrupted run did."""
  overrides = ('train.steps=4', 'train.checkpoint_every=2', 'train.eval_every=0')
  trainer.train(make_config(*overrides, 'train.log_every=1'), RUN, progress=False)
  checkpoints = gcs / 'bucket' / 'run' / 'checkpoints'
  assert committed_steps(f'{RUN}/checkpoints') == [2, 4]
  uninterrupted = saved_items(checkpoints.parent, 4)
  # An object store has no rename: orbax writes a step in place and its commit marker last.
  (checkpoints / '4' / 'commit_success.txt').unlink()
  assert committed_steps(f'{RUN}/checkpoints') == [2]
  # Logging every 2 steps now: the rows show where it resumed (step 2's, kept, then step 4's).
  summary = trainer.train(make_config(*overrides, 'train.log_every=2'), RUN, progress=False)
  assert summary['step'] == 4 and summary['config_changes'] == {'train.log_every': [1, 2]}
  assert committed_steps(f'{RUN}/checkpoints') == [2, 4]
  run = gcs / 'bucket' / 'run'
  assert [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 4]
  assert json.loads((run / 'config_changes.jsonl').read_text()) == {'step': 2, 'changes': {'train.log_every': [1, 2]}}
  assert_trees_close(saved_items(checkpoints.parent, 4), uninterrupted, rtol=0, atol=0)
  # A committed step that does not restore is renamed on the store and the run goes on from step 2.
  _truncate_largest_file(checkpoints / '4')
  trainer.train(make_config(*overrides, 'train.log_every=2'), RUN, progress=False)
  assert sorted(p.name for p in checkpoints.iterdir()) == ['2', '4', '4.unreadable']
  assert_trees_close(saved_items(checkpoints.parent, 4), uninterrupted, rtol=0, atol=0)


def test_checkpoints_refuse_a_store_orbax_cannot_write():
  with pytest.raises(CheckpointError, match='s3://bucket/run/checkpoints: orbax writes to local paths and gs://'):
    Checkpoints('s3://bucket/run/checkpoints')


def test_rows_reach_the_store_before_each_checkpoint(gcs, make_config, monkeypatch):
  """Rows wait in memory on an object store; every row up to a checkpoint's step must be
  in the object before that checkpoint is written, or a kill after it would lose them."""
  seen, save = {}, Checkpoints.save

  def spy(self, state, position, meta):
    path = as_path(RUN) / 'metrics.jsonl'
    rows = path.read_text().splitlines() if path.exists() else []
    seen[int(state.step)] = [json.loads(line)['step'] for line in rows]
    return save(self, state, position, meta)

  monkeypatch.setattr(Checkpoints, 'save', spy)
  cfg = make_config('train.steps=4', 'train.checkpoint_every=2', 'train.eval_every=0', 'train.log_every=1')
  trainer.train(cfg, RUN, progress=False)
  assert seen == {2: [1, 2], 4: [1, 2, 3, 4]}
