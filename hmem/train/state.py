"""The train state, its shardings, and its sharded initialisation.

Anchor parameters are a plain nested dict of arrays (nnx.to_pure_dict), so optax, orbax
and jit see ordinary pytrees; the model's graphdef is kept beside the state and merged
inside the step. The memory bank and its optimizer state sit beside the anchor, outside
the model (empty dicts when the memory is off).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hmem import sharding
from hmem.memory import bank as memory_bank
from hmem.memory import optimizer as memory_optimizer
from hmem.memory.spec import MemorySpec, memory_spec
from hmem.model import build_model


@struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: updates applied so far
  params: Any          # anchor parameters (nested dict)
  opt_state: Any       # anchor optimizer state
  bank: Any = None     # memory tables (hmem.memory.bank), fp32
  bank_opt: Any = None # their row-sparse AdamW state (hmem.memory.optimizer)


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What the trainer needs to build, shard, restore and step a TrainState."""
  memory: MemorySpec       # the config's memory settings, derived once
  graphdef: Any
  abstract: TrainState     # ShapeDtypeStructs carrying their shardings
  shardings: TrainState


def _param_shardings(abstract_state: nnx.State, mesh, rules):
  """NamedShardings of the anchor parameters from their logical axis annotations."""
  def one(var):
    logical = var.get_metadata().get('out_sharding')
    return sharding.named_sharding(mesh, logical, rules, var.get_value().shape)
  return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def shard_like(tree_abstract, like_abstract, like_shardings, mesh):
  """Shardings for an optimizer state: sub-trees shaped like the params take their
  shardings; every other leaf (step counts, scalars) is replicated."""
  like_def = jax.tree.structure(like_abstract)

  def walk(node):
    if jax.tree.structure(node) == like_def:
      return like_shardings
    if isinstance(node, jax.ShapeDtypeStruct):
      return sharding.replicated(mesh)
    # Flatten one level: every proper descendant counts as a leaf.
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    return jax.tree_util.tree_unflatten(treedef, [walk(c) for c in children])

  return walk(tree_abstract)


def _abstract(cfg, tx, memory: MemorySpec):
  """(graphdef, abstract variables, TrainState of unsharded ShapeDtypeStructs)."""
  abstract_model = nnx.eval_shape(lambda: build_model(cfg, cfg.train.seed, memory.layers))
  graphdef, abstract_vars = nnx.split(abstract_model)
  abstract_params = nnx.to_pure_dict(abstract_vars)
  abstract_bank = jax.eval_shape(lambda: memory_bank.init_bank(memory, jax.random.key(0)))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=jax.eval_shape(tx.init, abstract_params),
                        bank=abstract_bank, bank_opt=jax.eval_shape(memory_optimizer.init, abstract_bank))
  return graphdef, abstract_vars, abstract


def abstract_state(cfg, tx) -> TrainState:
  """The state `cfg` trains, as ShapeDtypeStructs without shardings (nothing is allocated)."""
  return _abstract(cfg, tx, memory_spec(cfg))[2]


def state_spec(cfg, tx, mesh) -> StateSpec:
  memory = memory_spec(cfg)
  graphdef, abstract_vars, abstract = _abstract(cfg, tx, memory)
  param_shardings = _param_shardings(abstract_vars, mesh, cfg.mesh.rules)
  opt_shardings = shard_like(abstract.opt_state, abstract.params, param_shardings, mesh)
  bank_shardings = memory_bank.bank_shardings(memory, mesh, cfg.mesh.rules)
  shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                         bank=bank_shardings, bank_opt=memory_optimizer.opt_shardings(bank_shardings, mesh))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return StateSpec(memory=memory, graphdef=graphdef, abstract=abstract, shardings=shardings)


def init_state(cfg, tx, spec: StateSpec, params=None) -> TrainState:
  """Initialises the state directly into its shardings; `params` (e.g. a pretrained
  anchor) replaces the freshly initialised anchor parameters."""
  def init(params):
    if params is None:
      params = nnx.to_pure_dict(nnx.state(build_model(cfg, cfg.train.seed, spec.memory.layers)))
    bank = memory_bank.init_bank(spec.memory, jax.random.fold_in(jax.random.key(cfg.train.seed), 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      bank=bank, bank_opt=memory_optimizer.init(bank))

  return jax.jit(init, out_shardings=spec.shardings)(params)
