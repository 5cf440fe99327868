"""A trained model ready for inference: anchor, bank rows and router, from a run or a bundle.

`open_source(workdir=RUN)` restores the anchor parameters of the run's latest (or a given)
checkpoint onto one device, reads the bank rows a batch needs from the checkpoint on
demand (caught up to its step: hmem.infer.stored; the bank is never restored whole) and
routes with the tree of the dataset the run trained on (`data.path`), or, for a run without
a tree (made by `hmem import`), with no router and the run's own tokenizer;
`open_source(bundle=DIR)` reads an exported bundle (rows read as paths need them).
Either way the caller gets the same `MemorySource`: the model, the router, and the rows of
any leaf's path assembled into the model's `memory` argument.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmem.config import config_from_json
from hmem.data.tokenizer import Tokenizer
from hmem.errors import BundleError, CheckpointError
from hmem.files import as_path
from hmem.infer.router import TOKENIZER, Router
from hmem.infer.stored import StoredBank, StoredRows
from hmem.memory import bank as memory_bank
from hmem.memory import config as memory_config
from hmem.model import build_model
from hmem.model.transformer import dtype_of

MODES = ('fetched', 'generic', 'none')


class BankRows(Protocol):
  """Where a source reads bank rows from: a bundle's Reader or a checkpoint's StoredRows."""

  def read(self, requests: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{table: row ids [U]} -> {table: {name: [U, layers_m, width, features]}}."""
    ...


class ArrayBank:
  """A bank held in memory as numpy arrays ({table: {name: [rows, ...]}}): for benchmarks
  and tests that set rows by hand."""

  def __init__(self, bank: dict):
    self.bank = bank

  def read(self, requests: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    return {t: {name: a[ids_U] for name, a in self.bank[t].items()} for t, ids_U in requests.items()}


class MemorySource:
  """A trained model ready for inference.

  config: the run's ConfigDict. model: the anchor (nnx Transformer, parameters loaded),
  called as `model(tokens, segment_ids, memory)`. router: a Router over the run's tree, or
  None for a run on synthetic data or without a tree (pass leaf ids yourself). tokenizer:
  the router's, or, for a run without a tree (one made by `hmem import`), the run's own;
  None when the run has none. step: the checkpoint step the parameters come from.
  """

  def __init__(self, config, model, router: Router | None, rows: BankRows | None, step: int,
               manifest: dict | None = None, tokenizer: Tokenizer | None = None):
    self.config, self.model, self.router, self.rows, self.step = config, model, router, rows, step
    self.tokenizer = router.tokenizer if router is not None else tokenizer
    self.manifest = manifest  # a bundle's manifest.json; None for a run directory
    self.dtype = dtype_of(config.model.dtype)
    self.tables = memory_bank.tables(config)

  @property
  def has_memory(self) -> bool:
    return bool(self.tables)

  def blocks(self, leaf_B) -> dict:
    """{table 'levelN': {name: np.ndarray [B, layers_m, width, features]}}: each leaf's path rows."""
    leaf_B = np.asarray(leaf_B, np.int64)
    leaves = self.config.memory.k**self.config.memory.depth
    if leaf_B.size and not (0 <= leaf_B.min() and leaf_B.max() < leaves):
      raise BundleError(f'leaf ids must lie in [0, {leaves}); got {leaf_B.min()}..{leaf_B.max()}')
    unique = {t: np.unique(memory_bank.level_ids(self.config, leaf_B, t), return_inverse=True)
              for t in self.tables if t != 'generic'}
    rows = self.rows.read({t: ids_U for t, (ids_U, _) in unique.items()})  # every level at once
    return {t: {name: a[inverse_B] for name, a in rows[t].items()} for t, (_, inverse_B) in unique.items()}

  def generic(self) -> dict | None:
    """{name: [layers_m, width_total, features]}, or None when the run trained no generic block."""
    if 'generic' not in self.tables:
      return None
    return {name: rows[0] for name, rows in self.rows.read({'generic': np.zeros(1, np.int64)})['generic'].items()}

  def memory(self, leaf_B, mode: str) -> dict | None:
    """The model's `memory` argument for these leaves, in the compute dtype: the fetched path
    rows, the generic block for every sequence, or None ('none', or a run without memory)."""
    if mode not in MODES:
      raise BundleError(f'memory mode {mode!r}; choose one of {", ".join(MODES)}')
    if mode == 'none' or not self.has_memory:
      return None
    if mode == 'fetched':
      return memory_bank.assemble(self.blocks(leaf_B), None, None, self.dtype)
    generic = self.generic()
    if generic is None:
      raise BundleError('this run trained no generic block (memory.generic_prob=0); use --memory fetched or none')
    batch = np.shape(leaf_B)[0]
    tiled = {name: np.broadcast_to(a, (batch, *a.shape)) for name, a in generic.items()}
    return memory_bank.assemble({'generic': tiled}, None, None, self.dtype)


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
  however large, is left in place (hmem.infer.stored reads its rows)."""
  from hmem.train.checkpoint import Checkpoints
  from hmem.train.state import TrainState
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


def check_router(router: Router, cfg, where: str) -> None:
  """The router's tree and tokenizer must be the ones the model was trained with."""
  m = cfg.memory
  if memory_config.enabled(cfg) and (router.k, router.depth) != (m.k, m.depth):
    raise BundleError(f'{where}: its tree has k={router.k}, depth={router.depth} but the run was trained with '
                      f'memory.k={m.k}, memory.depth={m.depth}; route with the tree the run was trained on')
  check_tokenizer(router.tokenizer, cfg, where)


def check_tokenizer(tokenizer: Tokenizer, cfg, where: str) -> None:
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise BundleError(f'{where}: its tokenizer has {tokenizer.vocab_size} tokens but the model embeds '
                      f'{cfg.model.vocab_size}: it is not the tokenizer the run was trained with')


def run_tokenizer(workdir: str, cfg) -> Tokenizer | None:
  """The tokenizer of a run without a tree: its own tokenizer.json (written by `hmem import`),
  else data.tokenizer; None when it has neither (a run on synthetic tokens)."""
  for path in (as_path(workdir) / TOKENIZER, cfg.data.tokenizer and as_path(cfg.data.tokenizer)):
    if path and path.is_file():
      tokenizer = Tokenizer.load(path)
      check_tokenizer(tokenizer, cfg, str(path))
      return tokenizer
  return None


def open_source(*, bundle: str | None = None, workdir: str | None = None, step: int | None = None) -> MemorySource:
  """A MemorySource from an exported bundle or from a run directory (latest checkpoint, or `step`)."""
  if (bundle is None) == (workdir is None):
    raise BundleError('give exactly one of a bundle (--bundle) or a run directory (--workdir)')
  if bundle is not None:
    if step is not None:
      raise BundleError('--step applies to a run directory; a bundle holds one step')
    from hmem.infer.bundle import open_bundle
    return open_bundle(bundle)
  cfg, graphdef, params, step, step_dir = restore_params(workdir, step)
  rows = StoredRows(StoredBank(cfg, step_dir, step)) if memory_bank.tables(cfg) else None
  router = tokenizer = None
  if cfg.data.source == 'prepared':
    router = Router.load(cfg.data.path)
    check_router(router, cfg, cfg.data.path)
  else:
    tokenizer = run_tokenizer(workdir, cfg)
  return MemorySource(cfg, nnx.merge(graphdef, params), router, rows, step, tokenizer=tokenizer)
