"""The trainer end to end: learning, metrics, accumulation, checkpoints, resume, NaNs
(killed and stopped processes: test_faults.py)."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import assert_trees_close, saved_items
from flax import nnx

from hmem import sizes
from hmem.errors import TrainingError
from hmem.train.trainer import train


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def _params(workdir, step=None):
  """Final (or given) checkpointed anchor params as numpy arrays, whatever mesh wrote them."""
  return saved_items(workdir, step)['params']


def _assert_trees_equal(a, b):
  ja, jb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in ja] == [p for p, _ in jb]
  for (path, x), (_, y) in zip(ja, jb):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_tiny_run_learns_and_logs(tiny_run):
  cfg, workdir, summary = tiny_run
  rows = [r for r in _rows(workdir) if 'loss' in r]
  assert [r['step'] for r in rows] == list(range(5, 21, 5))
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.2
  assert summary['eval_loss'] is not None and summary['eval_loss'] < np.log(cfg.model.vocab_size)
  for key in ('grad_norm', 'lr', 'tokens_per_s', 'step_time'):
    assert all(np.isfinite(r[key]) for r in rows)
  assert os.listdir(workdir / 'tensorboard')
  assert sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()) == [10, 20]


def test_grad_accumulation_gives_the_same_update(make_config, tmp_path):
  """One update (no warmup, so the lr is not 0) from 4 micro-batches equals the update from
  the whole batch: loss, gradient norm and parameters, up to the fp32 summation order."""
  rows, params = {}, {}
  for accum in (1, 4):
    # eps=1 makes the first AdamW update ~ lr * g, linear in the gradient, so the parameters
    # compare the accumulated gradients themselves (with eps=1e-8 it is ~ lr * sign(g): blind
    # to their scale, and noisy wherever g ~ 0).
    cfg = make_config('train.steps=1', 'train.warmup_steps=0', 'train.eps=1.0', 'train.log_every=1',
                      'train.eval_every=0', f'train.grad_accum={accum}', 'mesh.data=2', 'mesh.fsdp=1')
    train(cfg, str(tmp_path / str(accum)), progress=False, devices=jax.devices()[:2])
    [rows[accum]] = _rows(tmp_path / str(accum))
    params[accum] = _params(tmp_path / str(accum), 1)
  assert rows[1]['lr'] == pytest.approx(cfg.train.lr)  # fp32
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(rows[4][key], rows[1][key], rtol=1e-5, err_msg=key)
  assert_trees_close(params[4], params[1], rtol=1e-5, atol=1e-7)
  # Not vacuous: the update moved the parameters away from their initialisation.
  from hmem.model import build_model
  initial = nnx.to_pure_dict(nnx.state(build_model(cfg, cfg.train.seed)))
  assert not np.allclose(params[1]['blocks']['ffn']['gate']['kernel'], initial['blocks']['ffn']['gate']['kernel'])


def test_resume_continues_exactly(make_config, tiny_run, tmp_path):
  """Stop after 10 steps, resume to 20: metrics and final params equal the uninterrupted run."""
  _, full_dir, _ = tiny_run
  train(make_config('train.steps=10', 'train.schedule_steps=20'), str(tmp_path), progress=False)
  # A row beyond the checkpoint, as a killed run might leave: resume must drop it.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 11, 'loss': 123.0}) + '\n')
  train(make_config(), str(tmp_path), progress=False)
  full, resumed = _rows(full_dir), _rows(tmp_path)
  strip = lambda rows: [{k: v for k, v in r.items() if k not in ('step_time', 'tokens_per_s')} for r in rows]
  assert strip(resumed) == strip(full)
  _assert_trees_equal(_params(tmp_path), _params(full_dir))


def test_restore_onto_a_different_mesh(make_config, tiny_run, tmp_path):
  _, full_dir, _ = tiny_run
  train(make_config('train.steps=10', 'train.schedule_steps=20', 'mesh.data=8'), str(tmp_path), progress=False)
  train(make_config('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'), str(tmp_path), progress=False)
  full = {r['step']: r for r in _rows(full_dir) if 'loss' in r}
  resumed = {r['step']: r for r in _rows(tmp_path) if 'loss' in r}
  for step in (15, 20):
    np.testing.assert_allclose(resumed[step]['loss'], full[step]['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(_params(tmp_path)), jax.tree.leaves(_params(full_dir))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_the_run_and_no_bad_checkpoint(make_config, tmp_path):
  cfg = make_config('train.lr=1e30', 'train.warmup_steps=0', 'train.clip_norm=0.0', 'train.checkpoint_every=1',
                    'train.eval_every=0')
  with pytest.raises(TrainingError, match=r'non-finite loss or gradient at step (\d+)') as info:
    train(cfg, str(tmp_path), progress=False)
  bad_step = int(info.value.args[0].split('at step ')[1].split(':')[0])
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert saved and max(saved) < bad_step
  for step in saved:
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_params(tmp_path, step)))


# --- trackers: the same rows, the config and the sizes in TensorBoard and W&B (offline)

def _wandb_records(run_dir):
  """The records of an offline W&B run: its .wandb file is a LevelDB-style log (32 KiB
  blocks; 7-byte record headers: crc32c, length, type) of protobuf Records after a 7-byte
  file header."""
  from wandb.proto import wandb_internal_pb2
  data = next(run_dir.glob('*.wandb')).read_bytes()
  records, pos, chunk = [], 7, b''
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
    if kind == 0:
      break
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      records.append(record)
      chunk = b''
  return records


def _key(item) -> str:
  return item.key or '.'.join(item.nested_key)


def test_trackers_get_the_rows_config_and_sizes(make_config, tmp_path, monkeypatch):
  from test_workdir_remote import _events
  monkeypatch.setenv('WANDB_SILENT', 'true')
  cfg = make_config('train.steps=4', 'train.log_every=2', 'train.eval_every=0', 'train.checkpoint_every=4',
                    'train.trackers=tensorboard,jsonl,wandb', 'train.wandb.mode=offline', 'train.wandb.name=t')
  train(cfg, str(tmp_path), progress=False)
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  logged = [r for r in rows if 'loss' in r]
  records = _wandb_records(next((tmp_path / 'wandb').glob('offline-run-*')))
  history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
             if r.WhichOneof('record_type') == 'history']
  assert [(h['_step'], h['loss']) for h in history] == [(r['step'], r['loss']) for r in logged]
  config, summary = {}, {}
  for r in records:
    if r.WhichOneof('record_type') == 'config':
      config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
    if r.WhichOneof('record_type') == 'summary':
      summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
  assert config['model']['d_model'] == 64 and config['sizes']['anchor_params'] == sizes.sizes(cfg)['anchor_params']
  assert summary['anchor_params'] == sizes.sizes(cfg)['anchor_params']
  events = _events(tmp_path / 'tensorboard')
  assert [(step, value) for tag, step, value in events if tag == 'loss'] == [
      (r['step'], pytest.approx(r['loss'])) for r in logged]
  tags = {tag for tag, _, _ in events}
  assert {'config/text_summary', '_hparams_/experiment', '_hparams_/session_start_info'} <= tags
  runs = [r.run.run_id for r in records if r.WhichOneof('record_type') == 'run']
  assert runs and set(runs) == {(tmp_path / 'wandb_id').read_text()}
