"""Metrics to WORKDIR/metrics.jsonl (one exact JSON object per logged step) and TensorBoard,
on any filesystem (hmem.files): on an object store both files are rewritten on each flush."""

from __future__ import annotations

import io
import json
import math
import time

from absl import logging
from tensorboardX import SummaryWriter, record_writer

from hmem.errors import CheckpointError
from hmem.files import as_path, atomic_write, is_remote, open_append


class _EventFile:
  """A TensorBoard event file on an object store, appended through hmem.files. It has no
  `fileno`: tensorboardX fsyncs a file that has one (and an in-memory one's raises)."""

  def __init__(self, path: str):
    self._file = open_append(path, binary=True)
    self.write, self.flush, self.close = self._file.write, self._file.flush, self._file.close


class _ObjectStoreEvents:
  """tensorboardX's writer factory for object stores: epath reaches every store it supports
  (tensorboardX's own gs:// writer would need google-cloud-storage)."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    as_path(path).mkdir(parents=True, exist_ok=True)


for _scheme in ('gs', 's3', 'az'):
  record_writer.register_writer_factory(_scheme, _ObjectStoreEvents())


def _plain(value):
  value = float(value) if not isinstance(value, (int, str, bool)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them readable instead of invalid
  return value


OBJECT_STORE_FLUSH_S = 30.0  # an object store rewrites the whole file per flush: not every row


class MetricsWriter:
  """Appends rows; on resume, rows after the restored step are dropped so none repeats.

  Rows reach the file at once on a local disk; on an object store, where each flush
  rewrites the whole object, at most every `flush_every_s` seconds and at `flush()`, which
  the trainer calls before each checkpoint so no row before a checkpoint can be lost.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool = True,
               flush_every_s: float | None = None):
    self.enabled = enabled
    self.path = as_path(workdir) / 'metrics.jsonl'
    if flush_every_s is None:
      flush_every_s = OBJECT_STORE_FLUSH_S if is_remote(self.path) else 0.0
    self.flush_every_s, self.flushed_at, self.pending = flush_every_s, time.monotonic(), []
    if not enabled:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    else:
      self.path.unlink(missing_ok=True)
    # purge_step makes TensorBoard discard events a killed run wrote past the checkpoint.
    purge = None if resume_step is None else resume_step + 1
    self.tb = SummaryWriter(str(as_path(workdir) / 'tensorboard'), purge_step=purge)
    self.file = open_append(self.path)

  def _truncate_after(self, step: int) -> None:
    """Keeps the rows up to `step`. A killed run may have left its last line half
    written: that line is dropped (with a warning); a damaged line before it is an error."""
    if not self.path.exists():
      return
    text = self.path.read_bytes().decode('utf-8', errors='replace')  # epath's open() takes no `errors`
    lines = io.StringIO(text, newline=None).readlines()
    rows = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        row_step = json.loads(line)['step']
      except (json.JSONDecodeError, KeyError, TypeError):
        if number == len(lines):
          logging.warning('%s: dropped its last line, which a stopped run left incomplete: %r', self.path, line)
          continue
        raise CheckpointError(f'{self.path} line {number} is not a metrics row ({line.strip()[:80]!r}); '
                              'repair or remove that line to resume') from None
      if row_step <= step:
        rows.append(line if line.endswith('\n') else line + '\n')
    with atomic_write(self.path) as f:
      f.writelines(rows)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    # Python's float repr round-trips exactly, so the file holds the exact values.
    self.pending.append(json.dumps(row) + '\n')
    if time.monotonic() - self.flushed_at >= self.flush_every_s:
      self.flush()
    for name, value in row.items():
      if name != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
        self.tb.add_scalar(name, value, step)

  def flush(self) -> None:
    """Writes the rows not yet in the file."""
    if self.enabled and self.pending:
      self.file.write(''.join(self.pending))
      self.file.flush()
      self.pending.clear()
    self.flushed_at = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      self.file.close()
      self.tb.close()
