"""The memory settings of a config, validated and derived once: `memory_spec(cfg)`.

`config.memory` (with the model's widths and the optimizer's betas) says what the user
asked for; a `MemorySpec` is what follows from it: the active levels and their tables,
the layers the memory widens, each row's named arrays, the generic block's probability,
the bank optimizer's settings and the `exact` optimizer's drift window. The bank, its
optimizer, the train step, the readers of a trained bank and the router read this one
frozen record instead of re-deriving from the config.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from hmem.errors import ConfigError

TYPES = ('ffn', 'lora', 'kv')
LORA_TARGETS = {'ffn': ('gate', 'up', 'down'), 'qk': ('q', 'k'), 'vo': ('v', 'o')}
OPTIMIZERS = ('exact', 'lazy', 'dense')
# `exact` sums a missed step's drift up to this many steps after a row's last update, and
# drops what lies beyond once it is below DRIFT_TOLERANCE of one step at the peak lr.
MAX_DRIFT_WINDOW = 4096
DRIFT_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """What the bank, its optimizer and the router need of a config.

  Levels count from 1 (the root's children); level l has k**l nodes, one bank row each.
  `levels` holds the active ones, (level, width) root to leaf. `arrays` names the arrays
  of one row with their feature sizes: a row of width r is {name: [layers_m, r, features]}.
  """
  k: int
  depth: int
  type: str
  levels: tuple[tuple[int, int], ...]
  layers: tuple[int, int] | None  # (first, end) of the widened layers; None: memory off
  arrays: tuple[tuple[str, int], ...]
  generic_prob: float
  init_std: float
  # The bank's AdamW (hmem.memory.optimizer).
  optimizer: str
  lr: float
  min_lr: float
  weight_decay: float
  warmup_steps: int
  schedule_steps: int
  b1: float
  b2: float
  eps: float
  drift_window: int

  @property
  def enabled(self) -> bool:
    return bool(self.levels)

  @property
  def leaves(self) -> int:
    return self.k ** self.depth

  @property
  def fetch_width(self) -> int:
    """Hidden units (FFN), rank (LoRA) or slots (KV) one sequence fetches per memory layer."""
    return sum(width for _, width in self.levels)

  @functools.cached_property
  def tables(self) -> dict[str, tuple[int, int]]:
    """{table: (rows, width)} in fetch order: levels root to leaf, then the generic block."""
    out = {f'level{level}': (self.k ** level, width) for level, width in self.levels}
    if out and self.generic_prob > 0:
      out['generic'] = (1, self.fetch_width)
    return out

  def block_shapes(self, width: int) -> dict[str, tuple[int, ...]]:
    """Named arrays of one row of width `width`: [layers_m, width, features]."""
    first, end = self.layers
    return {name: (end - first, width, features) for name, features in self.arrays}

  @functools.cached_property
  def bank_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
    """{table: {name: [rows, layers_m, width, features]}}."""
    return {t: {n: (rows, *s) for n, s in self.block_shapes(width).items()} for t, (rows, width) in self.tables.items()}

  def level_ids(self, leaf_B, table: str):
    """Node ids of `table`'s level on each sequence's root-to-leaf path (numpy or jax)."""
    level = int(table.removeprefix('level'))
    return leaf_B // self.k ** (self.depth - level)

  @functools.cached_property
  def param_counts(self) -> dict[str, int]:
    """fetch_params: what one sequence fetches (the root-to-leaf path); bank_params: all
    nodes. The generic block is a training-time control, not part of the bank."""
    fetch = bank = 0
    for table, named in self.bank_shapes.items():
      if table != 'generic':
        for shape in named.values():
          bank += math.prod(shape)
          fetch += math.prod(shape[1:])
    return {'fetch_params': fetch, 'bank_params': bank}


def memory_spec(cfg) -> MemorySpec:
  """The validated spec of `cfg`; one ConfigError naming the first inconsistent setting."""
  m, t = cfg.memory, cfg.train
  _check(cfg)
  levels = tuple((level, int(r)) for level, r in enumerate(m.levels, start=1) if int(r) > 0)
  return MemorySpec(
      k=int(m.k), depth=int(m.depth), type=m.type, levels=levels, layers=_layers(cfg) if levels else None,
      arrays=_arrays(cfg), generic_prob=_generic_prob(cfg), init_std=float(m.init_std), optimizer=m.optimizer,
      lr=float(m.lr), min_lr=float(m.min_lr), weight_decay=float(m.weight_decay),
      warmup_steps=int(t.warmup_steps), schedule_steps=int(t.schedule_steps or t.steps),
      b1=float(t.b1), b2=float(t.b2), eps=float(t.eps), drift_window=_drift_window(t.b1, t.b2))


def memory_layers(cfg) -> tuple[int, int] | None:
  """(first, end) of the layers the memory widens, or None when memory is off: what the
  model is built with (`build_model(cfg, memory_layers=...)`)."""
  return memory_spec(cfg).layers


def _layers(cfg) -> tuple[int, int]:
  L = cfg.model.layers
  layers = tuple(cfg.memory.layers)
  if not layers:
    return (0, L)
  if len(layers) != 2 or not 0 <= layers[0] < layers[1] <= L:
    raise ConfigError(f'memory.layers={layers}: write () for all layers or (first, end) with '
                      f'0 <= first < end <= model.layers={L}')
  return (int(layers[0]), int(layers[1]))


def _arrays(cfg) -> tuple[tuple[str, int], ...]:
  m = cfg.model
  d, F, NH, KH = m.d_model, m.ffn, m.heads * m.head_dim, m.kv_heads * m.head_dim
  if cfg.memory.type == 'ffn':
    return (('ffn_gate', d), ('ffn_up', d), ('ffn_down', d))
  if cfg.memory.type == 'kv':
    return (('kv_keys', KH), ('kv_values', KH))
  dims = {'q': (d, NH), 'k': (d, KH), 'v': (d, KH), 'o': (NH, d), 'gate': (d, F), 'up': (d, F), 'down': (F, d)}
  return tuple(array for target in LORA_TARGETS[cfg.memory.lora_targets]
               for array in ((f'lora_{target}_a', dims[target][0]), (f'lora_{target}_b', dims[target][1])))


def _generic_prob(cfg) -> float:
  """P(a training sequence uses the generic block instead of its fetched one)."""
  p = cfg.memory.generic_prob
  return 1.0 / (cfg.memory.k + 1) if p < 0 else float(p)


def _drift_window(b1: float, b2: float) -> int:
  """Steps after a row's last update whose drift the `exact` optimizer sums. The k-th one
  moves the row by at most lr_peak / (1 - b1) (b1/√b2)^k along m/√v, so the steps after
  the window together move it by at most DRIFT_TOLERANCE lr_peak m/√v (docs/DECISIONS.md)."""
  rho = b1 / math.sqrt(b2)
  if rho <= 0:
    return 1
  if rho >= 1:
    return MAX_DRIFT_WINDOW + 1  # m/√v grows with every missed step: no window suffices
  return max(1, math.ceil(math.log(DRIFT_TOLERANCE * (1 - rho) * (1 - b1)) / math.log(rho)) - 1)


def _check(cfg) -> None:
  m = cfg.memory
  if len(m.levels) != m.depth:
    raise ConfigError(f'memory.levels={tuple(m.levels)} has {len(m.levels)} entries but memory.depth={m.depth}; '
                      f'give one width per level, e.g. --config.memory.levels="{(0,) * m.depth}"')
  if m.k < 2 or m.depth < 1:
    raise ConfigError(f'memory.k={m.k}, memory.depth={m.depth}: need k >= 2 and depth >= 1')
  if any(int(r) < 0 for r in m.levels):
    raise ConfigError(f'memory.levels={tuple(m.levels)} must be non-negative')
  if m.type not in TYPES:
    raise ConfigError(f'memory.type={m.type!r}; choose one of {", ".join(TYPES)}')
  if m.type == 'lora' and m.lora_targets not in LORA_TARGETS:
    raise ConfigError(f'memory.lora_targets={m.lora_targets!r}; choose one of {", ".join(LORA_TARGETS)}')
  if m.optimizer == 'sparse':
    raise ConfigError("memory.optimizer='sparse' is now two options: 'exact' (row-sparse AdamW that also moves "
                      "rows between their fetches as dense AdamW does; the default) or 'lazy' (the former "
                      "'sparse': rows not fetched only decay)")
  if m.optimizer not in OPTIMIZERS:
    raise ConfigError(f'memory.optimizer={m.optimizer!r}; choose one of {", ".join(OPTIMIZERS)}')
  if m.optimizer == 'exact' and _drift_window(cfg.train.b1, cfg.train.b2) > MAX_DRIFT_WINDOW:
    raise ConfigError(f"memory.optimizer='exact' needs train.b1 / sqrt(train.b2) well below 1 (it is "
                      f'{cfg.train.b1 / math.sqrt(cfg.train.b2):.4f}, so the drift of a row between fetches does '
                      f"not fade within {MAX_DRIFT_WINDOW} steps); lower train.b1 or use memory.optimizer='lazy'")
  if not _generic_prob(cfg) < 1:
    raise ConfigError(f'memory.generic_prob={m.generic_prob} must be < 1 (-1 = 1/(k+1), 0 = off)')
  enabled = any(int(r) > 0 for r in m.levels)
  if enabled and cfg.data.source == 'synthetic' and cfg.data.synthetic_leaves > m.k ** m.depth:
    raise ConfigError(f'data.synthetic_leaves={cfg.data.synthetic_leaves} exceeds the {m.k ** m.depth} leaves '
                      f'of the memory tree (memory.k={m.k}, memory.depth={m.depth})')
  if enabled:
    _layers(cfg)
