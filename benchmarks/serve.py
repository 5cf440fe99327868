"""Serving throughput: continuous batching of requests with different memories against the
same requests decoded one at a time, and the cost of reading their rows cold from disk.

    python benchmarks/serve.py [--quick] [--models quickstart,160m] [--layers N]

Models: the quickstart shapes (configs/quickstart.py: d=128, 4 layers, fp32, FFN memory
128+128 on a k=8, depth-2 tree) and the paper's 160M anchor (configs/160m.py: 35 layers,
d=512, bf16) with FFN memory levels (128, 64) on a k=8, depth-2 tree; random weights and a
random bank (throughput does not depend on the values), the bank written once as bundle
arrays under /tmp (zarr, one chunk per row, in the compute dtype) and read by the bundle
Reader. --quick keeps 4 of the 160M's 35 layers and decodes 16 tokens per request.

- serve: C = 1, 4, 16 concurrent clients, each sending --requests requests one after the
  other (24-token prompts, --tokens new tokens each, no early EOT), every client's prompts
  routed to its own leaf, so each request carries a different fetched block. Requests go
  through the server's batcher (hmem.infer.batcher: 16 slots, steps sized to the requests
  in flight, rows read by its reader threads while others decode) from client threads in
  this process; the HTTP layer is not timed. tokens/s = all new tokens / wall time from
  the first submit to the last token; ttft = submit to first token; per-token latency =
  the gaps between a request's successive tokens.
- sequential: the same requests one at a time with hmem.infer.decoder.generate (batch 1,
  its block read through the same Reader): what a server without batching reaches.
  speedup = serve tokens/s / sequential tokens/s, serve and sequential alternating
  --rounds times per C (median of the per-round ratios: the machine may be shared);
  CPU speedup = the same ratio of tokens per CPU second of this process (what other jobs
  on a shared machine disturb least).
- cold: serve at 16 clients with the Reader's cache emptied and the bank's chunk files
  evicted from the page cache (posix_fadvise) before each run, against the same run with
  every row cached, alternating --rounds times; cold/cached = the median ratio.
Prints a table per model, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')
MODELS = {
    'quickstart': ('quickstart.py', []),
    '160m': ('160m.py', ['memory.k=8', 'memory.depth=2', 'memory.levels=(128,64)']),
}
CLIENTS = (1, 4, 16)
SLOTS = 16
PROMPT = 24


def _bank(cfg, root: str) -> dict:
  """{table: {name: array path}} of a random bank written under `root` (once; reused)."""
  import jax

  from hmem.bundle.format import array_path, create_array, write_rows
  from hmem.memory.spec import memory_spec
  dtype = str(jax.numpy.dtype(cfg.model.dtype))
  shapes = {t: {n: list(s) for n, s in named.items()} for t, named in memory_spec(cfg).bank_shapes.items()}
  meta = {'shapes': shapes, 'dtype': dtype}
  arrays = {t: {n: array_path(t, n) for n in named} for t, named in shapes.items()}
  index = os.path.join(root, 'bank.json')
  if os.path.exists(index) and json.load(open(index)) == meta:
    return arrays
  rng = np.random.default_rng(0)
  for table, named in shapes.items():
    for name, shape in named.items():
      array = create_array(root, arrays[table][name], shape, dtype)
      for row in range(shape[0]):
        write_rows(array, row, (0.02 * rng.standard_normal((1, *shape[1:]), np.float32)).astype(
            jax.numpy.dtype(dtype)))
  with open(index, 'w') as f:
    json.dump(meta, f)
  return arrays


def _evict(root: str) -> None:
  """Drops the bank's chunk files from the page cache (no root needed; other files untouched)."""
  for directory, _, files in os.walk(os.path.join(root, 'bank')):
    for name in files:
      fd = os.open(os.path.join(directory, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _source(name: str, layers: int | None):
  """(MemorySource of random weights whose bank rows a bundle Reader reads from disk, bank root)."""
  from hmem.bundle.reader import Reader
  from hmem.config import load_config
  from hmem.infer.source import MemorySource
  from hmem.memory.spec import memory_spec
  from hmem.model import build_model
  file, overrides = MODELS[name]
  if name == '160m' and layers:
    overrides = overrides + [f'model.layers={layers}']
  cfg = load_config(os.path.join(CONFIGS, file), overrides)
  root = f'/tmp/hmem-serve-bench-{name}-{cfg.model.layers}'
  arrays = _bank(cfg, root)
  present = {t: np.ones(int(json.load(open(f'{root}/bank.json'))['shapes'][t][next(iter(named))][0]), bool)
             for t, named in arrays.items()}
  model = build_model(cfg, seed=0, memory_layers=memory_spec(cfg).layers)
  return MemorySource(cfg, model, None, Reader(root, arrays, present, cache_bytes=4 << 30), step=0), root


def _requests(source, clients: int, per_client: int):
  """[(client, prompt ids, leaf)]: client c's prompts all route to leaf c (distinct leaves)."""
  rng = np.random.default_rng(clients)
  vocab = source.config.model.vocab_size
  return [(c, rng.integers(1, vocab, PROMPT).tolist(), c) for c in range(clients) for _ in range(per_client)]


def _serve(source, batcher, requests, tokens: int) -> dict:
  from hmem.infer.batcher import Request
  by_client: dict[int, list] = {}
  for client, prompt, leaf in requests:
    by_client.setdefault(client, []).append((prompt, leaf))
  ttft, gaps, counts = [], [], []
  lock = threading.Lock()

  def client(work):
    for prompt, leaf in work:
      done, times = threading.Event(), []

      def emit(token, finish, logprob, times=times, done=done):
        if finish is None:
          times.append(time.perf_counter())
        else:
          done.set()

      start = time.perf_counter()
      fetch = lambda leaf=leaf: source.host_memory(np.array([leaf]), 'fetched')  # on the batcher's readers
      batcher.submit(Request(prompt, tokens, emit, fetch))
      done.wait()
      with lock:
        ttft.append(times[0] - start)
        gaps.extend(np.diff(times))
        counts.append(len(times))

  threads = [threading.Thread(target=client, args=(work,)) for work in by_client.values()]
  start, cpu = time.perf_counter(), time.process_time()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  assert all(n == tokens for n in counts)
  return {'tokens_per_s': sum(counts) / wall, 'tokens_per_cpu_s': sum(counts) / cpu,
          'ttft_ms_p50': 1e3 * float(np.median(ttft)),
          'token_ms_p50': 1e3 * float(np.percentile(gaps, 50)), 'token_ms_p99': 1e3 * float(np.percentile(gaps, 99)),
          'wall_s': wall}


def _sequential(source, requests, tokens: int) -> tuple[float, float]:
  """(tokens/s, tokens per CPU second) of the requests decoded one at a time (batch 1)."""
  from hmem.infer.decoder import generate
  start, cpu = time.perf_counter(), time.process_time()
  for _, prompt, leaf in requests:
    out = generate(source.model, [prompt], source.memory(np.array([leaf]), 'fetched'), eot_id=-1,
                   max_new_tokens=tokens)
    assert len(out[0]) == tokens
  made = len(requests) * tokens
  return made / (time.perf_counter() - start), made / (time.process_time() - cpu)


def bench(name: str, layers: int | None, tokens: int, per_client: int, rounds: int) -> dict:
  from hmem.infer.batcher import Batcher
  from hmem.infer.decoder import BUCKET, round_up
  source, root = _source(name, layers)
  shapes = source.spec.block_shapes(source.spec.fetch_width)
  batcher = Batcher(source.model, slots=SLOTS, max_len=round_up(PROMPT, BUCKET) + tokens, eot_id=-1,
                    memory_shapes=shapes)
  try:
    for clients in batcher.buckets:  # compile every step size, and the sequential decoder
      _serve(source, batcher, _requests(source, clients, 1), tokens)
    _sequential(source, _requests(source, 1, 1), tokens)
    rows = {}
    for clients in CLIENTS:
      requests = _requests(source, clients, per_client)
      served, speedups, cpu_speedups, sequential = [], [], [], []
      for _ in range(rounds):
        served.append(_serve(source, batcher, requests, tokens))
        sequential.append(_sequential(source, requests, tokens))
        speedups.append(served[-1]['tokens_per_s'] / sequential[-1][0])
        cpu_speedups.append(served[-1]['tokens_per_cpu_s'] / sequential[-1][1])
      median = lambda key: statistics.median(r[key] for r in served)
      rows[clients] = {key: median(key) for key in served[0]} | {
          'sequential_tokens_per_s': statistics.median(s for s, _ in sequential),
          'speedup': statistics.median(speedups), 'speedups': speedups,
          'cpu_speedup': statistics.median(cpu_speedups), 'cpu_speedups': cpu_speedups}
    requests = _requests(source, 16, per_client)
    cold, cached, ratios = [], [], []
    for _ in range(rounds):
      source.rows.clear_cache()
      _evict(root)
      cold.append(_serve(source, batcher, requests, tokens)['tokens_per_s'])
      cached.append(_serve(source, batcher, requests, tokens)['tokens_per_s'])  # the rows the cold run read
      ratios.append(cold[-1] / cached[-1])
  finally:
    batcher.close()
  return {'layers': source.config.model.layers, 'serve': rows,
          'cold': {'cold_tokens_per_s': statistics.median(cold), 'cached_tokens_per_s': statistics.median(cached),
                   'ratio': statistics.median(ratios), 'ratios': ratios}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer tokens and rounds, 4-layer 160M (< 60 s)')
  parser.add_argument('--models', default='quickstart,160m')
  parser.add_argument('--layers', type=int, default=None, help="the 160M's layers (default 35; quick 4)")
  parser.add_argument('--tokens', type=int, default=None, help='new tokens per request (default 64; quick 16)')
  parser.add_argument('--requests', type=int, default=None, help='requests per client (default 2; quick 1)')
  parser.add_argument('--rounds', type=int, default=None, help='alternations of serve and sequential (default 3; '
                      'quick 1)')
  args = parser.parse_args()
  tokens, per_client = args.tokens or (16 if args.quick else 64), args.requests or (1 if args.quick else 2)
  rounds, layers = args.rounds or (1 if args.quick else 3), args.layers or (4 if args.quick else None)
  results = {}
  for name in args.models.split(','):
    r = results[name] = bench(name, layers, tokens, per_client, rounds)
    print(f'\n{name} ({r["layers"]} layers), {tokens} new tokens per request, {per_client} request(s) per client, '
          f'{rounds} round(s)')
    print(f'{"clients":>7} {"tok/s":>9} {"seq tok/s":>10} {"speedup":>8} {"CPU speedup":>12} {"ttft p50 ms":>12} '
          f'{"tok p50 ms":>11} {"tok p99 ms":>11}')
    for clients, row in r['serve'].items():
      print(f'{clients:>7} {row["tokens_per_s"]:>9.1f} {row["sequential_tokens_per_s"]:>10.1f} '
            f'{row["speedup"]:>7.2f}x {row["cpu_speedup"]:>11.2f}x {row["ttft_ms_p50"]:>12.1f} '
            f'{row["token_ms_p50"]:>11.2f} {row["token_ms_p99"]:>11.2f}')
    c = r['cold']
    print(f'16 clients, bank read cold from disk: {c["cold_tokens_per_s"]:.1f} tok/s; every row cached: '
          f'{c["cached_tokens_per_s"]:.1f} tok/s; cold/cached {c["ratio"]:.2f}')
  print(json.dumps({'quick': args.quick, 'tokens': tokens, 'requests_per_client': per_client, 'rounds': rounds,
                    'models': results}))


if __name__ == '__main__':
  main()
