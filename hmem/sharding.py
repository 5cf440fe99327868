"""The device mesh and the mapping from logical axis names to mesh axes.

Parameters carry logical names (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...); the
ordered rule list in `config.mesh.rules` turns them into PartitionSpecs. Activations are
constrained the same way through `constrain`, which is a no-op outside `use_mesh`, so
the model runs unchanged on one device and in tests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hmem.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor', 'memory')
BATCH_AXES = ('data', 'fsdp')

_ACTIVE: list[tuple[Mesh, tuple]] = []


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves the one allowed -1 so the product is `num_devices`; explains any mismatch."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh sizes {dict(zip(MESH_AXES, sizes))}: use positive sizes and at most one -1')
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f'mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: '
                       f'{num_devices} is not a multiple of {known}')
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but '
                     f'{num_devices} are present; set one axis to -1 or match the device count')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `mesh_cfg` over `devices` (default: all), laid out on a TPU's physical torus
  (an axis may span part of a physical one: data 8 x fsdp 8 on a 4x4x4 v5p). Several slices
  are joined over the data axis alone: they talk over the data-center network."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:
    if shape[0] % slices:
      raise ConfigError(f'mesh.data={shape[0]} on {slices} slices: the slices are joined over the data axis, so '
                        f'give mesh.data a multiple of {slices}')
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, *(1,) * (len(shape) - 1)),
                                                devices, allow_split_physical_axes=True)
  else:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  # Auto axes: XLA propagates shardings from the jit boundaries and our constraints.
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None] | None, rules) -> P:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once. A name
  without a rule is an error: replicating it silently could cost a device's memory."""
  if logical is None:
    return P()
  table = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  unknown = [name for name in logical if name is not None and name not in table]
  if unknown:
    raise ConfigError(f'logical axis {", ".join(map(repr, unknown))} has no rule in mesh.rules; add one, e.g. '
                      f'({unknown[0]!r}, None) to replicate it')
  used: set[str] = set()
  out = []
  for name in logical:
    axes = table[name] if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    free = tuple(a for a in axes if a not in used)
    used.update(free)
    out.append(free if len(free) > 1 else (free[0] if free else None))
  return P(*out)


def drop_indivisible(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Replicates any dimension the mesh axes mapped onto it do not divide evenly."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if size and dim % size == 0 else None)
  return P(*out)


def named_sharding(mesh: Mesh, logical, rules, shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, drop_indivisible(logical_to_spec(logical, rules), shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  """Shardings of a batch dict: every array split over data x fsdp on its row axis."""
  return {'tokens': batch_sharding(mesh, 2), 'segment_ids': batch_sharding(mesh, 2),
          'leaf_id': batch_sharding(mesh, 1)}


def abstract_batch(mesh: Mesh, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A batch's shapes and shardings, to lower and compile a step without data."""
  ds = data_shardings(mesh)
  shapes = {'tokens': (batch_size, seq_len), 'segment_ids': (batch_size, seq_len), 'leaf_id': (batch_size,)}
  return {k: jax.ShapeDtypeStruct(shape, 'int32', sharding=ds[k]) for k, shape in shapes.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
  """Activates `mesh` (for jit and PartitionSpecs) and the logical rules for `constrain`."""
  rules = tuple(tuple(r) for r in rules)
  _ACTIVE.append((mesh, rules))
  try:
    # flax reads the same rules when nnx.eval_shape annotates abstract variables.
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      yield mesh
  finally:
    _ACTIVE.pop()


@contextlib.contextmanager
def on_host():
  """Eager jax work inside runs on this host's CPU, whatever mesh is active: what a step
  is built from (schedule tables) must not need the mesh's devices, which may be
  compile-only (`hmem plan --target`) or busy. Without a CPU backend (JAX_PLATFORMS
  excludes it) the work stays where it was."""
  try:
    cpu = jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    yield
    return
  with jax.set_mesh(Mesh(np.array([cpu]), ('host',))), jax.default_device(cpu):
    yield


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names under `use_mesh`; identity otherwise."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  spec = drop_indivisible(logical_to_spec(logical, rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def host_local_rows(global_batch: int, mesh: Mesh) -> slice:
  """Rows of the global batch that this process's devices hold (batch over data x fsdp)."""
  sharding = batch_sharding(mesh, 1)
  idx = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted({i[0].start or 0 for i in idx.values()})
  stops = sorted({i[0].stop if i[0].stop is not None else global_batch for i in idx.values()})
  lo, hi = starts[0], stops[-1]
  if sum(b - a for a, b in zip(starts, stops)) != hi - lo:
    raise ConfigError('this process holds a non-contiguous part of the batch; order the mesh '
                     'so that data x fsdp is major across processes')
  return slice(lo, hi)


def np_global(x: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
  """Builds a global array from this process's rows of it."""
  return jax.make_array_from_process_local_data(sharding, x, global_shape)
