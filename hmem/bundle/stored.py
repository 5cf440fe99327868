"""A checkpoint's bank read in row ranges, each row caught up to the checkpoint's step.

A run's bank (and its optimizer state) is far larger than one host's memory at paper scale
(18-85 GB of fp32 weights, three times that with the moments), so nothing here restores it
whole: the checkpoint's `bank` and `bank_opt` items are opened with tensorstore directly
(orbax stores each array as a zarr array under its tree path, `level2.ffn_up`,
`level2.mu.ffn_up`, in an OCDBT database) and only the rows asked for are read. Training
stores these arrays one row per chunk (hmem.train.checkpoint), so a read of R rows costs R
rows; a checkpoint written before that stores one chunk per device shard, and a read then
costs the shards it touches.

Rows are served as dense AdamW holds them after the checkpoint's step
(`hmem.memory.optimizer.caught_up`): a row last fetched long before the end is moved on the
steps it missed, from its moments and `last_step`, so export and inference never see a
stale row.
"""

from __future__ import annotations

import jax
import numpy as np
import tensorstore as ts

from hmem.bundle.reader import RowCache, kvstore
from hmem.errors import CheckpointError
from hmem.memory import bank as memory_bank
from hmem.memory import optimizer as memory_optimizer

BANK, BANK_OPT = 'bank', 'bank_opt'  # the checkpoint items (TrainState fields)
# A range of R rows is held about this many times in fp32 while it is read and caught up:
# weights, two moments, the caught-up rows and the temporaries of the catch-up.
ROW_COPIES = 6


def _open(step_dir: str, item: str, key: str, context):
  """The zarr array `key` of a checkpoint item (orbax writes zarr v2 by default, v3 if asked)."""
  store = {'driver': 'ocdbt', 'base': kvstore(step_dir, item)}
  error = None
  for driver in ('zarr', 'zarr3'):
    try:
      return ts.open({'driver': driver, 'kvstore': store, 'path': key}, read=True, context=context).result()
    except ValueError as e:
      error = e
  raise CheckpointError(f'{step_dir}/{item}: array {key} cannot be opened ({error}); the checkpoint is damaged '
                        'or was written for another memory config') from None


class StoredBank:
  """The bank of checkpoint `step_dir` (a directory `checkpoints/STEP`, local or gs://) of a
  run with config `cfg`, trained for `step` steps."""

  def __init__(self, cfg, step_dir: str, step: int):
    self.cfg, self.step_dir, self.step = cfg, str(step_dir), int(step)
    self.shapes = memory_bank.bank_shapes(cfg)
    context = ts.Context({'cache_pool': {'total_bytes_limit': 0}})  # no copy kept beyond a read
    # One program per range shape (eager, every op would compile again for every shape).
    self._caught_up = jax.jit(lambda w, mu, nu, last_U: memory_optimizer.caught_up(cfg, w, mu, nu, last_U, step))
    self._w, self._mu, self._nu, self._last = {}, {}, {}, {}
    for table, named in self.shapes.items():
      self._last[table] = _open(self.step_dir, BANK_OPT, f'{table}.last_step', context)
      for name, shape in named.items():
        self._w[table, name] = _open(self.step_dir, BANK, f'{table}.{name}', context)
        self._mu[table, name] = _open(self.step_dir, BANK_OPT, f'{table}.mu.{name}', context)
        self._nu[table, name] = _open(self.step_dir, BANK_OPT, f'{table}.nu.{name}', context)
        if tuple(self._w[table, name].shape) != tuple(shape):
          raise CheckpointError(f'{self.step_dir}/{BANK}: {table}.{name} has shape {list(self._w[table, name].shape)}, '
                                f'the run config gives {list(shape)}; the checkpoint was written for another config')

  def row_bytes(self, table: str) -> int:
    """fp32 bytes of one row of `table`, all its arrays."""
    return sum(4 * int(np.prod(shape[1:])) for shape in self.shapes[table].values())

  def rows(self, table: str, index) -> dict[str, np.ndarray]:
    """{name: float32 [R, layers_m, width, features]}: rows `index` (a slice or row ids) of
    `table` as dense AdamW holds them after the checkpoint's step. Every array's read is
    issued before any is awaited."""
    names = list(self.shapes[table])
    futures = {(kind, name): source[table, name][index].read()
               for kind, source in (('w', self._w), ('mu', self._mu), ('nu', self._nu)) for name in names}
    last = self._last[table][index].read()
    try:
      got = {key: f.result() for key, f in futures.items()}
      last_U = last.result()
    except (ValueError, RuntimeError, OSError) as e:
      raise CheckpointError(f'{self.step_dir}: rows {index} of bank table {table} cannot be read ({e}); the '
                            'checkpoint is damaged') from None
    caught = self._caught_up({n: got['w', n] for n in names}, {n: got['mu', n] for n in names},
                             {n: got['nu', n] for n in names}, last_U)
    return {n: np.asarray(a, np.float32) for n, a in caught.items()}


class StoredRows(RowCache):
  """The rows of a checkpoint's bank that inference asks for, read on demand through the
  same cache and read counts as a bundle's Reader; fp32, caught up to the checkpoint's step."""

  def __init__(self, bank: StoredBank, cache_bytes: int = 256 << 20):
    present = {t: np.ones(next(iter(named.values()))[0], bool) for t, named in bank.shapes.items()}
    super().__init__(bank.step_dir, {t: list(named) for t, named in bank.shapes.items()}, present, cache_bytes)
    self.bank = bank

  def _fetch(self, keys):
    out = {}
    for table in sorted({t for t, _ in keys}):
      ids_U = np.array([row for t, row in keys if t == table], np.int64)
      # Padded (with its last id) to a power of two: a few program shapes serve every batch.
      padded = np.pad(ids_U, (0, (1 << (len(ids_U) - 1).bit_length()) - len(ids_U)), mode='edge')
      rows = self.bank.rows(table, padded)  # one read per array for all of the table's rows
      out.update({(table, int(i)): {n: a[u].copy() for n, a in rows.items()} for u, i in enumerate(ids_U)})
    return out
