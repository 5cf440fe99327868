"""PreparedSource: deterministic, resumable, host-sliceable batches over a prepared dataset."""

import json

import numpy as np
import pytest
from test_prepare import corpus, prepared, read_split, small_config  # noqa: F401 (fixtures)

from hmem.data import make_source
from hmem.data.loader import PreparedSource
from hmem.data.prefetch import Prefetcher
from hmem.data.source import Position, check_batch
from hmem.errors import DataError

B = 64


@pytest.fixture(scope='module')
def dataset(prepared):  # noqa: F811
  _, out, manifest = prepared
  return out, manifest


def source(path, split='train', batch_size=B, seed=0):
  return PreparedSource(str(path), batch_size=batch_size, seq_len=128, seed=seed, split=split)


def same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ('tokens', 'segment_ids', 'leaf_id'))


def test_batches_are_rows_of_the_shards(dataset):
  path, manifest = dataset
  src = source(path)
  assert src.steps_per_epoch == manifest['splits']['train']['sequences'] // B
  everything = read_split(path, manifest, 'train')
  rows = slice(8, 40)
  b = src.batch(Position(0, 2), rows)
  check_batch(b, rows.stop - rows.start, 128)
  index = src.indices(Position(0, 2), rows)
  assert same(b, {k: v[index] for k, v in everything.items()})
  assert len(np.unique(b['leaf_id'])) > 4  # globally shuffled: a batch mixes clusters


def test_same_position_same_batch_and_rows_slice_it(dataset):
  path, _ = dataset
  a, b = source(path), source(path)
  whole = a.batch(Position(1, 3), slice(0, B))
  assert same(whole, b.batch(Position(1, 3), slice(0, B)))
  halves = [b.batch(Position(1, 3), slice(0, B // 2)), b.batch(Position(1, 3), slice(B // 2, B))]
  assert same(whole, {k: np.concatenate([h[k] for h in halves]) for k in whole})
  assert not same(whole, source(path, seed=1).batch(Position(1, 3), slice(0, B)))


def test_an_epoch_is_a_permutation_and_the_next_epoch_another(dataset):
  path, manifest = dataset
  src = source(path)
  n = manifest['splits']['train']['sequences']
  epoch = [src.indices(Position(e, s), slice(0, B)) for e in (0, 1) for s in range(src.steps_per_epoch)]
  first = np.concatenate(epoch[:src.steps_per_epoch])
  second = np.concatenate(epoch[src.steps_per_epoch:])
  assert len(set(first.tolist())) == first.size == src.steps_per_epoch * B
  assert first.min() >= 0 and first.max() < n
  assert not np.array_equal(first, second)
  with pytest.raises(ValueError, match='outside'):
    src.indices(Position(0, src.steps_per_epoch), slice(0, B))


def test_resume_sees_the_batches_of_an_uninterrupted_run(dataset):
  path, _ = dataset
  src = source(path)
  positions, p = [], Position(0, src.steps_per_epoch - 4)
  for _ in range(8):  # crosses into epoch 1
    positions.append(p)
    p = p.next(src.steps_per_epoch)
  assert positions[-1].epoch == 1
  rows = slice(B // 4, B // 2)  # one host's share
  continuous = [src.batch(p, rows) for p in positions]
  # Through the trainer's read-ahead: prefetch hits, then a resume and an out of order request
  # (misses) give the same batches.
  ahead = Prefetcher(lambda p: src.batch(p, rows))
  assert all(same(c, ahead.get(p, prefetch=q)) for c, p, q in zip(continuous, positions, positions[1:] + [None]))
  resumed = Prefetcher(lambda p: source(path).batch(p, rows))
  assert all(same(c, resumed.get(p, prefetch=q))
             for c, p, q in zip(continuous[3:], positions[3:], positions[4:] + [None]))
  assert same(continuous[1], resumed.get(positions[1]))
  ahead.close()
  resumed.close()


def test_eval_split_is_separate(dataset):
  path, manifest = dataset
  n_eval = manifest['splits']['eval']['sequences']
  ev = source(path, 'eval', batch_size=n_eval)
  assert ev.steps_per_epoch == 1
  e = ev.batch(Position(0, 0), slice(0, n_eval))
  train = read_split(path, manifest, 'train')
  train_rows = {r.tobytes() for r in train['tokens']}
  assert not any(r.tobytes() in train_rows for r in e['tokens'])
  with pytest.raises(DataError, match="larger than the .* 'eval' split.*eval_fraction"):
    source(path, 'eval', batch_size=n_eval + 1)


def test_clear_messages_for_unusable_datasets(dataset, tmp_path):
  path, manifest = dataset
  with pytest.raises(DataError, match='does not exist.*hmem prepare'):
    source(str(tmp_path / 'missing'))
  with pytest.raises(DataError, match='no manifest.json'):
    source(str(tmp_path))
  with pytest.raises(DataError, match='seq_len=128, but data.seq_len=64.*data.seq_len=128'):
    PreparedSource(str(path), batch_size=B, seq_len=64, seed=0)
  with pytest.raises(DataError, match='lower train.batch_size'):
    source(path, batch_size=manifest['splits']['train']['sequences'] + 1)
  (tmp_path / 'manifest.json').write_text(json.dumps({'format': 'other'}))
  with pytest.raises(DataError, match='not an hmem v1 dataset'):
    source(str(tmp_path))


def test_make_source_dispatches_to_the_prepared_dataset(dataset):
  path, _ = dataset
  cfg = small_config('data.source=prepared', f'data.path={path}', f'train.batch_size={B}')
  src = make_source(cfg, split='train')
  assert isinstance(src, PreparedSource) and src.batch_size == B


@pytest.mark.parametrize('override, message', [
    ('model.vocab_size=100', 'its tokenizer has'),
    ('memory.k=8', 'was clustered with k=4'),
])
def test_make_source_rejects_a_model_or_tree_that_does_not_fit_the_data(dataset, override, message):
  path, _ = dataset
  cfg = small_config('data.source=prepared', f'data.path={path}', f'train.batch_size={B}',
                     'memory.levels=(4,4)', override)
  with pytest.raises(DataError, match=message):
    make_source(cfg, split='train')


def test_too_many_eval_steps_fail_before_the_state_is_built(dataset, tmp_path, monkeypatch):
  from conftest import tiny_config

  from hmem.errors import ConfigError
  from hmem.train import trainer
  path, manifest = dataset
  monkeypatch.setattr(trainer, 'state_spec', lambda *a, **k: pytest.fail('state built before the check'))
  batches = manifest['splits']['eval']['sequences'] // 8
  cfg = tiny_config('data.source=prepared', f'data.path={path}', 'data.seq_len=128', 'train.batch_size=8',
                    f'model.vocab_size={manifest["vocab_size"]}', 'train.eval_every=10',
                    f'train.eval_steps={batches + 1}', f'memory.k={manifest["k"]}', f'memory.depth={manifest["depth"]}',
                    f'memory.levels={(0,) * manifest["depth"]}')
  with pytest.raises(ConfigError, match=f'train.eval_steps={batches + 1} exceeds the {batches} batches'):
    trainer.train(cfg, str(tmp_path), progress=False)
