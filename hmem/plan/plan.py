"""`hmem plan`: what a train step needs per device on N devices, without the devices.

The real train step (`hmem.train.step`) is lowered and compiled for the config's mesh on N
devices from abstract shapes only (`ShapeDtypeStruct`s carrying shardings; nothing is
allocated), usually N fake CPU devices. From the compiled program: the per-device bytes
of every part of the state (from the shardings), the temporaries (XLA's memory analysis),
the collectives it runs per step by kind (from the HLO, loop trip counts included), and
the FLOPs per step (`hmem.sizes`). Temporaries come from the CPU compiler's schedule and
fusion, which differ from a GPU's or TPU's: treat them as an estimate.

`search` finds the cheapest layout that fits a memory budget: recomputation ('none' <
'dots' < 'full', by the compute it adds) first, then the fewest FSDP shards (the
least parameter traffic), data parallel over the rest of the devices. Per-device bytes
shrink as FSDP grows, so each remat policy is tried at full FSDP first (none fits: the next
policy) and the smallest FSDP that fits is then found by bisection: a few compiles, not
one per layout.
"""

from __future__ import annotations

import copy
import math
import time

import jax

from hmem import hlo, sharding, sizes
from hmem.errors import ConfigError
from hmem.memory import config as memory_config
from hmem.train.step import fresh_train_step
from hmem.train.trainer import check_batching

DEVICE_BYTES = 80 * 10 ** 9  # an 80 GB accelerator (H100, A100-80GB)
STATE_PARTS = ('params', 'opt_state', 'bank', 'bank_opt')


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def plan(cfg, devices=None, budget_bytes: int = DEVICE_BYTES) -> dict:
  """The per-device plan of one train step of `cfg` on `devices` (default: all); `fits`:
  its total is within `budget_bytes` per device."""
  memory_config.check(cfg)
  devices = list(devices if devices is not None else jax.devices())
  mesh = sharding.make_mesh(cfg.mesh, devices)
  check_batching(cfg, mesh)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    spec, _, step = fresh_train_step(cfg, mesh, init=False)
    batch = sharding.abstract_batch(mesh, cfg.train.batch_size, cfg.data.seq_len)
    start = time.perf_counter()
    compiled = step.lower(spec.abstract, batch).compile()
    compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  per_device = {part: _bytes_per_device(getattr(spec.abstract, part)) for part in STATE_PARTS}
  per_device['batch'] = _bytes_per_device(batch)
  per_device['temporaries'] = int(stats.temp_size_in_bytes)
  # Arguments stay live through the step (the state is donated into the outputs).
  per_device['total'] = (int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes)
                         - int(stats.alias_size_in_bytes) + int(stats.temp_size_in_bytes))
  counts = sizes.sizes(cfg)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  return {
      'devices': len(devices),
      'platform': devices[0].platform,
      'mesh': dict(mesh.shape),
      'batch_size': cfg.train.batch_size, 'grad_accum': cfg.train.grad_accum, 'remat': cfg.model.remat,
      'bytes_per_device': per_device,
      'collective_bytes': hlo.collective_bytes_per_step(compiled.as_text()),
      'flops_per_step': sizes.flops_per_token(cfg, counts) * tokens,
      'fits_80gb': per_device['total'] <= DEVICE_BYTES,
      'fits': per_device['total'] <= budget_bytes,
      'compile_s': round(compile_s, 1),
      **counts,
  }


REMATS = ('none', 'dots', 'full')


def layout(cfg, fsdp: int, remat: str, devices: int):
  """`cfg` with `fsdp` FSDP shards, data parallel over the other devices (tensor and memory
  axes as configured), and `remat`."""
  cfg = copy.deepcopy(cfg)
  rest = devices // (cfg.mesh.tensor * cfg.mesh.memory)
  cfg.mesh.update(fsdp=fsdp, data=rest // fsdp)
  cfg.model.remat = remat
  return cfg


def layout_flags(cfg) -> list[str]:
  """The overrides that select `cfg`'s layout."""
  return [f'--config.mesh.data={cfg.mesh.data}', f'--config.mesh.fsdp={cfg.mesh.fsdp}',
          f'--config.model.remat={cfg.model.remat}']


def search(cfg, devices, budget_bytes: int, progress=None) -> tuple[dict | None, list[dict]]:
  """(the cheapest fitting layout's plan, with its `flags`, or None; every plan tried, each
  {'fsdp', 'remat', 'total' or 'error'}). `progress(text)` is told of each try."""
  devices = list(devices)
  if cfg.mesh.tensor < 1 or cfg.mesh.memory < 1 or len(devices) % (cfg.mesh.tensor * cfg.mesh.memory):
    raise ConfigError('--search lays out the data and fsdp axes: give mesh.tensor and mesh.memory as '
                      f'explicit sizes that divide --devices={len(devices)}')
  rest = len(devices) // (cfg.mesh.tensor * cfg.mesh.memory)
  shards = [f for f in range(1, rest + 1) if rest % f == 0]
  tried = []

  def attempt(fsdp, remat):
    """The plan of one layout (with `fits`), or None when the layout is refused."""
    candidate = layout(cfg, fsdp, remat, len(devices))
    if progress:
      progress(' '.join(layout_flags(candidate)))
    try:
      out = plan(candidate, devices, budget_bytes)
    except ConfigError as e:  # e.g. a dimension FSDP cannot split
      tried.append({'fsdp': fsdp, 'remat': remat, 'error': str(e)})
      return None
    tried.append({'fsdp': fsdp, 'remat': remat, 'total': out['bytes_per_device']['total']})
    return {**out, 'flags': layout_flags(candidate)}

  for remat in REMATS:
    best = attempt(shards[-1], remat)
    if best is None or not best['fits']:
      continue
    options = shards[:-1]  # fewer shards than the fitting full FSDP; find the fewest that fit
    while options:
      mid = len(options) // 2
      out = attempt(options[mid], remat)
      if out is None:  # refused: not a candidate, bisect the others
        del options[mid]
      elif out['fits']:
        best, options = out, options[:mid]
      else:
        options = options[mid + 1:]
    return best, tried
  return None, tried


def use_fake_devices(count: int, platform: str = 'cpu') -> None:
  """Makes `count` devices of `platform` available; call before jax starts its backends
  (`--devices` of `hmem plan`). On CPU they are fake host devices."""
  jax.config.update('jax_platforms', platform)
  if platform == 'cpu':
    jax.config.update('jax_num_cpu_devices', count)
