"""Work the trainer runs between steps on the live state, supplied by packages train may not
import: lm-evaluation-harness (`train.harness`) is hmem/infer/live.py's.

A factory registered by name is called once with (config, mesh) before the state is built,
so it refuses a bad config first, and returns None when the config leaves it off, or a hook:
`hook.every` (steps between calls) and `hook(state) -> {metric: value}`, the row the trainer
logs with that step's metrics. The hmem CLI registers the harness's factory; in Python,
import hmem.infer.live before calling `train`."""

from __future__ import annotations

from collections.abc import Callable

from hmem.errors import ConfigError

_FACTORIES: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
  _FACTORIES[name] = factory


def create(cfg, mesh) -> list:
  """The hooks `cfg` turns on."""
  h = cfg.train.harness
  if (h.every or h.tasks) and 'harness' not in _FACTORIES:
    raise ConfigError('train.harness runs lm-evaluation-harness from hmem.infer.live: import it before calling '
                      'train (the hmem CLI does)')
  return [hook for factory in _FACTORIES.values() if (hook := factory(cfg, mesh)) is not None]
