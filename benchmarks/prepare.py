"""`hmem prepare` (the Beam pipeline, DirectRunner) on synthetic corpora of short documents.

  python benchmarks/prepare.py [--quick] [--sizes 10000,100000,1000000] [--workers N] [--files F]

Writes corpora of N short documents (15-40 words drawn from one of 64 topics of 80 words;
F JSONL files, default 16) and runs `hmem prepare --config configs/quickstart.py` at k=16, depth 2
(TF-IDF) on each as a subprocess, sampling the RSS of the launcher and of each worker
process (psutil) every 0.2 s. Prints a table, then one JSON object as its last line.
--quick: 10k documents only (well under a minute on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_corpus(root: pathlib.Path, n: int, seed: int = 0, files: int = 16) -> None:
  rng = np.random.default_rng(seed)
  topics_TxW = rng.integers(0, 5000, (64, 80))
  root.mkdir(parents=True)
  per = -(-n // files)
  for f in range(files):
    count = max(0, min(per, n - f * per))
    topic_N = rng.integers(0, 64, count)
    words_N = rng.integers(15, 40, count)
    with open(root / f'part-{f:04d}.jsonl', 'w') as out:
      for t, w in zip(topic_N, words_N):
        out.write(json.dumps({'text': ' '.join(f'w{i}' for i in rng.choice(topics_TxW[t], w))}) + '\n')


def run_prepare(corpus: pathlib.Path, out: pathlib.Path, workers: int) -> dict:
  """Wall seconds, peak RSS of the launcher and of the largest worker (bytes), manifest."""
  cmd = [sys.executable, '-m', 'hmem.cli', 'prepare', '--config', str(REPO / 'configs/quickstart.py'),
         '--config.memory.k=16', '--config.memory.depth=2', '--input', str(corpus), '--out', str(out),
         '--workers', str(workers), '--no-progress']
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
  launcher, launcher_peak, worker_peak = psutil.Process(proc.pid), 0, 0
  while proc.poll() is None:
    try:
      launcher_peak = max(launcher_peak, launcher.memory_info().rss)
      for child in launcher.children(recursive=True):
        worker_peak = max(worker_peak, child.memory_info().rss)
    except psutil.Error:  # a process ended between the listing and the reading
      pass
    time.sleep(0.2)
  seconds = time.perf_counter() - start
  stdout = proc.stdout.read()
  if proc.returncode:
    raise SystemExit(f'prepare failed ({proc.returncode}): {" ".join(cmd)}')
  return {'seconds': seconds, 'launcher_rss': launcher_peak, 'worker_rss': worker_peak,
          'manifest': json.loads(stdout.strip().splitlines()[-1])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='10k documents only')
  parser.add_argument('--sizes', default='10000,100000,1000000', help='corpus sizes, comma-separated')
  parser.add_argument('--workers', type=int, default=0, help='DirectRunner workers (0 = the cores)')
  parser.add_argument('--files', type=int, default=16, help='JSONL files a corpus is split into')
  args = parser.parse_args()
  sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(',')]
  results = {'machine': f'{os.cpu_count()}-core CPU', 'workers': args.workers or os.cpu_count(),
             'files': args.files, 'runs': {}}
  print(f'{"documents":>10} {"seconds":>8} {"docs/s":>8} {"launcher GB":>12} {"worker GB":>10} '
        f'{"sequences":>10} {"largest leaf":>13}')
  with tempfile.TemporaryDirectory() as tmp:
    for n in sizes:
      corpus, out = pathlib.Path(tmp) / f'corpus-{n}', pathlib.Path(tmp) / f'out-{n}'
      write_corpus(corpus, n, files=args.files)
      r = run_prepare(corpus, out, args.workers)
      m = r.pop('manifest')
      largest = m['occupancy'][str(m['depth'])]['largest']
      row = {'documents': n, 'seconds': round(r['seconds'], 1), 'docs_per_s': round(n / r['seconds']),
             'launcher_rss_gb': round(r['launcher_rss'] / 2**30, 2), 'worker_rss_gb': round(r['worker_rss'] / 2**30, 2),
             'sequences': m['sequences'], 'tokens': m['tokens'], 'largest_leaf_documents': largest}
      results['runs'][str(n)] = row
      print(f'{n:>10,} {row["seconds"]:>8} {row["docs_per_s"]:>8,} {row["launcher_rss_gb"]:>12} '
            f'{row["worker_rss_gb"]:>10} {m["sequences"]:>10,} {str(largest):>13}')
      shutil.rmtree(corpus)
      shutil.rmtree(out)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
