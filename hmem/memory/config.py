"""Validation and derived quantities of `config.memory`."""

from __future__ import annotations

import math

from hmem.errors import ConfigError

TYPES = ('ffn', 'lora', 'kv')
LORA_TARGETS = {'ffn': ('gate', 'up', 'down'), 'qk': ('q', 'k'), 'vo': ('v', 'o')}
OPTIMIZERS = ('exact', 'lazy', 'dense')
# `exact` sums a missed step's drift up to this many steps after a row's last update, and
# drops what lies beyond once it is below DRIFT_TOLERANCE of one step at the peak lr.
MAX_DRIFT_WINDOW = 4096
DRIFT_TOLERANCE = 1e-6


def enabled(cfg) -> bool:
  return any(int(r) > 0 for r in cfg.memory.levels)


def memory_layers(cfg) -> tuple[int, int] | None:
  """(first, end) of the layers the memory widens, or None when memory is off."""
  if not enabled(cfg):
    return None
  L = cfg.model.layers
  layers = tuple(cfg.memory.layers)
  if not layers:
    return (0, L)
  if len(layers) != 2 or not 0 <= layers[0] < layers[1] <= L:
    raise ConfigError(f'memory.layers={layers}: write () for all layers or (first, end) with '
                      f'0 <= first < end <= model.layers={L}')
  return (int(layers[0]), int(layers[1]))


def generic_prob(cfg) -> float:
  """P(a training sequence uses the generic block instead of its fetched one)."""
  p = cfg.memory.generic_prob
  return 1.0 / (cfg.memory.k + 1) if p < 0 else float(p)


def active_levels(cfg) -> list[tuple[int, int]]:
  """[(level, width)] of the levels with a non-zero width; levels count from 1 (the root's
  children)."""
  return [(level, int(r)) for level, r in enumerate(cfg.memory.levels, start=1) if int(r) > 0]


def drift_window(cfg) -> int:
  """Steps after a row's last update whose drift the `exact` optimizer sums. The k-th one
  moves the row by at most lr_peak / (1 - b1) (b1/√b2)^k along m/√v, so the steps after
  the window together move it by at most DRIFT_TOLERANCE lr_peak m/√v (docs/DECISIONS.md)."""
  b1, b2 = cfg.train.b1, cfg.train.b2
  rho = b1 / math.sqrt(b2)
  if rho <= 0:
    return 1
  if rho >= 1:
    return MAX_DRIFT_WINDOW + 1  # m/√v grows with every missed step: no window suffices
  return max(1, math.ceil(math.log(DRIFT_TOLERANCE * (1 - rho) * (1 - b1)) / math.log(rho)) - 1)


def check(cfg) -> None:
  """Raises one ConfigError naming the first inconsistent memory setting."""
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
  if m.optimizer == 'exact' and drift_window(cfg) > MAX_DRIFT_WINDOW:
    raise ConfigError(f"memory.optimizer='exact' needs train.b1 / sqrt(train.b2) well below 1 (it is "
                      f'{cfg.train.b1 / math.sqrt(cfg.train.b2):.4f}, so the drift of a row between fetches does '
                      f"not fade within {MAX_DRIFT_WINDOW} steps); lower train.b1 or use memory.optimizer='lazy'")
  if not generic_prob(cfg) < 1:
    raise ConfigError(f'memory.generic_prob={m.generic_prob} must be < 1 (-1 = 1/(k+1), 0 = off)')
  if enabled(cfg) and cfg.data.source == 'synthetic' and cfg.data.synthetic_leaves > m.k ** m.depth:
    raise ConfigError(f'data.synthetic_leaves={cfg.data.synthetic_leaves} exceeds the {m.k ** m.depth} leaves '
                      f'of the memory tree (memory.k={m.k}, memory.depth={m.depth})')
  memory_layers(cfg)
