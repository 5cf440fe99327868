"""`hmem prepare` (the Beam pipeline, DirectRunner) on synthetic corpora shaped as corpora are published.

  python benchmarks/prepare.py [--quick] [--cases many,jsonl,parquet] [--sizes 100000,1000000,3000000]
      [--files 16] [--jsonl-gb 2] [--parquet-docs 1000000] [--workers 2] [--range-mb MB] [--repo PATH]

Cases (documents of words drawn from one of 64 topics of 80 words):
  many      for each N of --sizes, N short documents (15-40 words) in --files JSONL files
  jsonl     one JSONL file of --jsonl-gb GB of web-length documents (150-450 words)
  parquet   one Parquet file of --parquet-docs short documents in row groups of 20k rows,
            (2,500 with --quick), the text beside the columns of a web corpus (id, url,
            date, language, score)
Each runs `hmem prepare --config configs/quickstart.py --config.memory.k=16
--config.memory.depth=2` (TF-IDF, 256 leaves) as a subprocess and samples, every 0.2 s, the
RSS and CPU time of the launcher and of each worker process (psutil). The table gives the
peak RSS of the launcher and of each worker, each worker's CPU seconds, and the cores busy
on average (CPU seconds of every process / wall seconds); then one JSON object, last.
--quick: 10k documents in 16 files and a 4 MB JSONL file, in 1 MB ranges (under a minute
on two idle cores; `--quick --cases parquet`: 20k Parquet rows in row groups of 2,500).
--repo: run another checkout's hmem (a baseline) in place of this one (--range-mb is then
left out unless given).
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
import pyarrow as pa
import pyarrow.parquet as pq

REPO = pathlib.Path(__file__).resolve().parents[1]
_WORDS = np.array([f'w{i}' for i in range(5000)])


class Documents:
  """Texts of `words` (lo, hi) words, each text's drawn from one of 64 topics of 80 words; seeded."""

  def __init__(self, seed: int, words: tuple[int, int]):
    self.rng, self.words = np.random.default_rng(seed), words
    self.topics_TxW = self.rng.integers(0, len(_WORDS), (64, 80))

  def take(self, n: int) -> list[str]:
    words_N = self.rng.integers(*self.words, n)
    topic_W = np.repeat(self.rng.integers(0, 64, n), words_N)
    words = _WORDS[self.topics_TxW[topic_W, self.rng.integers(0, 80, topic_W.size)]].tolist()
    ends_N = np.cumsum(words_N).tolist()
    return [' '.join(words[lo:hi]) for lo, hi in zip([0, *ends_N], ends_N)]


