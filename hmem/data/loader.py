"""The trainer's source over a prepared dataset (`hmem prepare` output).

Global batch `step` of epoch `epoch` is sequences [step*B, (step+1)*B) of a seeded
permutation of the split; the permutation is a fresh one each epoch (grain's
index_shuffle, so nothing of dataset size is materialised) and the tail that does not
fill a batch is skipped that epoch. A batch is a pure function of (seed, epoch, step), so
a resumed run sees the batches an uninterrupted one would, on any number of hosts; each
host reads only its rows, by random access into the ArrayRecord shards, which must be on a
POSIX filesystem (layout.check_posix).
"""

from __future__ import annotations

import json

import grain
import numpy as np
from etils import epath

from hmem.data import layout
from hmem.data.layout import MANIFEST, SPLITS
from hmem.data.source import Position
from hmem.errors import DataError

_SHUFFLE_ROUNDS = 4


class PreparedSource:
  """`Source` over one split of a prepared dataset (hmem.data.prefetch reads ahead)."""

  def __init__(self, path: str, *, batch_size: int, seq_len: int, seed: int, split: str = 'train'):
    if split not in SPLITS:
      raise DataError(f'split {split!r} is not one of {", ".join(SPLITS)}')
    layout.check_posix(path, 'data.path')
    manifest = _read_manifest(path)
    if manifest['seq_len'] != seq_len:
      raise DataError(f'{path} was packed with seq_len={manifest["seq_len"]}, but '
                      f'data.seq_len={seq_len}; '
                      f'set --config.data.seq_len={manifest["seq_len"]} or prepare the data again')
    info = manifest['splits'][split]
    size = info['sequences']
    if batch_size > size:
      fix = ('raise data.eval_fraction and prepare again, or lower train.batch_size' if split == 'eval'
             else 'lower train.batch_size or prepare more documents')
      raise DataError(f'train.batch_size={batch_size} is larger than the {size} sequences of the '
                      f'{split!r} split of {path}; {fix}')
    self.seq_len, self.batch_size, self.seed, self.split = seq_len, batch_size, seed, split
    self.steps_per_epoch = size // batch_size
    self.size = size
    self.manifest = manifest
    # `file[0:n]` tells grain the record count, so it need not open every shard up front.
    self._source = grain.sources.ArrayRecordDataSource(
        [f'{epath.Path(path) / s["file"]}[0:{s["sequences"]}]' for s in info['shards']])

  def indices(self, position: Position, rows: slice) -> np.ndarray:
    """Dataset indices of the given rows of a global batch."""
    if not 0 <= position.step < self.steps_per_epoch:
      raise ValueError(f'step {position.step} is outside the {self.steps_per_epoch} steps of an epoch')
    start, stop = rows.start or 0, self.batch_size if rows.stop is None else rows.stop
    if rows.step not in (None, 1) or not 0 <= start <= stop <= self.batch_size:
      raise ValueError(f'rows {rows} are not a contiguous part of a batch of {self.batch_size}')
    epoch_seed = int(np.random.SeedSequence((self.seed, position.epoch)).generate_state(1)[0])
    first = position.step * self.batch_size
    return np.array([grain.experimental.index_shuffle(first + r, self.size - 1, epoch_seed,
                                                      _SHUFFLE_ROUNDS)
                     for r in range(start, stop)], np.int64)

  def batch(self, position: Position, rows: slice) -> dict[str, np.ndarray]:
    """tokens, segment_ids [rows, seq_len] and leaf_id [rows], int32."""
    return layout.decode_batch(self._source.__getitems__(self.indices(position, rows).tolist()),
                                self.seq_len)


def _read_manifest(path: str) -> dict:
  """The manifest of a dataset on any filesystem etils.epath reads (local, gs://, ...)."""
  if not path or not epath.Path(path).is_dir():
    raise DataError(f'prepared dataset {path!r} does not exist; run `hmem prepare --out DIR` and '
                    'set --config.data.path=DIR')
  manifest_path = epath.Path(path) / MANIFEST
  if not manifest_path.is_file():
    raise DataError(f'{path} has no {MANIFEST}: its preparation did not finish; rerun '
                    f'`hmem prepare --out {path}` (it starts again)')
  try:
    manifest = json.loads(manifest_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'{manifest_path} is unreadable ({e}); prepare the data again') from None
  if manifest.get('format') != layout.FORMAT or manifest.get('version') != layout.VERSION:
    raise DataError(f'{manifest_path} is not an hmem v1 dataset manifest; prepare the data again')
  return manifest
