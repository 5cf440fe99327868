"""Train-step throughput and MFU against the device's measured matmul peak.

    python benchmarks/step.py [--config configs/bench_cpu.py] [--quick] [--pairs N] [--devices N]

Shared machines swing 2x within a minute, so the peak is re-measured next to every step
timing (interleaved A/B pairs) and MFU is the median of the paired ratios. MFU is per
device: the step's FLOPs over the devices, against one device's measured peak. FLOPs per
token are `hmem.sizes.flops_per_token` (docs/PERFORMANCE.md gives the formula).

The config's batch is per device: the run uses `--devices` devices (default: all of an
accelerator host; one CPU device, because fake host-platform devices share the same cores)
and multiplies the batch by their number. `--quick` times batch 1 per device and two matmul
sizes so it finishes in under a minute on a 2-core CPU. Prints a table, then one JSON object
as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# XLA:CPU allocates every step's temporaries afresh (GBs at batch 8); with 4 KiB pages the
# first touch of them costs ~0.5 M page faults per step at batch 2, 0.1-0.8 s of kernel time.
# glibc's malloc asks for transparent huge pages with this tunable, read at start-up only, so
# the script re-executes itself once with it (HMEM_HUGETLB=0 opts out, for A/B runs).
_HUGETLB = 'glibc.malloc.hugetlb=1'
if (__name__ == '__main__' and os.environ.get('HMEM_HUGETLB', '1') != '0'
    and _HUGETLB not in os.environ.get('GLIBC_TUNABLES', '')):
  _tunables = ':'.join(filter(None, [os.environ.get('GLIBC_TUNABLES'), _HUGETLB]))
  os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, 'GLIBC_TUNABLES': _tunables})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hmem import sharding, sizes  # noqa: E402
from hmem.config import load_config  # noqa: E402
from hmem.data import Position, make_source  # noqa: E402
from hmem.train.step import fresh_train_step  # noqa: E402


def _timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def matmul_peak(sizes_n, dtype, device, repeats: int = 2) -> float:
  """Best FLOP/s of `device` over square matmuls of the given sizes (best of `repeats` each)."""
  best = 0.0
  for n in sizes_n:
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))  # compile
    seconds = min(_timed(mm, a) for _ in range(repeats))
    best = max(best, 2 * n ** 3 / seconds)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=os.path.join(os.path.dirname(__file__), '..', 'configs', 'bench_cpu.py'))
  parser.add_argument('--quick', action='store_true', help='batch 1, small peak probe: < 60 s on 2 CPU cores')
  parser.add_argument('--pairs', type=int, default=0, help='interleaved (peak, step) pairs; default 3 quick / 5')
  parser.add_argument('--devices', type=int, default=0,
                      help='devices to use; default all, or 1 on CPU (fake CPU devices share the cores)')
  parser.add_argument('overrides', nargs='*', help='config overrides, e.g. train.batch_size=4 (per device)')
  args = parser.parse_args()

  cpu = jax.devices()[0].platform == 'cpu'
  devices = jax.devices()[:args.devices or (1 if cpu else jax.device_count())]
  n = len(devices)
  overrides = list(args.overrides) + (['train.batch_size=1', 'train.grad_accum=1'] if args.quick else [])
  cfg = load_config(args.config, overrides)
  per_device_batch = cfg.train.batch_size
  cfg.train.batch_size = per_device_batch * n
  cfg.mesh.update(data=-1, fsdp=1, tensor=1, memory=1)
  pairs = args.pairs or (3 if args.quick else 5)
  peak_sizes = (1024, 2048) if args.quick else (1024, 2048, 3072, 4096)
  dtype = jnp.dtype(cfg.model.dtype)
  note = (f'{n} of {jax.device_count()} devices' + (' (fake CPU devices share the cores: one is timed)'
                                                    if cpu and n < jax.device_count() else ''))

  mesh = sharding.make_mesh(cfg.mesh, devices)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    _, state, step = fresh_train_step(cfg, mesh)
    source = make_source(cfg)
    host = source.batch(Position(), slice(0, cfg.train.batch_size))
    shardings = sharding.data_shardings(mesh)
    batch = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
    start = time.perf_counter()
    step = step.compile(state, batch)
    compile_s = time.perf_counter() - start
    state, metrics = step(state, batch)  # warm-up; the donated state is replaced each step
    jax.block_until_ready(metrics)

  # Outside the mesh context: the peak probe runs on one device, the compiled step anywhere.
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops = sizes.flops_per_token(cfg) * tokens
  rows = []
  for _ in range(pairs):
    peak = matmul_peak(peak_sizes, dtype, devices[0])  # one device's
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    per_device = flops / seconds / n
    rows.append({'step_s': seconds, 'peak': peak, 'flops_per_s': per_device, 'mfu': per_device / peak})

  med = lambda key: statistics.median(r[key] for r in rows)
  step_s = med('step_s')
  result = {
      'config': os.path.basename(args.config), 'quick': args.quick, 'device': devices[0].device_kind,
      'devices': n, 'host_devices': jax.device_count(), 'batch': cfg.train.batch_size,
      'batch_per_device': per_device_batch, 'seq_len': cfg.data.seq_len,
      'dtype': str(dtype), 'pairs': pairs, 'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'compile_s': compile_s, 'step_s': step_s,
      'tokens_per_s': tokens / step_s, 'flops_per_token': sizes.flops_per_token(cfg),
      'flops_per_s': med('flops_per_s'), 'peak_flops_per_s': med('peak'), 'mfu': med('mfu'),
      'mfu_min': min(r['mfu'] for r in rows), 'mfu_max': max(r['mfu'] for r in rows),
  }
  print(f"{note}; batch {cfg.train.batch_size} ({per_device_batch} per device); FLOP/s and peak per device")
  print(f"{'pair':>4} {'step s':>9} {'GFLOP/s':>9} {'peak GFLOP/s':>13} {'MFU':>6}")
  for i, r in enumerate(rows):
    print(f"{i:>4} {r['step_s']:>9.3f} {r['flops_per_s'] / 1e9:>9.2f} {r['peak'] / 1e9:>13.2f} {r['mfu']:>6.3f}")
  print(f"median: {result['tokens_per_s']:.1f} tokens/s, MFU {result['mfu']:.3f} "
        f"(range {result['mfu_min']:.3f}-{result['mfu_max']:.3f}), compile {compile_s:.1f} s")
  print(json.dumps(result))


if __name__ == '__main__':
  main()
