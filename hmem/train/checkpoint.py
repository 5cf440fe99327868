"""Checkpoints: one orbax CheckpointManager, one item per part of the train state.

Items: every TrainState field except `step` (anchor params, anchor optimizer state, and the
bank items the memory adds), `data` (the global data position) and `meta` (step, config).
Restores go through abstract targets that carry shardings, so a checkpoint restores onto
any mesh or device count; `restore(..., items=...)` reads only what it is asked for.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from hmem.data.source import Position
from hmem.errors import CheckpointError
from hmem.train.storage import checkpoint_writes


def state_items(state) -> tuple[str, ...]:
  """The state fields saved as items: all but `step`, and none that is empty (no memory)."""
  return tuple(f.name for f in dataclasses.fields(state)
               if f.name != 'step' and jax.tree.leaves(getattr(state, f.name)))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Checkpoints:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, position: Position, meta: dict) -> None:
    """Saves asynchronously (when enabled); refuses a state with non-finite values."""
    step = int(state.step)
    if not bool(_all_finite(state)):
      raise CheckpointError(f'refusing to save step {step}: the state holds NaN or Inf values')
    args = {name: ocp.args.StandardSave(getattr(state, name)) for name in state_items(state)}
    args['data'] = ocp.args.JsonSave(position.to_json())
    args['meta'] = ocp.args.JsonSave({**meta, 'step': step})
    with checkpoint_writes(self.directory):  # this save, or the previous one still being written
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state, items=None):
    """Returns (state or None, Position, meta). `items` limits which state items are read;
    the state fields not read keep their abstract values (the caller fills them)."""
    names = state_items(abstract_state) if items is None else tuple(items)
    step_dir = os.path.join(self.directory, str(step))
    available = set(os.listdir(step_dir)) if os.path.isdir(step_dir) else set()
    missing = [n for n in names if n not in available]
    if missing:
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} has no {", ".join(missing)} '
          f'(it holds {", ".join(sorted(available)) or "nothing"}); was it written with the same memory config?')
    args = {name: ocp.args.StandardRestore(getattr(abstract_state, name)) for name in names}
    args['data'] = ocp.args.JsonRestore()
    args['meta'] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: {e}); '
          'delete that step directory to fall back to an earlier one, or start a fresh workdir') from e
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

