"""Validation and derived quantities of `config.memory`."""

from __future__ import annotations

from hmem.errors import ConfigError


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
  memory_layers(cfg)
