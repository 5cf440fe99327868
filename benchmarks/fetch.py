"""Fetch latency of one root-to-leaf path from a bundle's bank, and decode speed with the
fetched block.

    python benchmarks/fetch.py [--quick] [--dir DIR] [--samples N]

The bank has the shapes of the paper's 160M anchor (35 layers, d=512) with FFN memory of
level widths (256, 64, 16, 0) on a k=16, depth-4 tree, in bfloat16: 4.6B parameters,
9.3 GB, 36 MB (18M parameters) per path. It is written once into --dir with the bundle
code (zarr v3, one chunk per row, crc32c) and reused by later runs; --quick writes only
level-1 subtree 0 below level 1 (1.0 GB: every row of level 1, 1/16 of levels 2-3), which
changes nothing about one path's rows.

- cold: a fresh process opens the arrays; before each sample its row cache is emptied and
  the path's chunk files are evicted from the OS page cache (posix_fadvise DONTNEED: no
  root needed, other processes' cached files untouched), so every row comes from disk.
- warm: a Reader whose LRU cache already holds levels 1-2 (the top levels, 2.2 GB here);
  only the level-3 row is read, itself evicted from the page cache first.
Latencies are Reader.read of the path's three rows (9 chunks, read concurrently) until the
arrays are in host memory.

- decode: tokens/s of greedy KV-cached decoding (hmem.infer.decoder.generate, batch 1, a
  32-token prompt bucket then --decode-tokens steps) by the 160M anchor with the path's
  block (336 FFN units per layer on top of 2048) and with no memory, in bfloat16 compute
  as configs/160m.py; the two alternate, --repeats times each, in one process after both
  have compiled; decode_ratio = the median over the pairs of (wall time with the block /
  without), decode_cpu_ratio the same in the process's CPU time.
  --quick keeps 8 of the 35 layers (the embedding's share of the work then grows, so the
  ratio reads lower than the full model's).
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

K, DEPTH, LEVELS = 16, 4, (256, 64, 16, 0)
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', '160m.py')


def _bank_shapes(quick: bool):
  from hmem.config import load_config
  from hmem.memory.bank import bank_shapes
  cfg = load_config(CONFIG, [f'memory.k={K}', f'memory.depth={DEPTH}', f'memory.levels={LEVELS}',
                             'memory.generic_prob=0'])
  return {t: named for t, named in bank_shapes(cfg).items()}, ([0] if quick else list(range(K)))


def _write_bank(root: str, quick: bool, dtype: str) -> dict:
  """The bank's arrays under root (once; reused when root/bank.json matches); int8 as
  `hmem export --dtype int8` writes it (values and a scale array)."""
  import ml_dtypes
  from tqdm import tqdm

  from hmem.bundle.export import quantize
  from hmem.bundle.format import array_path, create_array, present_rows, scale_path, true_runs, write_rows
  shapes, subtrees = _bank_shapes(quick)
  meta = {'shapes': {t: {n: list(s) for n, s in named.items()} for t, named in shapes.items()}, 'subtrees': subtrees,
          'dtype': dtype}
  index = os.path.join(root, 'bank.json')
  if os.path.exists(index):
    with open(index) as f:
      if json.load(f) == meta:
        return meta
  rng = np.random.default_rng(0)
  masks = {t: present_rows(K, DEPTH, t, next(iter(named.values()))[0], subtrees) for t, named in shapes.items()}
  total = sum(int(np.prod(s[1:])) * 2 * int(masks[t].sum()) for t, named in shapes.items() for s in named.values())
  with tqdm(total=total, unit='B', unit_scale=True, desc='write bank') as bar:
    for table, named in shapes.items():
      for name, shape in named.items():
        # Rows differ only by a scale: content does not change read latency, and drawing
        # 4.6B random numbers would dominate the run.
        row = 0.02 * rng.standard_normal(shape[1:], np.float32)
        if dtype == 'int8':
          parts = [(create_array(root, array_path(table, name), shape, 'int8'), None),
                   (create_array(root, scale_path(table, name), (*shape[:-1], 1), 'float32'), None)]
          parts = [(a, r[0]) for (a, _), r in zip(parts, quantize(row[None]))]
        else:
          parts = [(create_array(root, array_path(table, name), shape, 'bfloat16'), row.astype(ml_dtypes.bfloat16))]
        for array, part in parts:
          for lo, hi in true_runs(masks[table]):
            slab = np.broadcast_to(part, (min(hi - lo, 64), *part.shape))
            for start in range(lo, hi, slab.shape[0]):
              write_rows(array, start, np.ascontiguousarray(slab[:min(slab.shape[0], hi - start)]), bar)
  with open(index, 'w') as f:
    json.dump(meta, f)
  return meta


def _evict(root: str, files: list[str]) -> None:
  for path in files:
    fd = os.open(os.path.join(root, path), os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _measure(root: str, mode: str, samples: int, seed: int) -> list[float]:
  """Latencies (ms) of `samples` random paths; runs in its own process."""
  from hmem.bundle.format import array_path, scale_path
  from hmem.bundle.reader import Reader
  with open(os.path.join(root, 'bank.json')) as f:
    meta = json.load(f)
  tables = [t for t in meta['shapes'] if t != 'generic']
  arrays = {t: {n: array_path(t, n) for n in meta['shapes'][t]} for t in tables}
  present = {t: np.ones(next(iter(meta['shapes'][t].values()))[0], bool) for t in tables}
  int8 = meta.get('dtype') == 'int8'
  scales = {t: {n: scale_path(t, n) for n in meta['shapes'][t]} for t in tables} if int8 else None
  reader = Reader(root, arrays, present, cache_bytes=4 << 30, scales=scales)
  # Paths through distinct deepest rows of the subtrees written, so no sample finds its
  # deepest row cached.
  deepest = K**(len(tables) - 1) * len(meta['subtrees'])
  bottom_N = np.random.default_rng(seed).choice(deepest, samples + 1, replace=False)

  def path_rows(bottom):
    return {t: np.array([bottom // K**(len(tables) - int(t.removeprefix('level')))]) for t in tables}

  def chunks(rows, which):
    stored = [arrays, scales] if scales else [arrays]
    return [f'{paths[t][n]}/c/{int(rows[t][0])}/0/0/0' for paths in stored for t in which for n in paths[t]]

  if mode == 'warm':  # the cache holds every top-level row the samples can meet
    reader.read({t: np.arange(deepest // K**(len(tables) - int(t.removeprefix('level')))) for t in tables[:-1]})
  reader.read(path_rows(bottom_N[-1]))  # starts tensorstore's threads
  times = []
  for bottom in bottom_N[:-1]:
    rows = path_rows(bottom)
    if mode == 'cold':
      reader.clear_cache()
    _evict(root, chunks(rows, tables if mode == 'cold' else tables[-1:]))
    start = time.perf_counter()
    reader.read(rows)
    times.append(1e3 * (time.perf_counter() - start))
  return times


def _decode(quick: bool, tokens: int, repeats: int) -> dict:
  """Decode seconds per mode and repeat; runs in its own process."""
  import jax

  from hmem.config import load_config
  from hmem.infer.decoder import generate
  from hmem.memory.bank import block_shapes
  from hmem.model import build_model
  overrides = [f'memory.k={K}', f'memory.depth={DEPTH}', f'memory.levels={LEVELS}']
  cfg = load_config(CONFIG, overrides + (['model.layers=8'] if quick else []))
  model = build_model(cfg)
  dtype = jax.numpy.dtype(cfg.model.dtype)
  rng = np.random.default_rng(0)
  block = {name: jax.numpy.asarray(0.02 * rng.standard_normal((1, *shape)), dtype)
           for name, shape in block_shapes(cfg, sum(LEVELS)).items()}
  prompt = [rng.integers(1, cfg.model.vocab_size, 24).tolist()]
  memories = {'none': None, 'fetched': block}

  def run(memory):  # eot_id=-1: no token stops generation early
    start, cpu = time.perf_counter(), time.process_time()
    out = generate(model, prompt, memory, eot_id=-1, max_new_tokens=tokens)
    assert len(out[0]) == tokens  # generate returns host arrays: the work is done
    return time.perf_counter() - start, time.process_time() - cpu

  for memory in memories.values():  # compile
    run(memory)
  times = {mode: [] for mode in memories}
  for _ in range(repeats):
    for mode, memory in memories.items():
      times[mode].append(run(memory))
  return {'layers': cfg.model.layers, 'wall': {m: [w for w, _ in t] for m, t in times.items()},
          'cpu': {m: [c for _, c in t] for m, t in times.items()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='a 1 GB partial bank, fewer samples (< 60 s)')
  parser.add_argument('--dir', default=None, help='where the bank is written and kept (default: /tmp)')
  parser.add_argument('--samples', type=int, default=None)
  parser.add_argument('--dtype', choices=('bfloat16', 'int8'), default='bfloat16', help='bank dtype of the bundle')
  parser.add_argument('--decode-tokens', type=int, default=None, help='tokens per decode run (default 64; quick 16)')
  parser.add_argument('--repeats', type=int, default=None, help='decode runs per mode (default 7; quick 3)')
  parser.add_argument('--measure', choices=('cold', 'warm', 'decode'), help=argparse.SUPPRESS)  # the worker process
  parser.add_argument('--seed', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  root = args.dir or os.path.join('/tmp', 'hmem-fetch-bench' + ('-quick' if args.quick else '') +
                                  ('-int8' if args.dtype == 'int8' else ''))
  samples = args.samples or (30 if args.quick else 200)
  tokens, repeats = args.decode_tokens or (16 if args.quick else 64), args.repeats or (3 if args.quick else 7)
  if args.measure == 'decode':
    print(json.dumps(_decode(args.quick, tokens, repeats)))
    return
  if args.measure:
    print(json.dumps(_measure(root, args.measure, samples, args.seed)))
    return
  os.makedirs(root, exist_ok=True)
  meta = _write_bank(root, args.quick, args.dtype)
  latency = {}
  for mode in ('cold', 'warm'):
    out = subprocess.run([sys.executable, __file__, '--dir', root, '--samples', str(samples), '--measure', mode,
                          '--seed', '1'], check=True, capture_output=True, text=True).stdout
    latency[mode] = json.loads(out.strip().splitlines()[-1])
  shapes = meta['shapes']
  # bf16: 2 bytes an entry; int8: 1, and a float32 scale per `features` entries.
  entry = (lambda s: 1 + 4 / s[-1]) if args.dtype == 'int8' else (lambda s: 2)
  path_bytes = sum(int(np.prod(s[1:]) * entry(s)) for t, named in shapes.items() if t != 'generic'
                   for s in named.values())
  bank_bytes = sum(int(np.prod(s)) * 2 for named in shapes.values() for s in named.values())
  written = sum(int(np.prod(s[1:]) * entry(s)) * (s[0] if t == 'level1' else s[0] * len(meta['subtrees']) // K)
                for t, named in shapes.items() for s in named.values())
  print(f'bank: {bank_bytes / 1e9:.2f} GB in bf16 ({bank_bytes // 2 / 1e9:.2f}B parameters), '
        f'{written / 1e9:.2f} GB written (level-1 subtrees {meta["subtrees"] if args.quick else "all"}); '
        f'one path: {path_bytes / 1e6:.1f} MB in 3 rows x 3 arrays; {samples} samples each')
  print(f'{"fetch":<6} {"p50 ms":>8} {"p99 ms":>8} {"max ms":>8} {"MB/s at p50":>12}')
  result = {}
  for mode, times in latency.items():
    p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
    deepest = shapes['level3']['ffn_up']
    moved = path_bytes if mode == 'cold' else int(np.prod(deepest[1:]) * entry(deepest)) * 3
    print(f'{mode:<6} {p50:8.2f} {p99:8.2f} {max(times):8.2f} {moved / 1e3 / p50:12.0f}')
    result[f'fetch_p50_{mode}_ms'] = round(float(p50), 3)
    result[f'fetch_p99_{mode}_ms'] = round(float(p99), 3)
  out = subprocess.run([sys.executable, __file__, '--measure', 'decode', '--decode-tokens', str(tokens),
                        '--repeats', str(repeats)] + (['--quick'] if args.quick else []),
                       check=True, capture_output=True, text=True).stdout
  decode = json.loads(out.strip().splitlines()[-1])
  wall, cpu = ({m: np.array(t) for m, t in decode[kind].items()} for kind in ('wall', 'cpu'))
  print(f'\ndecode ({decode["layers"]} layers, batch 1, {tokens} tokens, {repeats} interleaved runs per mode)')
  print(f'{"memory":<8} {"tok/s p50":>10} {"min":>8} {"max":>8} {"CPU s/tok p50":>14}')
  for mode, t in wall.items():
    tps = tokens / t
    print(f'{mode:<8} {np.median(tps):10.2f} {tps.min():8.2f} {tps.max():8.2f} {np.median(cpu[mode]) / tokens:14.4f}')
    result[f'decode_tok_s_{mode}'] = round(float(np.median(tps)), 3)
  # Time with the block / without, per interleaved pair, then the median; the CPU-time
  # ratio (all threads of the process) is steadier on a machine shared with other jobs.
  result['decode_ratio'] = round(float(np.median(wall['fetched'] / wall['none'])), 4)
  result['decode_cpu_ratio'] = round(float(np.median(cpu['fetched'] / cpu['none'])), 4)
  print(f'decode_ratio (wall time with the block / without, median of pairs): {result["decode_ratio"]:.3f}; '
        f'CPU time: {result["decode_cpu_ratio"]:.3f}')
  result.update(dtype=args.dtype)
  result.update(decode_layers=decode['layers'], bank_gb=round(bank_bytes / 1e9, 2), written_gb=round(written / 1e9, 2),
                path_mb=round(path_bytes / 1e6, 1), samples=samples, page_cache='evicted per file (fadvise)')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
