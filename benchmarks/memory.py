"""What the hierarchical memory costs: step overhead, bank-size scaling, collective sizes.

    python benchmarks/memory.py [--quick] [--pairs N]

- overhead_vs_flop_matched: step time with FFN memory / step time of a dense model whose
  FFN is widened by the same r (the same FLOPs); also vs the plain anchor.
- bank_scaling_64x: the deepest level grown from N to 64N rows (same r, batch and fetch):
  step-time ratio 64x / 1x for the bank's default AdamW (`exact`, row-sparse), and for the
  `dense` option (every row every step).
- max_collective_over_local_fetch: on 8 fake CPU devices, the largest collective in the
  compiled post-hoc step (anchor frozen, so the anchor's own gradient all-reduce is not
  counted) over B_local x fetch bytes, at two global batch sizes, feature- and row-sharded.

Step times are interleaved A/B pairs; figures are medians of paired ratios. Prints a
table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'bench_memory.py')
# --quick: a model small enough for all three parts to fit in a minute on 2 CPU cores.
QUICK = ['model.layers=2', 'model.d_model=128', 'model.ffn=512', 'model.vocab_size=4096', 'data.seq_len=128',
         'model.scan_layers=true']


def _step_fn(cfg):
  """A ready-to-time step for `cfg`, whose batch is per device, on every accelerator of
  the host, or on one CPU device (fake CPU devices share the same cores)."""
  import jax

  from hmem import sharding
  from hmem.data import Position, make_source
  from hmem.train.step import fresh_train_step

  devices = jax.devices()[:1] if jax.devices()[0].platform == 'cpu' else jax.devices()
  cfg = cfg.copy_and_resolve_references()
  cfg.train.batch_size *= len(devices)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1, memory=1)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    _, state, step = fresh_train_step(cfg, mesh)
    host = make_source(cfg).batch(Position(), slice(0, cfg.train.batch_size))
    shardings = sharding.data_shardings(mesh)
    batch = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
    step = step.compile(state, batch)
  holder = {'state': state}

  def run() -> float:
    start = time.perf_counter()
    holder['state'], metrics = step(holder['state'], batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  run()  # warm-up
  return run


def _pairs(runs: dict, pairs: int) -> dict[str, list[float]]:
  """Times every variant once per round, rotating the order, for `pairs` rounds."""
  times = {name: [] for name in runs}
  names = list(runs)
  for i in range(pairs):
    for name in names[i % len(names):] + names[:i % len(names)]:
      times[name].append(runs[name]())
  return times


def _ratio(times, a, b) -> float:
  return statistics.median(x / y for x, y in zip(times[a], times[b]))


def overhead(load, quick: bool, pairs: int) -> dict:
  from hmem import sizes
  base = QUICK if quick else []
  memory = load(CONFIG, base)
  r = sum(memory.memory.levels)
  anchor = load(CONFIG, base + ['memory.levels=(0,0,0)'])
  matched = load(CONFIG, base + ['memory.levels=(0,0,0)', f'model.ffn={memory.model.ffn + r}'])
  runs = {'memory': _step_fn(memory), 'anchor': _step_fn(anchor), 'flop_matched': _step_fn(matched)}
  times = _pairs(runs, pairs)
  return {
      'overhead_vs_flop_matched': _ratio(times, 'memory', 'flop_matched'),
      'overhead_ratio': _ratio(times, 'memory', 'anchor'),
      'flop_ratio': sizes.flops_per_token(memory) / sizes.flops_per_token(anchor),
      'step_s': {name: statistics.median(t) for name, t in times.items()},
  }


def bank_scaling(load, quick: bool, pairs: int) -> dict:
  """k=8: depth 2 (64 leaves) vs depth 4 (4,096 leaves), the deepest level alone carrying r."""
  from hmem import sizes
  base = (QUICK + ['model.d_model=64', 'memory.layers=(1,2)'] if quick else ['memory.layers=(2,4)'])
  base += ['memory.k=8', 'memory.generic_prob=0.0', 'data.synthetic_leaves=64']
  small = base + ['memory.depth=2', 'memory.levels=(0,32)']
  large = base + ['memory.depth=4', 'memory.levels=(0,0,0,32)']
  out = {}
  for optimizer in ('exact', 'dense'):
    cfgs = {n: load(CONFIG, o + [f'memory.optimizer={optimizer}']) for n, o in (('1x', small), ('64x', large))}
    runs = {n: _step_fn(c) for n, c in cfgs.items()}
    times = _pairs(runs, pairs)
    out[optimizer] = {'ratio': _ratio(times, '64x', '1x'),
                      'step_s': {n: statistics.median(t) for n, t in times.items()}}
    out['bank_bytes_64x'] = sizes.memory_param_counts(cfgs['64x'])['bank_params'] * 4
    del runs
  return {'bank_scaling_64x': out['exact']['ratio'], 'bank_scaling_64x_dense': out['dense']['ratio'],
          'bank_bytes_64x': out['bank_bytes_64x'], 'scaling_step_s': {k: out[k]['step_s'] for k in ('exact', 'dense')}}


def collectives_child(quick: bool) -> dict:
  """Runs under 8 fake devices (set by the parent): compile only, read the HLO."""
  from hmem.config import load_config
  from hmem.memory.collectives import largest_collective_over_local_fetch
  from hmem.train.step import compiled_train_step_text

  results = []
  meshes = (('feature', ['mesh.data=8']), ('rows', ['mesh.data=4', 'mesh.memory=2']))
  for mesh_name, mesh_over in meshes[:1] if quick else meshes:  # --quick: the default layout only
    for batch in (16, 64):
      cfg = load_config(CONFIG, (QUICK if quick else []) + mesh_over +
                        [f'train.batch_size={batch}', 'train.freeze_anchor=true'])
      found = largest_collective_over_local_fetch(cfg, compiled_train_step_text(cfg))
      results.append({'mesh': mesh_name, 'batch': batch, **found})
  return {'collectives': results, 'max_collective_over_local_fetch': max(r['ratio'] for r in results)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='a smaller model; < 60 s on 2 CPU cores')
  parser.add_argument('--pairs', type=int, default=15, help='interleaved timing rounds (>= 15)')
  parser.add_argument('--collectives-child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.collectives_child:
    print(json.dumps(collectives_child(args.quick)))
    return

  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
  child = subprocess.run([sys.executable, __file__, '--collectives-child'] + (['--quick'] if args.quick else []),
                         env=env, capture_output=True, text=True, check=True)
  result = json.loads(child.stdout.strip().splitlines()[-1])

  from hmem.config import load_config
  result.update(overhead(load_config, args.quick, args.pairs))
  result.update(bank_scaling(load_config, args.quick, args.pairs))
  result['quick'], result['pairs'] = args.quick, args.pairs

  print(f"{'figure':<34} {'value':>10}  target")
  print(f"{'overhead_vs_flop_matched':<34} {result['overhead_vs_flop_matched']:>10.3f}  <= 1.15")
  print(f"{'overhead_ratio (vs anchor)':<34} {result['overhead_ratio']:>10.3f}")
  print(f"{'flop_ratio (vs anchor)':<34} {result['flop_ratio']:>10.3f}")
  print(f"{'bank_scaling_64x (exact)':<34} {result['bank_scaling_64x']:>10.3f}  <= 1.10")
  print(f"{'bank_scaling_64x (dense AdamW)':<34} {result['bank_scaling_64x_dense']:>10.3f}")
  print(f"{'bank at 64x (GiB)':<34} {result['bank_bytes_64x'] / 2**30:>10.3f}  <= 2")
  print(f"{'max_collective_over_local_fetch':<34} {result['max_collective_over_local_fetch']:>10.3f}  <= 2")
  for c in result['collectives']:
    print(f"  {c['mesh']:<8} batch {c['batch']:>3}: {c['largest_op']:<14} {c['largest_bytes']:>10,} B"
          f" / {c['local_fetch_bytes']:>10,} B = {c['ratio']:.3f}")
  print(json.dumps(result))


if __name__ == '__main__':
  main()
