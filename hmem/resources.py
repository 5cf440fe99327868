"""Files that ship with hmem: config files (`configs/...`) and launcher scripts (`launch/...`).

A name is the path the user gave when it exists; else it is looked up, with or without its
`configs/` prefix and `.py` suffix, in the installed package (a wheel holds the repository's
configs/ and launch/ as hmem/configs and hmem/launch; see setup.py) and then beside the
package (a source checkout). So `--config 160m`, `--config paper/a2:160m` and
`sweep run sweeps/tiny` work from any directory, and `configs/tiny.py` works in and out of
the repository.
"""

from __future__ import annotations

import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_ROOTS = (_PACKAGE, os.path.dirname(_PACKAGE))  # installed, then a source checkout


def _find(name: str, folder: str, suffixes: tuple[str, ...]) -> str | None:
  if os.path.isfile(name):
    return name
  relative = name.removeprefix(f'{folder}/')
  for root in _ROOTS:
    for suffix in suffixes:
      path = os.path.join(root, folder, relative + suffix)
      if os.path.isfile(path):
        return path
  return None


def config_file(name: str) -> str | None:
  """The config or sweep file `name` names (a path, or e.g. `160m`, `paper/a2`, `sweeps/tiny`);
  None if there is none."""
  return _find(name, 'configs', ('', '.py'))


def launcher_file(name: str) -> str:
  """A launcher script such as `slurm.sbatch`."""
  path = _find(name, 'launch', ('',))
  if path is None:
    raise FileNotFoundError(f'launch/{name} ships with hmem but is missing; reinstall hmem')
  return path
