"""Balanced hierarchical k-means at the paper's settings: fit time and per-level balance.

  python benchmarks/tree.py [--quick] [--sizes 100000 1000000] [--depth 4] [--devices N]

Synthetic 384-d embeddings (MiniLM's width): a mixture of 4,096 Gaussians on the unit
sphere (64 groups of 64 components, log-normal weights, so some topics are far bigger than
others). For each size the tree is fit with the paper's settings (k=16, depth 4, 6,400
samples per EM step, 20 steps, balance 1.5/k) on all the points, which are then routed.
Fit time includes compiling (one compile per level), as wall-clock and as this process's
CPU time (the figure to compare on a shared machine); route time is a second, compiled
pass. Balance per level, from the routed points: largest/smallest non-empty node, the
largest node's share of all points times the node count (1 = perfectly even), the largest
child's share of its parent over all parents (the EM rule keeps a node's samples within
1.5/k = 0.094; routing every point need not), and empty nodes. --quick: 20,000 points,
depth 2, 1,024 samples, 5 steps (under a minute on two CPU cores). --devices N splits the
fit over N fake CPU devices (on CPU only; set before jax starts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n unit vectors from a skewed two-level mixture of Gaussians; (x_NxD, component_N)."""
  rng = np.random.default_rng(seed)
  groups, per_group = 64, 64
  group_GxD = rng.standard_normal((groups, dim), np.float32)
  center_CxD = np.repeat(group_GxD, per_group, axis=0) + 0.7 * rng.standard_normal(
      (groups * per_group, dim), np.float32)
  center_CxD /= np.linalg.norm(center_CxD, axis=1, keepdims=True)
  weight_C = rng.lognormal(0.0, 1.0, groups * per_group)
  comp_N = rng.choice(center_CxD.shape[0], size=n, p=weight_C / weight_C.sum())
  x_NxD = np.empty((n, dim), np.float32)
  for lo in range(0, n, 1 << 16):  # in blocks: no n x dim float64 temporary
    hi = min(n, lo + (1 << 16))
    x_BxD = center_CxD[comp_N[lo:hi]] + (0.5 / np.sqrt(dim)) * rng.standard_normal((hi - lo, dim), np.float32)
    x_NxD[lo:hi] = x_BxD / np.linalg.norm(x_BxD, axis=1, keepdims=True)
  return x_NxD, comp_N


def balance(leaf_N: np.ndarray, k: int, depth: int) -> dict[int, dict[str, float]]:
  counts = np.bincount(leaf_N, minlength=k**depth)
  out = {}
  for level in range(1, depth + 1):
    size = counts.reshape(k**level, -1).sum(axis=1)
    used = size[size > 0]
    parent_P = size.reshape(-1, k).sum(axis=1)
    child_share = (size.reshape(-1, k).max(axis=1) / np.maximum(parent_P, 1))[parent_P > 0]
    out[level] = {'nodes': int(size.size), 'empty': int((size == 0).sum()),
                  'max_over_min': round(float(used.max() / used.min()), 2),
                  'largest_over_mean': round(float(used.max() * size.size / size.sum()), 2),
                  'max_child_share': round(float(child_share.max()), 4),
                  'mean_max_child_share': round(float(child_share.mean()), 4)}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='20k points, depth 2, < 1 min')
  parser.add_argument('--sizes', type=int, nargs='+', default=[100_000, 1_000_000])
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--devices', type=int, default=0, help='fake CPU devices (0: jax default)')
  args = parser.parse_args()
  if args.devices:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')
  import jax  # after XLA_FLAGS

  from hmem.data.tree import fit_tree, route

  k, depth, samples, steps = (16, 2, 1024, 5) if args.quick else (16, args.depth, 6400, 20)
  sizes = [20_000] if args.quick else args.sizes
  devices = jax.local_devices()
  results = {'machine': f'{os.cpu_count()}-core CPU, {platform.machine()}, jax {jax.__version__}',
             'devices': f'{len(devices)} x {devices[0].platform}', 'k': k, 'depth': depth,
             'samples': samples, 'steps': steps, 'balance': 1.5, 'quick': args.quick, 'runs': []}
  for n in sizes:
    x_NxD, _ = synthetic(n, 384)
    start, cpu_start = time.perf_counter(), time.process_time()
    tree = fit_tree(x_NxD, k, depth, seed=0, samples=samples, steps=steps, progress=not args.quick)
    fit_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    route(tree, x_NxD)  # compile
    start = time.perf_counter()
    leaf_N = route(tree, x_NxD)
    route_s = time.perf_counter() - start
    results['runs'].append({'points': n, 'fit_s': round(fit_s, 1), 'fit_cpu_s': round(cpu_s, 1),
                            'route_s': round(route_s, 2), 'levels': balance(leaf_N, k, depth)})
    print(json.dumps(results['runs'][-1]), file=sys.stderr, flush=True)  # in case a later size dies
    del x_NxD

  print(f"{results['machine']}; {results['devices']}; k={k} depth={depth} samples={samples} steps={steps}")
  print(f'{"points":>9} {"fit s":>7} {"cpu s":>7} {"route s":>7} {"level":>5} {"nodes":>6} {"empty":>6} '
        f'{"max/min":>8} {"max/mean":>8} {"max child":>9} {"mean max child":>14}')
  for run in results['runs']:
    for level, b in run['levels'].items():
      head = (f"{run['points']:>9} {run['fit_s']:>7.1f} {run['fit_cpu_s']:>7.1f} {run['route_s']:>7.2f}"
              if level == 1 else ' ' * 33)
      print(f"{head} {level:>5} {b['nodes']:>6} {b['empty']:>6} {b['max_over_min']:>8} "
            f"{b['largest_over_mean']:>8} {b['max_child_share']:>9} {b['mean_max_child_share']:>14}")
  print(f'(child shares: of its parent\'s points; the EM rule bounds samples at 1.5/k = {1.5 / k:.4f})')
  print(json.dumps(results))


if __name__ == '__main__':
  main()
