"""`hmem plan`: what a train step needs per device on N devices, without the devices.

The real train step (`hmem.train.step`) is lowered and compiled for the config's mesh on N
devices from abstract shapes only (`ShapeDtypeStruct`s carrying shardings; nothing is
allocated): N fake CPU devices, or with `--target` a TPU topology's compile-only devices
and the TPU compiler (hmem.plan.targets). From the compiled program: the per-device bytes
of every part of the state (from the shardings), the temporaries (XLA's memory analysis),
the collectives it runs per step by kind (from the HLO, loop trip counts included), and
the FLOPs per step (`hmem.sizes`). On fake CPU devices the temporaries come from the CPU
compiler's schedule and fusion, which differ from a GPU's or TPU's: an estimate. For a
TPU target they are the TPU compiler's, and `modeled` adds the step time of XLA's TPU cost
model (not measured) with the tokens/s and MFU it implies.

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
import re
import time

import jax

from hmem import hlo, sharding, sizes
from hmem.errors import ConfigError
from hmem.memory.spec import memory_spec
from hmem.train import hardware
from hmem.train.step import fresh_train_step
from hmem.train.trainer import check_batching

DEVICE_BYTES = 80 * 10 ** 9  # an 80 GB accelerator (H100, A100-80GB): the budget on fake CPU devices
STATE_PARTS = ('params', 'opt_state', 'bank', 'bank_opt')
MODELED = "modeled by XLA's TPU cost model, not measured"
# The TPU compiler refuses a program that does not fit: "RESOURCE_EXHAUSTED: Ran out of
# memory on HBM, the total memory required for HLO temporaries (131.60G) exceeds available
# HBM (15.75G)."
_REQUIRED = re.compile(r'required for [^(]*\((\d+(?:\.\d+)?)([KMGT])\)')


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _compile(cfg, devices, unroll: bool = False):
  """(mesh, state spec, abstract batch, the compiled train step or the compiler's
  out-of-memory error, compile seconds) of `cfg` on `devices`."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  check_batching(cfg, mesh)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    spec, _, step = fresh_train_step(cfg, mesh, init=False, unroll=unroll)
    batch = sharding.abstract_batch(mesh, cfg.train.batch_size, cfg.data.seq_len)
    start = time.perf_counter()
    try:
      compiled = step.lower(spec.abstract, batch).compile()
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      compiled = e
  return mesh, spec, batch, compiled, time.perf_counter() - start


def device_budget(devices, budget_bytes: int | None = None) -> int:
  """`budget_bytes`, else the memory of `devices`' chip (hmem.train.hardware), else 80 GB."""
  chip = hardware.chip(devices[0].device_kind)
  return budget_bytes or (chip.hbm_bytes if chip else DEVICE_BYTES)


def plan(cfg, devices=None, budget_bytes: int | None = None, model_time: bool = False) -> dict:
  """The per-device plan of one train step of `cfg` on `devices` (default: all); `fits`:
  its total is within `device_budget(devices, budget_bytes)` per device. `model_time` adds
  `modeled` (TPU targets only)."""
  memory_spec(cfg)
  devices = list(devices if devices is not None else jax.devices())
  budget = device_budget(devices, budget_bytes)
  mesh, spec, batch, compiled, compile_s = _compile(cfg, devices)
  per_device = {part: _bytes_per_device(getattr(spec.abstract, part)) for part in STATE_PARTS}
  per_device['batch'] = _bytes_per_device(batch)
  counts = sizes.sizes(cfg)
  out = {
      'devices': len(devices),
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'hosts': len({d.process_index for d in devices}),
      'mesh': dict(mesh.shape),
      'batch_size': cfg.train.batch_size, 'seq_len': cfg.data.seq_len, 'grad_accum': cfg.train.grad_accum,
      'remat': cfg.model.remat,
      'bytes_per_device': per_device,
      'budget_bytes': budget,
      'flops_per_step': sizes.flops_per_token(cfg, counts) * cfg.train.batch_size * cfg.data.seq_len,
      'compile_s': round(compile_s, 1),
      **counts,
  }
  if isinstance(compiled, Exception):  # the TPU compiler found it does not fit
    message = str(compiled).splitlines()[0]
    required = _REQUIRED.search(message)
    if required:  # the temporaries it needs, beside the state and batch it holds
      per_device['temporaries'] = int(float(required.group(1)) * 2 ** (10 * ' KMGT'.index(required.group(2))))
      per_device['total'] = sum(per_device.values())
    return {**out, 'fits': False, 'fits_80gb': False, 'compiler_error': message[:500], 'collective_bytes': {}}
  stats = compiled.memory_analysis()
  per_device['temporaries'] = int(stats.temp_size_in_bytes)
  # Arguments stay live through the step (the state is donated into the outputs).
  per_device['total'] = (int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes)
                         - int(stats.alias_size_in_bytes) + int(stats.temp_size_in_bytes))
  out.update(collective_bytes=hlo.collective_bytes_per_step(compiled.as_text()),
             fits_80gb=per_device['total'] <= DEVICE_BYTES, fits=per_device['total'] <= budget)
  if model_time:
    out['modeled'] = modeled(cfg, devices, out)
  return out


