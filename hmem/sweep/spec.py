"""Sweep files and the runs they expand into.

A sweep file is a config file (`get_config()` returns the base config) that also defines
`sweep()`, yielding one dict of config overrides per run, e.g.
`{'model.layers': 4, 'memory.levels': (8, 4), 'train.steps': 200}`. Each run is exactly
`hmem train --config FILE --workdir ROOT/NAME --config.KEY=VALUE ...`, so every launcher
runs the same command and a run can be reproduced by hand.

A sweep file may also define `evaluate(cfg, workdir)`, returning {metric: number} for one
finished run (its resolved config and workdir): `hmem sweep collect` adds those to the run's
row, e.g. probe accuracy (configs/sweeps/facts.py). It runs at every collect, so it should
cache what is expensive in the workdir.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re

from etils import epath

from hmem import resources
from hmem.config import apply_overrides, literal, load_config, user_code
from hmem.errors import ConfigError

# Keys --steps-scale multiplies with train.steps, so a shortened run keeps its shape
# (warmup fraction, evaluation and checkpoint at the end).
SCALED_KEYS = ('train.warmup_steps', 'train.log_every', 'train.eval_every', 'train.checkpoint_every')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str          # readable, unique within the sweep: the workdir's basename
  overrides: dict    # config key -> value, as the sweep file gave them (after --steps-scale)
  workdir: str
  common: tuple[str, ...] = ()  # `--config.KEY=VALUE` given to `hmem sweep` for every run

  def args(self) -> list[str]:
    """`--config.KEY=VALUE` arguments of `hmem train` for this run."""
    return [f'--config.{k}={literal(v)}' for k, v in self.overrides.items()] + list(self.common)


def _slug(key: str, value) -> str:
  text = literal(value).strip('()\'"').replace(',', '-') or 'none'
  return f'{key.rsplit(".", 1)[-1]}_{re.sub(r"[^A-Za-z0-9.-]+", "-", text)}'


def run_name(overrides: dict) -> str:
  """`layers_4.levels_8-4.steps_200`: the last part of each key with its value."""
  return '.'.join(_slug(k, v) for k, v in overrides.items()) or 'base'


def default_root(sweep_file: str) -> str:
  return os.path.join('runs', 'sweeps', os.path.splitext(os.path.basename(sweep_file))[0])


def sweep_file(name: str) -> str:
  """The sweep file `name` names: a path, or one that ships with hmem (`sweeps/tiny`)."""
  path = resources.config_file(name)
  if path is None:
    raise ConfigError(f'sweep file {name!r} not found; pass a file, or one that ships with hmem such as '
                      'sweeps/tiny or sweeps/paper_table7')
  return path


def _load_module(path: str):
  path = sweep_file(path)
  spec = importlib.util.spec_from_file_location(f'hmem_sweep_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  with user_code(f'sweep file {path!r}', path):
    spec.loader.exec_module(module)
  for fn in ('get_config', 'sweep'):
    if not callable(getattr(module, fn, None)):
      raise ConfigError(f'sweep file {path!r} defines no {fn}(); a sweep file has get_config() (the base '
                        'config) and sweep() (yielding one dict of config overrides per run)')
  return module


def evaluate_hook(sweep_file: str):
  """The sweep file's `evaluate` wrapped so its errors name the file and its result is
  checked; None when the file defines none."""
  module = _load_module(sweep_file)
  evaluate = getattr(module, 'evaluate', None)
  if evaluate is None:
    return None
  what = f'evaluate() of sweep file {sweep_file!r}'

  def checked(cfg, workdir: str) -> dict:
    with user_code(what, module.__file__):
      metrics = evaluate(cfg, workdir)
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items()):
      raise ConfigError(f'{what} returned {metrics!r}; return a dict of metric name -> number')
    return metrics

  return checked


def _scale_steps(cfg, overrides: dict, scale: float) -> dict:
  """Multiplies train.steps (and SCALED_KEYS) of one run by `scale`, at least 1 each."""
  out = dict(overrides)
  for key in ('train.steps', *SCALED_KEYS):
    section, name = key.split('.')
    value = out.get(key, cfg[section][name])
    if value > 0:
      out[key] = max(1, round(value * scale))
  return out


def expand(sweep_file: str, root: str | None = None, steps_scale: float = 1.0,
           common: tuple[str, ...] = ()) -> list[Run]:
  """The sweep's runs, each checked: its overrides (and the `common` ones, given on the
  command line for every run: data paths, say) apply to the base config (a typo or a wrong
  type stops here, before anything runs) and its name is unique."""
  if steps_scale <= 0:
    raise ConfigError(f'--steps-scale={steps_scale} must be > 0')
  module = _load_module(sweep_file)
  root = root or default_root(sweep_file)
  runs, seen = [], {}
  with user_code(f'sweep file {sweep_file!r}', module.__file__):
    items, base = list(module.sweep()), module.get_config()
  for i, overrides in enumerate(items):
    if not isinstance(overrides, dict):
      raise ConfigError(f'{sweep_file}: sweep() item {i} is {type(overrides).__name__}; yield dicts of '
                        "config overrides such as {'memory.levels': (8, 4)}")
    cfg = copy.deepcopy(base)
    name = run_name(overrides)
    if steps_scale != 1.0:  # a shortened run is another run: its own workdir
      overrides, name = _scale_steps(cfg, overrides, steps_scale), f'{name}.steps-x{steps_scale:g}'
    run = Run(name, overrides, str(epath.Path(root) / name), tuple(common))
    apply_overrides(cfg, run.args())
    if run.name in seen:
      raise ConfigError(f'{sweep_file}: runs {seen[run.name]} and {i} have the same overrides ({run.name}); '
                        'make every yielded dict distinct')
    seen[run.name] = i
    runs.append(run)
  if not runs:
    raise ConfigError(f'{sweep_file}: sweep() yielded no runs')
  return runs


def run_config(sweep_file: str, run: Run):
  """The resolved config of one run (what `hmem train` will load)."""
  return load_config(sweep_file, run.args())
