"""A run's anchor parameters, read for use outside training (inference, export, weights
out): the saved config, abstract parameters on one device, and a restore of the anchor
alone from a checkpoint (the bank, however large, stays in place)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from hmem.config import config_from_json
from hmem.errors import CheckpointError
from hmem.files import as_path
from hmem.memory import config as memory_config
from hmem.model import build_model
from hmem.train.checkpoint import Checkpoints
from hmem.train.state import TrainState


def run_config(workdir: str | os.PathLike):
  """The config a run was trained with (its workdir's config.json)."""
  path = as_path(workdir) / 'config.json'
  if not path.is_file():
    raise CheckpointError(f'{path} not found: {str(workdir)!r} is not a run directory written by `hmem train`')
  return config_from_json(json.loads(path.read_text()))


def abstract_params(cfg, device=None):
  """(graphdef, ShapeDtypeStructs of the anchor parameters on one device)."""
  layers = memory_config.memory_layers(cfg)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, memory_layers=layers)))
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])  # this process's
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        nnx.to_pure_dict(abstract))
  return graphdef, params


def restore_params(workdir: str, step: int | None = None):
  """(config, graphdef, anchor params on one device, step, the step's checkpoint directory)
  of a run's checkpoint (latest, or `step`): only the anchor parameters are read; the bank,
  however large, is left in place (hmem.bundle.stored reads its rows)."""
  cfg = run_config(workdir)
  memory_config.check(cfg)
  directory = as_path(workdir) / 'checkpoints'
  if not directory.is_dir():
    raise CheckpointError(f'{str(workdir)!r} holds no checkpoints/ directory; train the run first')
  ckpt = Checkpoints(str(directory), async_save=False, read_only=True)
  try:
    steps = ckpt.manager.all_steps()
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in steps:
      raise CheckpointError(f'{directory} has no checkpoint of step {step}; it has steps {sorted(steps)}')
    graphdef, params = abstract_params(cfg)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=None)
    state, _, _ = ckpt.restore(step, abstract, items=('params',))
  finally:
    ckpt.close()
  return cfg, graphdef, state.params, step, str(directory / str(step))
