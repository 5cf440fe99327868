"""The trainer's data interface: global batches addressed by a global (epoch, step) position.

A source returns the rows of one global batch that a process holds. Because a batch is a
pure function of (position, rows), a checkpoint only needs the position to resume exactly,
on any number of hosts or devices.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True, order=True)
class Position:
  epoch: int = 0
  step: int = 0  # batch index inside the epoch

  def next(self, steps_per_epoch: int | None) -> 'Position':
    if steps_per_epoch is not None and self.step + 1 >= steps_per_epoch:
      return Position(self.epoch + 1, 0)
    return Position(self.epoch, self.step + 1)

  def to_json(self) -> dict:
    return {'epoch': self.epoch, 'step': self.step}

  @classmethod
  def from_json(cls, d: dict) -> 'Position':
    return cls(int(d['epoch']), int(d['step']))


class Source(Protocol):
  """Batches are dicts of numpy arrays: tokens, segment_ids [rows, seq_len] int32 and
  leaf_id [rows] int32. segment_ids number the packed documents from 1; 0 is padding."""

  seq_len: int
  batch_size: int                 # global, in sequences
  steps_per_epoch: int | None     # None for an endless source

  def batch(self, position: Position, rows: slice) -> dict[str, np.ndarray]:
    ...


def check_batch(batch: dict[str, np.ndarray], rows: int, seq_len: int) -> None:
  """Cheap shape/dtype check at the boundary between data and the jitted step."""
  for name, shape in (('tokens', (rows, seq_len)), ('segment_ids', (rows, seq_len)), ('leaf_id', (rows,))):
    a = batch.get(name)
    if a is None or a.shape != shape or a.dtype != np.int32:
      got = None if a is None else (a.shape, a.dtype)
      raise ValueError(f'data source returned {name}={got}, expected int32 {shape}')