def write_many(root: pathlib.Path, n: int, files: int) -> None:
  docs, per = Documents(0, (15, 40)), -(-n // files)
  root.mkdir(parents=True)
  for f in range(files):
    with open(root / f'part-{f:04d}.jsonl', 'w') as out:
      out.writelines(json.dumps({'text': t}) + '\n' for t in docs.take(max(0, min(per, n - f * per))))


def write_jsonl(root: pathlib.Path, size: int) -> None:
  docs = Documents(1, (150, 450))
  root.mkdir(parents=True)
  with open(root / 'web.jsonl', 'w') as out:
    while out.tell() < size:
      out.writelines(json.dumps({'id': i, 'text': t}) + '\n' for i, t in enumerate(docs.take(1000)))


def write_parquet(root: pathlib.Path, n: int, row_group: int) -> None:
  docs, rng = Documents(2, (15, 40)), np.random.default_rng(3)
  root.mkdir(parents=True)
  with pq.ParquetWriter(root / 'web.parquet', pa.schema([
      ('id', pa.string()), ('text', pa.string()), ('url', pa.string()), ('date', pa.date32()),
      ('language', pa.string()), ('language_score', pa.float64())])) as writer:
    for lo in range(0, n, row_group):
      rows = min(row_group, n - lo)
      writer.write_table(pa.table({
          'id': [f'<urn:uuid:{i:012x}>' for i in range(lo, lo + rows)], 'text': docs.take(rows),
          'url': [f'https://example.org/{i}' for i in range(lo, lo + rows)],
          'date': pa.array(np.datetime64('2024-01-01') + rng.integers(0, 365, rows), pa.date32()),
          'language': ['en'] * rows, 'language_score': rng.random(rows)}), row_group_size=row_group)


def run_prepare(corpus: pathlib.Path, out: pathlib.Path, workers: int, repo: pathlib.Path,
                range_mb: float | None) -> dict:
  """Wall seconds, peak RSS (bytes) and CPU seconds of the launcher and of each worker, manifest."""
  cmd = [sys.executable, '-m', 'hmem.cli', 'prepare', '--config', str(repo / 'configs/quickstart.py'),
         '--config.memory.k=16', '--config.memory.depth=2', '--input', str(corpus), '--out', str(out),
         '--workers', str(workers), '--no-progress'] + ([f'--range-mb={range_mb}'] if range_mb else [])
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=repo,
                          env={**os.environ, 'PYTHONPATH': str(repo)})
  launcher, rss, cpu = psutil.Process(proc.pid), {}, {}  # pid -> peak RSS, last CPU seconds
  while proc.poll() is None:
    try:
      for p in [launcher, *launcher.children(recursive=True)]:
        with p.oneshot():
          rss[p.pid] = max(rss.get(p.pid, 0), p.memory_info().rss)
          times = p.cpu_times()
          cpu[p.pid] = times.user + times.system
    except psutil.Error:  # a process ended between the listing and the reading
      pass
    time.sleep(0.2)
  seconds = time.perf_counter() - start
  stdout = proc.stdout.read()
  if proc.returncode:
    raise SystemExit(f'prepare failed ({proc.returncode}): {" ".join(cmd)}')
  workers = [pid for pid in rss if pid != proc.pid and cpu.get(pid, 0) > 1.0]  # not helper processes
  return {'seconds': seconds, 'launcher_rss': rss[proc.pid], 'worker_rss': [rss[p] for p in workers],
          'worker_cpu': [cpu[p] for p in workers], 'cpu': sum(cpu.values()),
          'manifest': json.loads(stdout.strip().splitlines()[-1])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='small corpora of every case')
  parser.add_argument('--cases', default=None, help='cases to run, comma-separated (default: all; --quick: many,jsonl)')
  parser.add_argument('--sizes', default='100000,1000000,3000000', help='many: corpus sizes, comma-separated')
  parser.add_argument('--files', type=int, default=16, help='many: JSONL files a corpus is split into')
  parser.add_argument('--jsonl-gb', type=float, default=2.0, help='jsonl: the file size')
  parser.add_argument('--parquet-docs', type=int, default=1_000_000, help='parquet: documents')
  parser.add_argument('--workers', type=int, default=2, help='DirectRunner workers')
  parser.add_argument('--range-mb', type=float, default=None, help="hmem prepare --range-mb (default: its own)")
  parser.add_argument('--repo', default=str(REPO), help='the checkout whose hmem runs')
  args = parser.parse_args()
  cases = (args.cases or ('many,jsonl' if args.quick else 'many,jsonl,parquet')).split(',')
  sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(',')]
  jsonl_bytes = 4 << 20 if args.quick else int(args.jsonl_gb * 2**30)
  parquet_docs, row_group = (20_000, 2_500) if args.quick else (args.parquet_docs, 20_000)
  range_mb = args.range_mb or (1 if args.quick else None)
  repo = pathlib.Path(args.repo).resolve()
  runs = [('many', n, lambda root, n=n: write_many(root, n, args.files)) for n in sizes if 'many' in cases]
  if 'jsonl' in cases:
    runs.append(('jsonl', jsonl_bytes, lambda root: write_jsonl(root, jsonl_bytes)))
  if 'parquet' in cases:
    runs.append(('parquet', parquet_docs, lambda root: write_parquet(root, parquet_docs, row_group)))
  results = {'machine': f'{os.cpu_count()}-core CPU', 'workers': args.workers, 'files': args.files,
             'repo': str(repo), 'range_mb': range_mb, 'runs': []}
  print(f'{"case":>8} {"documents":>10} {"input MB":>8} {"ranges":>6} {"seconds":>8} {"docs/s":>8} '
        f'{"launcher GB":>11} {"worker GB":>12} {"worker CPU s":>13} {"cores busy":>10} {"sequences":>10}')
  with tempfile.TemporaryDirectory() as tmp:
    for case, size, write in runs:
      corpus, out = pathlib.Path(tmp) / 'corpus', pathlib.Path(tmp) / 'out'
      write(corpus)
      input_bytes = sum(p.stat().st_size for p in corpus.iterdir())
      r = run_prepare(corpus, out, args.workers, repo, range_mb)
      m = r.pop('manifest')
      row = {'case': case, 'documents': m['documents_read'], 'input_mb': round(input_bytes / 2**20),
             'ranges': m.get('ranges'), 'seconds': round(r['seconds'], 1),
             'docs_per_s': round(m['documents_read'] / r['seconds']),
             'launcher_rss_gb': round(r['launcher_rss'] / 2**30, 2),
             'worker_rss_gb': [round(x / 2**30, 2) for x in r['worker_rss']],
             'worker_cpu_s': [round(x) for x in r['worker_cpu']], 'cores_busy': round(r['cpu'] / r['seconds'], 2),
             'sequences': m['sequences'], 'tokens': m['tokens'],
             'largest_leaf_documents': m['occupancy'][str(m['depth'])]['largest']}
      results['runs'].append(row)
      print(f'{case:>8} {row["documents"]:>10,} {row["input_mb"]:>8,} {str(row["ranges"]):>6} {row["seconds"]:>8} '
            f'{row["docs_per_s"]:>8,} {row["launcher_rss_gb"]:>11} {"/".join(map(str, row["worker_rss_gb"])):>12} '
            f'{"/".join(map(str, row["worker_cpu_s"])):>13} {row["cores_busy"]:>10} {m["sequences"]:>10,}', flush=True)
      shutil.rmtree(corpus)
      shutil.rmtree(out)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