def modeled(cfg, devices, planned: dict) -> dict:
  """The step time XLA's TPU cost model gives the train step of `cfg` on `devices`, and what
  it implies, from `planned` (its plan): tokens/s per chip, MFU, and the roofline terms
  (XLA's FLOPs over the chip's peak, its bytes accessed over the HBM bandwidth, the
  collective bytes over the ICI bandwidth) to read the time against.

  XLA's cost analysis counts a loop's body once, so this compiles the step with every
  loop unrolled (layers and micro-batches; the same computation) and reports any loop
  left (`loops_counted_once`)."""
  chip = hardware.chip(devices[0].device_kind)
  if devices[0].platform != 'tpu' or chip is None:
    raise ConfigError('a modeled step time needs a TPU target (--target): XLA has a cost model for TPUs only')
  unrolled = copy.deepcopy(cfg)
  unrolled.model.scan_layers = False
  *_, compiled, compile_s = _compile(unrolled, devices, unroll=True)
  if isinstance(compiled, Exception):
    return {'source': MODELED, 'error': 'the unrolled step (for the cost model) does not fit: '
            + str(compiled).splitlines()[0][:300]}
  out = modeled_times(compiled.cost_analysis(), planned, chip, len(devices), cfg.train.batch_size * cfg.data.seq_len)
  out.update(loops_counted_once=[t for t in hlo.loop_trips(compiled.as_text()) if t > 1], compile_s=round(compile_s, 1))
  return out


def modeled_times(cost: dict, planned: dict, chip, chips: int, tokens: int) -> dict:
  """The cost model's step time and what it implies, beside the roofline terms. A step time
  that is not a positive number (the cost model gave -4.6 s for the 1b step with its
  21B bank on v5p:4x4x4) is reported as an error, with the roofline terms kept."""
  collective = sum(planned['collective_bytes'].values())
  out = {
      'source': MODELED,
      'flops_per_chip': float(cost['flops']),
      'bytes_accessed_per_chip': float(cost['bytes accessed']),
      'ideal_s': planned['flops_per_step'] / chips / chip.peak_flops,  # the model's FLOPs at peak
      'compute_s': float(cost['flops']) / chip.peak_flops,
      'memory_s': float(cost['bytes accessed']) / chip.hbm_bytes_per_s,
      'collective_s': collective / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None,
  }
  step_s = float(cost.get('optimal_seconds', float('nan')))
  if not (math.isfinite(step_s) and step_s > 0):
    out['error'] = (f"XLA's TPU cost model gave {step_s:.4g} s for this step, which is not a time; the roofline "
                    f'terms stand: compute {out["compute_s"]:.3g} s, HBM {out["memory_s"]:.3g} s')
    return out
  out.update(step_s=step_s, tokens_per_s_per_chip=tokens / step_s / chips,
             mfu=planned['flops_per_step'] / chips / step_s / chip.peak_flops)
  return out


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


def search(cfg, devices, budget_bytes: int | None = None, progress=None,
           model_time: bool = False) -> tuple[dict | None, list[dict]]:
  """(the cheapest fitting layout's plan, with its `flags` and, given `model_time`, its
  `modeled` time, or None; every plan tried, each {'fsdp', 'remat', 'total' or 'error'}).
  `budget_bytes` as in `plan`; `progress(text)` is told of each try."""
  devices = list(devices)
  if cfg.mesh.tensor < 1 or cfg.mesh.memory < 1 or len(devices) % (cfg.mesh.tensor * cfg.mesh.memory):
    raise ConfigError('--search lays out the data and fsdp axes: give mesh.tensor and mesh.memory as '
                      f'explicit sizes that divide the {len(devices)} devices')
  rest = len(devices) // (cfg.mesh.tensor * cfg.mesh.memory)
  shards = [f for f in range(1, rest + 1) if rest % f == 0]
  tried = []

  def attempt(fsdp, remat):
    """(the plan of one layout, with `fits`, and its config), or None when the layout is refused."""
    candidate = layout(cfg, fsdp, remat, len(devices))
    if progress:
      progress(' '.join(layout_flags(candidate)))
    try:
      out = plan(candidate, devices, budget_bytes)
    except ConfigError as e:  # e.g. a dimension FSDP cannot split
      tried.append({'fsdp': fsdp, 'remat': remat, 'error': str(e)})
      return None
    tried.append({'fsdp': fsdp, 'remat': remat, 'total': out['bytes_per_device'].get('total')})
    return {**out, 'flags': layout_flags(candidate)}, candidate

  for remat in REMATS:
    best = attempt(shards[-1], remat)
    if best is None or not best[0]['fits']:
      continue
    options = shards[:-1]  # fewer shards than the fitting full FSDP; find the fewest that fit
    while options:
      mid = len(options) // 2
      out = attempt(options[mid], remat)
      if out is None:  # refused: not a candidate, bisect the others
        del options[mid]
      elif out[0]['fits']:
        best, options = out, options[:mid]
      else:
        options = options[mid + 1:]
    found, found_cfg = best
    if model_time:
      found['modeled'] = modeled(found_cfg, devices, found)
    return found, tried
  return None, tried


def use_fake_devices(count: int, platform: str = 'cpu') -> None:
  """Makes `count` devices of `platform` available; call before jax starts its backends
  (`--devices` of `hmem plan`). On CPU they are fake host devices."""
  jax.config.update('jax_platforms', platform)
  if platform == 'cpu':
    jax.config.update('jax_num_cpu_devices', count)
