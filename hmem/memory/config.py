"""Validation and derived quantities of `config.memory`."""

from __future__ import annotations

from hmem.errors import ConfigError

TYPES = ('ffn', 'lora', 'kv')
LORA_TARGETS = {'ffn': ('gate', 'up', 'down'), 'qk': ('q', 'k'), 'vo': ('v', 'o')}


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
  if m.optimizer not in ('sparse', 'dense'):
    raise ConfigError(f"memory.optimizer={m.optimizer!r}; choose 'sparse' or 'dense'")
  if not generic_prob(cfg) < 1:
    raise ConfigError(f'memory.generic_prob={m.generic_prob} must be < 1 (-1 = 1/(k+1), 0 = off)')
  if enabled(cfg) and cfg.data.source == 'synthetic' and cfg.data.synthetic_leaves > m.k ** m.depth:
    raise ConfigError(f'data.synthetic_leaves={cfg.data.synthetic_leaves} exceeds the {m.k ** m.depth} leaves '
                      f'of the memory tree (memory.k={m.k}, memory.depth={m.depth})')
  memory_layers(cfg)
