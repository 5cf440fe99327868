"""Compile targets of `hmem plan --target`: a TPU topology such as `v5p:4x4x4` (a v5p-128
slice: 64 chips on 16 hosts) or `v5e:16x16`, as the compile-only devices of the TPU
compiler, so that the train step compiles for a pod on a machine without one.

The TPU compiler is libtpu, from PyPI: `pip install '.[tpu]'` (jax[tpu] at hmem's jax
version). jax keeps the CPU as its default backend (`hmem plan` sets it): nothing runs on
these devices, they only compile.
"""

from __future__ import annotations

import importlib.util
import os

import jax

from hmem.errors import ConfigError
from hmem.train import hardware

EXAMPLES = 'v5e:4x4, v5e:16x16, v5p:4x4x4, v5p:8x8x8, v6e:16x16'


def tpu_devices(topology: str, slices: int = 1) -> list[jax.Device]:
  """The compile-only devices of `slices` slices of TPU `topology` (chip kind, then the chip
  grid: `v5p:4x4x4`), slice by slice."""
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError(f'--target {topology} compiles with the TPU compiler (libtpu), which is not installed: '
                      "pip install '.[tpu]' (or 'jax[tpu]' at the installed jax version)")
  if slices < 1:
    raise ConfigError(f'--slices {slices}: give 1 or more')
  kind, _, grid = topology.partition(':')
  known = sorted({c.name for c in hardware.TPUS.values()})
  if kind not in known or not grid:
    raise ConfigError(f'--target {topology!r}: give a TPU kind ({", ".join(known)}) and its chip grid, e.g. '
                      f'{EXAMPLES}')
  # Compiling only: no lock on the (absent) TPU, so that several plans and tests run at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  try:
    found = topologies.get_topology_desc(topology_name=topology, platform='tpu', num_slices=slices)
  except jax.errors.JaxRuntimeError as e:
    raise ConfigError(f'--target {topology}: the TPU compiler refuses it ({str(e).splitlines()[0]}); a slice '
                      f'spans whole hosts (v5e and v6e: 2x2 chips each, v5p: 2x2x1), e.g. {EXAMPLES}') from None
  return list(found.devices)
