"""lm-evaluation-harness inside training (`train.harness`): tasks scored on the live
parameters and bank every `train.harness.every` steps, logged as harness/TASK/METRIC/MODE
(metrics.jsonl, TensorBoard, W&B) with the call's cost in `harness/seconds`. A trainer hook
(hmem.train.hooks), registered on import.

Nothing is written: no checkpoint, no bundle. Each call gathers the anchor parameters onto
one device of every process (a collective all processes join) and reads the bank rows a
batch needs from the sharded bank on demand, caught up to the current step as dense AdamW
holds them (what a checkpoint's reader and export serve), so the numbers are those of
`lm_eval --model hmem` on the checkpoint of the same step. Every process runs the same
requests in the same order, so the row reads (collectives over the trainer's mesh) pair up;
each process scores on its own device and process 0 logs. The train state is only read, and
the global random generators lm-eval seeds (Python's, NumPy's) are restored after each call:
a run's trajectory is the same with the harness on or off.
"""

from __future__ import annotations

import random
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hmem import sharding
from hmem.bundle.open import check_router
from hmem.data.router import Router
from hmem.errors import ConfigError, UserError
from hmem.infer import table
from hmem.infer.source import MemorySource
from hmem.memory import optimizer as memory_optimizer
from hmem.memory.spec import memory_spec
from hmem.train import hooks
from hmem.train.params import abstract_params


class LiveRows:
  """Bank rows read from the train state's sharded bank ({table: {name: [rows, ...]}}) and
  its optimizer state, caught up to `step`; a BankRows for MemorySource."""

  def __init__(self, cfg, mesh, bank: dict, bank_opt: dict, step: int):
    self.mesh, self.rules, self.bank, self.bank_opt, self.step = mesh, cfg.mesh.rules, bank, bank_opt, step
    spec = memory_spec(cfg)

    def rows(bank_t, opt_t, ids_U, step):
      take = lambda tree: jax.tree.map(lambda a: a[ids_U], tree)
      return memory_optimizer.caught_up(spec, take(bank_t), take(opt_t['mu']), take(opt_t['nu']),
                                        opt_t['last_step'][ids_U], step)

    self._rows = jax.jit(rows, out_shardings=sharding.replicated(mesh))

  def read(self, requests: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for table_name, ids_U in requests.items():
      # Padded (with its last id) to a power of two: a few program shapes serve every batch.
      padded = np.pad(ids_U, (0, (1 << (len(ids_U) - 1).bit_length()) - len(ids_U)), mode='edge').astype(np.int32)
      with sharding.use_mesh(self.mesh, self.rules):  # the bank's mesh, whatever the caller's
        ids = sharding.np_global(padded, sharding.replicated(self.mesh), padded.shape)
        rows = self._rows(self.bank[table_name], self.bank_opt[table_name], ids, np.int32(self.step))
      out[table_name] = {n: np.asarray(a.addressable_data(0))[:len(ids_U)] for n, a in rows.items()}
    return out


class Harness:
  """The configured tasks, checked and resolved once (`create`, before the state is built);
  called with the state, returns the row to log."""

  def __init__(self, cfg, mesh, router: Router, manager, tasks: list[str], modes: list[str]):
    self.cfg, self.mesh, self.router, self.every = cfg, mesh, router, cfg.train.harness.every
    self.manager, self.tasks, self.modes = manager, tasks, modes
    self.graphdef = abstract_params(cfg)[0]

  @classmethod
  def create(cls, cfg, mesh) -> Harness | None:
    """None when `train.harness` is off; else raises ConfigError for what cannot run."""
    h = cfg.train.harness
    if not h.every or not h.tasks:
      if h.every or h.tasks:
        raise ConfigError(f'train.harness needs both tasks and every (got tasks={h.tasks!r}, every={h.every}); '
                          'e.g. --config.train.harness.tasks=hmem_knowledge --config.train.harness.every=100')
      return None
    try:
      import lm_eval  # noqa: F401
    except ImportError as e:
      raise ConfigError(f'train.harness runs lm-evaluation-harness ({e}); pip install "hmem[eval]"') from None
    if cfg.data.source != 'prepared':
      raise ConfigError('train.harness scores text, which needs the tokenizer and tree of a prepared dataset; set '
                        'data.source=prepared (a run on synthetic tokens has none)')
    names = [t for t in h.tasks.split(',') if t]
    try:
      manager = table.task_manager(names, [p for p in h.include_path.split(',') if p])
      tasks = table.resolve_tasks(manager, names)
      tables = memory_spec(cfg).tables
      modes = table.check_modes(tables, h.modes.split(',') if h.modes else table.default_modes(tables))
    except UserError as e:
      raise ConfigError(f'train.harness: {e}') from None
    router = Router.load(cfg.data.path)
    check_router(router, cfg, cfg.data.path)
    return cls(cfg, mesh, router, manager, tasks, modes)

  def __call__(self, state) -> dict[str, float]:
    """{harness/TASK/METRIC/MODE: value, harness/seconds: this call's wall time}."""
    start = time.perf_counter()
    h, step = self.cfg.train.harness, int(state.step)
    device = jax.local_devices()[0]
    params = jax.device_put(multihost_utils.process_allgather(state.params, tiled=True), device)
    rows = LiveRows(self.cfg, self.mesh, state.bank, state.bank_opt, step) if state.bank else None
    source = MemorySource(self.cfg, nnx.merge(self.graphdef, params), self.router, rows, step)
    # Scoring runs on this process's first device, under a one-device mesh of the same axes.
    local = jax.make_mesh((1,) * len(sharding.MESH_AXES), sharding.MESH_AXES, devices=[device],
                          axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
    seeds = random.getstate(), np.random.get_state()
    try:
      with sharding.use_mesh(local, self.cfg.mesh.rules), jax.default_device(device):
        result = table.run_modes(source, self.tasks, self.modes, manager=self.manager, limit=h.limit or None,
                                 batch_size=h.batch_size)
    finally:
      random.setstate(seeds[0])
      np.random.set_state(seeds[1])
    row = {f'harness/{task}/{metric}/{mode}': value for task, metric, mode, value, _ in table.rows(result)}
    row['harness/seconds'] = time.perf_counter() - start
    return row


hooks.register('harness', Harness.create)
