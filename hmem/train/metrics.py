"""Metrics to WORKDIR/metrics.jsonl (one exact JSON object per logged step), TensorBoard and
Weights & Biases (`train.trackers`), on any filesystem (hmem.files): on an object store the
local files are rewritten on each flush. Each tracker also gets the run's resolved config
and sizes (`describe_run`)."""

from __future__ import annotations

import io
import json
import math
import time
import uuid

from absl import logging
from tensorboardX import SummaryWriter, record_writer
from tensorboardX.summary import hparams

from hmem.config import flatten
from hmem.errors import CheckpointError, ConfigError
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


TRACKERS = ('jsonl', 'tensorboard', 'wandb')


def trackers(train_cfg) -> tuple[str, ...]:
  """The trackers `train.trackers` names, checked."""
  names = tuple(n.strip() for n in train_cfg.trackers.split(',') if n.strip())
  unknown = [n for n in names if n not in TRACKERS]
  if unknown or 'jsonl' not in names:
    raise ConfigError(f'train.trackers={train_cfg.trackers!r}: name some of {", ".join(TRACKERS)}, jsonl included '
                      '(resume and `hmem sweep collect` read metrics.jsonl), e.g. --config.train.trackers='
                      'tensorboard,jsonl,wandb')
  if 'wandb' in names and train_cfg.wandb.mode not in ('online', 'offline'):
    raise ConfigError(f"train.wandb.mode={train_cfg.wandb.mode!r}: use 'online' or 'offline'")
  return names


class _Wandb:
  """One Weights & Biases run per workdir: its id is kept in WORKDIR/wandb_id, so a resumed
  run continues it (rows after the checkpoint are rewritten, as in metrics.jsonl)."""

  def __init__(self, workdir, cfg):
    import wandb  # pip install 'hmem[wandb]'
    id_file = as_path(workdir) / 'wandb_id'
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    self.run = wandb.init(project=cfg.project or None, entity=cfg.entity or None, name=cfg.name or None,
                          mode=cfg.mode, id=run_id, resume='allow',
                          dir=None if is_remote(workdir) else str(workdir))

  def describe(self, config: dict, sizes: dict) -> None:
    self.run.config.update({**config, 'sizes': sizes}, allow_val_change=True)
    self.run.summary.update(sizes)

  def log(self, step: int, row: dict) -> None:
    self.run.log({k: v for k, v in row.items() if k != 'step'}, step=step)

  def close(self) -> None:
    self.run.finish()


OBJECT_STORE_FLUSH_S = 30.0  # an object store rewrites the whole file per flush: not every row


class MetricsWriter:
  """Appends rows; on resume, rows after the restored step are dropped so none repeats.

  Rows reach the file at once on a local disk; on an object store, where each flush
  rewrites the whole object, at most every `flush_every_s` seconds and at `flush()`, which
  the trainer calls before each checkpoint so no row before a checkpoint can be lost.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool = True,
               flush_every_s: float | None = None, train_cfg=None):
    """`train_cfg`: the config's `train` section, for its trackers (default: jsonl and TensorBoard)."""
    self.enabled = enabled
    names = trackers(train_cfg) if train_cfg is not None else ('tensorboard', 'jsonl')
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
    self.tb = SummaryWriter(str(as_path(workdir) / 'tensorboard'), purge_step=purge) if 'tensorboard' in names else None
    self.wandb = _Wandb(workdir, train_cfg.wandb) if 'wandb' in names else None
    self.file = open_append(self.path)

  def describe_run(self, config: dict, sizes: dict) -> None:
    """Gives the trackers the resolved config (a JSON dict) and the run's sizes: TensorBoard
    as text and as hparams, W&B as the run's config and summary."""
    if not self.enabled:
      return
    if self.tb is not None:
      self.tb.add_text('config', '```\n' + json.dumps(config, indent=2) + '\n```')
      flat = flatten({**config, 'sizes': sizes})  # hparams take scalars and text
      for summary in hparams({k: str(v) if isinstance(v, tuple) else v for k, v in flat.items() if v is not None},
                             {'loss': 0.0, 'eval_loss': 0.0}):
        self.tb.file_writer.add_summary(summary)
    if self.wandb is not None:
      self.wandb.describe(config, sizes)

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
    if self.tb is not None:
      for name, value in row.items():
        if name != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
          self.tb.add_scalar(name, value, step)
    if self.wandb is not None:
      self.wandb.log(step, row)

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
      for tracker in (self.tb, self.wandb):
        if tracker is not None:
          tracker.close()
