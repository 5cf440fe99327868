"""A trained model ready for inference: anchor, bank rows and router, from a run or a bundle.

`open_source(workdir=RUN)` restores the anchor parameters of the run's latest (or a given)
checkpoint onto one device, reads the bank rows a batch needs from the checkpoint on
demand (caught up to its step: hmem.bundle.stored; the bank is never restored whole) and
routes with the tree of the dataset the run trained on (`data.path`), or, for a run without
a tree (made by `hmem import`), with no router and the run's own tokenizer;
`open_source(bundle=DIR)` reads an exported bundle (rows read as paths need them).
Either way the caller gets the same `MemorySource`: the model, the router, and the rows of
any leaf's path assembled into the model's `memory` argument.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from flax import nnx

from hmem.bundle.open import check_router, check_tokenizer, open_bundle
from hmem.bundle.stored import StoredBank, StoredRows
from hmem.data.router import TOKENIZER, Router
from hmem.data.tokenizer import Tokenizer
from hmem.errors import BundleError
from hmem.files import as_path
from hmem.memory import bank as memory_bank
from hmem.model.transformer import dtype_of
from hmem.train.params import restore_params

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
    b = open_bundle(bundle)
    return MemorySource(b.config, nnx.merge(b.graphdef, b.params), b.router, b.rows, b.step, manifest=b.manifest)
  cfg, graphdef, params, step, step_dir = restore_params(workdir, step)
  rows = StoredRows(StoredBank(cfg, step_dir, step)) if memory_bank.tables(cfg) else None
  router = tokenizer = None
  if cfg.data.source == 'prepared':
    router = Router.load(cfg.data.path)
    check_router(router, cfg, cfg.data.path)
  else:
    tokenizer = run_tokenizer(workdir, cfg)
  return MemorySource(cfg, nnx.merge(graphdef, params), router, rows, step, tokenizer=tokenizer)
