"""`hmem plan`: what a train step needs per device on N devices, without the devices.

The real train step (`hmem.train.step`) is lowered and compiled for the config's mesh on N
devices from abstract shapes only (`ShapeDtypeStruct`s carrying shardings; nothing is
allocated), usually N fake CPU devices. From the compiled program: the per-device bytes
of every part of the state (from the shardings), the temporaries (XLA's memory analysis),
the collectives it runs per step by kind (from the HLO, loop trip counts included), and
the FLOPs per step (`hmem.sizes`). Temporaries come from the CPU compiler's schedule and
fusion, which differ from a GPU's or TPU's: treat them as an estimate.
"""

from __future__ import annotations

import math
import time

import jax

from hmem import hlo, sharding, sizes
from hmem.memory import config as memory_config
from hmem.train.step import fresh_train_step
from hmem.train.trainer import check_batching

DEVICE_BYTES = 80 * 10 ** 9  # an 80 GB accelerator (H100, A100-80GB)
STATE_PARTS = ('params', 'opt_state', 'bank', 'bank_opt')


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def plan(cfg, devices=None) -> dict:
  """The per-device plan of one train step of `cfg` on `devices` (default: all)."""
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
      'compile_s': round(compile_s, 1),
      **counts,
  }


def use_fake_devices(count: int, platform: str = 'cpu') -> None:
  """Makes `count` devices of `platform` available; call before jax starts its backends
  (`--devices` of `hmem plan`). On CPU they are fake host devices."""
  jax.config.update('jax_platforms', platform)
  if platform == 'cpu':
    jax.config.update('jax_num_cpu_devices', count)
