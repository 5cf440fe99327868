"""Serving throughput: continuous batching of requests with different memories, against the
same requests decoded one at a time; and `hmem generate`'s decode speed with a block.

    python benchmarks/serve.py [--quick] [--models quickstart,160m]

Models: the quickstart shapes (configs/quickstart.py: d=128, 4 layers, FFN memory 128+128
on a k=8, depth-2 tree) and the paper's 160M anchor (configs/160m.py: 35 layers, d=512,
bf16) with FFN memory levels (128, 64) on a k=8, depth-2 tree; random weights and a random
bank (throughput does not depend on the values). --quick keeps 4 of the 160M's 35 layers
and decodes 16 tokens per request.

- serve: C = 1, 4, 16 concurrent clients, each sending --requests requests one after the
  other (24-token prompts, --tokens new tokens each, no early EOT), every client's prompts
  routed to its own leaf, so each request carries a different fetched block. Requests go
  through the server's continuous batcher (hmem.infer.batcher: 16 slots, rows fetched on
  arrival) from client threads in this process; the HTTP layer is not timed. tokens/s =
  all new tokens / wall time from the first submit to the last token; ttft = submit to
  first token; per-token latency = the gaps between a request's successive tokens.
- sequential: the same requests, one at a time, with hmem.infer.decoder.generate (batch 1,
  its block): the baseline a server without batching would reach (--quick: the first 4 of
  them; a rate, so the count barely matters). speedup = serve tokens/s / sequential
  tokens/s at the same C.
- generate: decode tokens/s of `generate` itself, the first token excluded (wall time of
  32 new tokens minus that of 1, both with the same compiled functions), with the fetched
  block and with the dense anchor (no memory), alternating --repeats times; ratio = block /
  dense tokens/s (medians).
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


def _source(name: str, layers: int | None):
  """A MemorySource of random weights and a random bank (no router: leaves are given)."""
  from hmem.config import load_config
  from hmem.infer.source import ArrayBank, MemorySource
  from hmem.memory.spec import memory_spec
  from hmem.model import build_model
  file, overrides = MODELS[name]
  if name == '160m' and layers:
    overrides = overrides + [f'model.layers={layers}']
  cfg = load_config(os.path.join(CONFIGS, file), overrides)
  model = build_model(cfg, seed=0, memory_layers=memory_spec(cfg).layers)
  rng = np.random.default_rng(0)
  # float32 rows; the source casts a fetched block to the compute dtype, as from a bundle.
  bank = {t: {n: 0.02 * rng.standard_normal(shape, np.float32) for n, shape in named.items()}
          for t, named in memory_spec(cfg).bank_shapes.items()}
  return MemorySource(cfg, model, None, ArrayBank(bank), step=0)


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
      memory = source.memory(np.array([leaf]), 'fetched')  # routed and fetched on arrival

      def emit(token, finish, times=times, done=done):
        if finish is None:
          times.append(time.perf_counter())
        else:
          done.set()

      start = time.perf_counter()
      batcher.submit(Request(prompt, memory, tokens, emit))
      done.wait()
      with lock:
        ttft.append(times[0] - start)
        gaps.extend(np.diff(times))
        counts.append(len(times))

  threads = [threading.Thread(target=client, args=(work,)) for work in by_client.values()]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  assert all(n == tokens for n in counts)
  return {'tokens_per_s': sum(counts) / wall, 'ttft_ms_p50': 1e3 * float(np.median(ttft)),
          'token_ms_p50': 1e3 * float(np.percentile(gaps, 50)), 'token_ms_p99': 1e3 * float(np.percentile(gaps, 99)),
          'wall_s': wall}


def _sequential(source, requests, tokens: int) -> dict:
  from hmem.infer.decoder import generate
  start = time.perf_counter()
  for _, prompt, leaf in requests:
    out = generate(source.model, [prompt], source.memory(np.array([leaf]), 'fetched'), eot_id=-1,
                   max_new_tokens=tokens)
    assert len(out[0]) == tokens
  wall = time.perf_counter() - start
  return {'tokens_per_s': len(requests) * tokens / wall, 'wall_s': wall}


def _generate_speed(source, repeats: int) -> dict:
  """Decode tokens/s of generate, first token excluded, with the block and dense (medians)."""
  from hmem.infer.decoder import generate
  prompt = [np.random.default_rng(1).integers(1, source.config.model.vocab_size, PROMPT).tolist()]
  memories = {'fetched': source.memory(np.array([0]), 'fetched'), 'dense': None}

  def seconds(memory, n):
    start = time.perf_counter()
    generate(source.model, prompt, memory, eot_id=-1, max_new_tokens=n)
    return time.perf_counter() - start

  for memory in memories.values():  # compile both (1 and 32 new tokens share the cache length)
    seconds(memory, 1)
  rates = {mode: [] for mode in memories}
  for _ in range(repeats):
    for mode, memory in memories.items():
      rates[mode].append(31 / max(seconds(memory, 32) - seconds(memory, 1), 1e-9))
  out = {f'{mode}_tokens_per_s': statistics.median(r) for mode, r in rates.items()}
  out['ratio'] = statistics.median(f / d for f, d in zip(rates['fetched'], rates['dense']))
  return out


def bench(name: str, quick: bool, layers: int | None, tokens: int, per_client: int, repeats: int) -> dict:
  from hmem.infer.batcher import Batcher
  from hmem.infer.decoder import BUCKET, round_up
  source = _source(name, layers)
  zero_row = {n: np.zeros_like(a) for n, a in source.memory(np.array([0]), 'fetched').items()}
  batcher = Batcher(source.model, slots=SLOTS, max_len=round_up(PROMPT, BUCKET) + tokens,
                    eot_id=-1, memory_row=zero_row)
  try:
    _serve(source, batcher, _requests(source, 2, 1), tokens)  # compile prefill and step
    _sequential(source, _requests(source, 1, 1), tokens)
    rows = {}
    for clients in CLIENTS:
      requests = _requests(source, clients, per_client)
      served = _serve(source, batcher, requests, tokens)
      sequential = _sequential(source, requests[:4] if quick else requests, tokens)
      rows[clients] = {**served, 'sequential_tokens_per_s': sequential['tokens_per_s'],
                       'speedup': served['tokens_per_s'] / sequential['tokens_per_s']}
  finally:
    batcher.close()
  return {'layers': source.config.model.layers, 'serve': rows, 'generate': _generate_speed(source, repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer tokens and requests, 4-layer 160M (< 60 s)')
  parser.add_argument('--models', default='quickstart,160m')
  parser.add_argument('--layers', type=int, default=None, help="the 160M's layers (default 35; quick 4)")
  parser.add_argument('--tokens', type=int, default=None, help='new tokens per request (default 64; quick 16)')
  parser.add_argument('--requests', type=int, default=None, help='requests per client (default 2; quick 1)')
  parser.add_argument('--repeats', type=int, default=None, help='generate speed pairs (default 5; quick 1)')
  args = parser.parse_args()
  tokens, per_client = args.tokens or (16 if args.quick else 64), args.requests or (1 if args.quick else 2)
  repeats = args.repeats or (1 if args.quick else 5)
  layers = args.layers or (4 if args.quick else None)
  results = {}
  for name in args.models.split(','):
    r = results[name] = bench(name, args.quick, layers, tokens, per_client, repeats)
    print(f'\n{name} ({r["layers"]} layers), {tokens} new tokens per request, {per_client} request(s) per client')
    print(f'{"clients":>7} {"tok/s":>9} {"seq tok/s":>10} {"speedup":>8} {"ttft p50 ms":>12} '
          f'{"tok p50 ms":>11} {"tok p99 ms":>11}')
    for clients, row in r['serve'].items():
      print(f'{clients:>7} {row["tokens_per_s"]:>9.1f} {row["sequential_tokens_per_s"]:>10.1f} '
            f'{row["speedup"]:>7.2f}x {row["ttft_ms_p50"]:>12.1f} {row["token_ms_p50"]:>11.2f} '
            f'{row["token_ms_p99"]:>11.2f}')
    g = r['generate']
    print(f'generate decode (first token excluded): {g["fetched_tokens_per_s"]:.1f} tok/s with the block, '
          f'{g["dense_tokens_per_s"]:.1f} dense; ratio {g["ratio"]:.2f}')
  print(json.dumps({'quick': args.quick, 'tokens': tokens, 'requests_per_client': per_client, 'models': results}))


if __name__ == '__main__':
  main()
