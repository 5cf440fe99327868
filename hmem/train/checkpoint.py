"""Checkpoints: one orbax CheckpointManager, one item per part of the train state.

Items: every TrainState field except `step` (anchor params, anchor optimizer state, and the
bank items the memory adds), `data` (the global data position) and `meta` (step, config).
Restores go through abstract targets that carry shardings, so a checkpoint restores onto
any mesh or device count; `restore(..., items=...)` reads only what it is asked for.
`restore_latest` makes every process restore the same step: the newest one every process
reads. A step damaged for every process (a kill or a full disk while it was written) is
renamed `<step>.unreadable`; one only some processes fail to read is skipped but kept; a
transient error (timeout, memory, I/O) is retried, then stops the run naming the step.

Reads go through a manager that spans this process alone, so that a process whose read
fails does not leave the others waiting in orbax's end-of-restore barrier: the processes
then compare their outcomes in one all-gather per attempt.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from hmem.data.source import Position
from hmem.errors import CheckpointError, UserError
from hmem.files import as_path, is_remote
from hmem.train.storage import checkpoint_writes, transient_read_error

# A step whose read fails transiently on some process is tried this often, waiting
# RETRY_SECONDS x attempt in between, before the run stops.
READ_ATTEMPTS = 3
RETRY_SECONDS = 5.0
READ, DAMAGED, TRANSIENT = 0, 1, 2


def state_items(state) -> tuple[str, ...]:
  """The state fields saved as items: all but `step`, and none that is empty (no memory)."""
  return tuple(f.name for f in dataclasses.fields(state)
               if f.name != 'step' and jax.tree.leaves(getattr(state, f.name)))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _save_args(item: str, tree):
  """The bank and its moments are stored one row per chunk, so that export and inference read
  any rows of them alone (hmem.bundle.stored) however large the bank; the rest as orbax chooses."""
  if item not in ('bank', 'bank_opt'):
    return None
  return jax.tree.map(lambda a: ocp.SaveArgs(shard_axes=(0,) if a.ndim > 1 else ()), tree)


class Checkpoints:

  def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = as_path(directory)  # orbax reaches gs:// itself
    if is_remote(self.directory) and not str(self.directory).startswith('gs://'):
      raise CheckpointError(f'checkpoints cannot be written to {self.directory}: orbax writes to local paths and gs:// '
                            'only; mount the bucket (e.g. s3fs-fuse, blobfuse2) and pass the mount path')
    self.manager = ocp.CheckpointManager(
        str(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only))
    me = jax.process_index()
    self.reader = self.manager if jax.process_count() == 1 else ocp.CheckpointManager(
        str(self.directory), options=ocp.CheckpointManagerOptions(
            read_only=True, create=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f'read{me}')))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, position: Position, meta: dict) -> None:
    """Saves asynchronously (when enabled); refuses a state with non-finite values."""
    step = int(state.step)
    if not bool(_all_finite(state)):
      raise CheckpointError(f'refusing to save step {step}: the state holds NaN or Inf values')
    args = {name: ocp.args.StandardSave(getattr(state, name), save_args=_save_args(name, getattr(state, name)))
            for name in state_items(state)}
    args['data'] = ocp.args.JsonSave(position.to_json())
    args['meta'] = ocp.args.JsonSave({**meta, 'step': step})
    with checkpoint_writes(self.directory):  # this save, or the previous one still being written
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def meta(self, step: int) -> dict:
    """The `meta` item alone (step, config, sizes): cheap, read before a restore."""
    return self.reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state, items=None):
    """Returns (state or None, Position, meta). `items` limits which state items are read;
    the state fields not read keep their abstract values (the caller fills them)."""
    try:
      return self._restore(step, abstract_state, items)
    except UserError:
      raise
    except Exception as e:  # orbax and tensorstore raise plain Exceptions for damaged files
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: '
          f'{str(e).splitlines()[0][:300]}); it is damaged or was written for another model') from e

  def restore_latest(self, abstract_state, check_meta=None):
    """(state, Position, meta) of the newest step every process restores; None when there
    is none.

    `check_meta(step, meta)` runs on a step's meta before its state is read and may raise
    (a config that cannot resume it). A step that no process restores while an earlier one
    restores is damaged: it is renamed `<step>.unreadable` (left for inspection) with a
    warning; one that only some processes fail to read is skipped and kept. A transient
    failure on any process is retried READ_ATTEMPTS times, then raises a CheckpointError
    naming the step. When no step restores, the newest one's error is raised.
    """
    damaged: list[tuple[int, Exception | None]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      restored, error, outcome_P = self._read_agreed(step, abstract_state, check_meta)
      if (outcome_P == READ).all():
        for bad, bad_error in damaged:
          self._set_aside(bad, bad_error, step)
        return restored
      if (outcome_P == DAMAGED).all():
        damaged.append((step, error))
      else:
        logging.warning('checkpoint step %d in %s is unreadable on process(es) %s only (%s); it is kept, and an '
                        'earlier step is tried', step, self.directory, np.flatnonzero(outcome_P != READ).tolist(),
                        _describe(error) if error else 'this process read it')
        damaged.append((step, None))
    if damaged:
      step, error = damaged[0]
      raise CheckpointError(f'no checkpoint in {self.directory} can be restored (on every process); the newest, step '
                            f'{step}, fails ' + (f'with {_describe(error)}' if error else 'on another process')
                            ) from error
    return None

  def _read_agreed(self, step: int, abstract_state, check_meta):
    """Reads `step` on every process, retrying while any process fails transiently:
    (restored or None, this process's error or None, every process's outcome [P])."""
    for attempt in range(1, READ_ATTEMPTS + 1):
      restored, error, outcome = None, None, READ
      try:
        meta = self.meta(step)
        if check_meta is not None:
          check_meta(step, meta)
        restored = self._restore(step, abstract_state)
      except UserError:
        raise
      except Exception as e:  # orbax and tensorstore raise plain Exceptions for damaged files
        error, outcome = e, TRANSIENT if transient_read_error(e) else DAMAGED
      outcome_P = _all_processes(outcome)
      transient = np.flatnonzero(outcome_P == TRANSIENT).tolist()
      if not transient:
        return restored, error, outcome_P
      logging.warning('reading checkpoint step %d in %s failed on process(es) %s, attempt %d of %d (%s)', step,
                      self.directory, transient, attempt, READ_ATTEMPTS,
                      _describe(error) if outcome == TRANSIENT else 'see that process\'s log')
      if attempt < READ_ATTEMPTS:
        time.sleep(RETRY_SECONDS * attempt)
    raise CheckpointError(
        f'checkpoint step {step} in {self.directory} could not be read on process(es) {transient} after '
        f'{READ_ATTEMPTS} attempts' + (f' ({_describe(error)})' if outcome == TRANSIENT else '') + '; the error is '
        'not damage (timeout, memory or I/O), so the step is kept: fix the cause and run again') from error

  def _set_aside(self, step: int, error: Exception | None, fallback: int) -> None:
    if error is None:  # unreadable on some processes only: kept
      return
    aside = self.directory / f'{step}.unreadable'
    logging.warning('checkpoint step %d in %s is unreadable (%s); resuming from step %d and keeping the '
                    'damaged one as %s', step, self.directory, _describe(error), fallback, aside)
    if jax.process_index() == 0:
      (self.directory / str(step)).replace(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'hmem checkpoint {step} set aside')
    self.manager.reload()
    if self.reader is not self.manager:
      self.reader.reload()

  def _restore(self, step: int, abstract_state, items=None):
    names = state_items(abstract_state) if items is None else tuple(items)
    step_dir = self.directory / str(step)
    available = {p.name for p in step_dir.iterdir()} if step_dir.is_dir() else set()
    missing = [n for n in names if n not in available]
    if missing:
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} has no {", ".join(missing)} '
          f'(it holds {", ".join(sorted(available)) or "nothing"}); was it written with the same memory config?')
    args = {name: ocp.args.StandardRestore(getattr(abstract_state, name)) for name in names}
    args['data'] = ocp.args.JsonRestore()
    args['meta'] = ocp.args.JsonRestore()
    restored = self.reader.restore(step, args=ocp.args.Composite(**args))
    state = abstract_state.replace(step=jnp.asarray(step, jnp.int32),
                                   **{name: restored[name] for name in names})
    return state, Position.from_json(restored['data']), restored['meta']

  def wait(self) -> None:
    with checkpoint_writes(self.directory):
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
      if self.reader is not self.manager:
        self.reader.close()


def latest_step(workdir: str) -> int | None:
  """The latest checkpoint step of a run directory (None: no checkpoint yet)."""
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'), async_save=False, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _describe(error: Exception) -> str:
  return f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}'


def _all_processes(outcome: int) -> np.ndarray:
  """[P] every process's `outcome` (one all-gather; none on one process)."""
  if jax.process_count() == 1:
    return np.array([outcome])
  return np.asarray(multihost_utils.process_allgather(np.int32(outcome))).reshape(-1)

