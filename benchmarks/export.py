"""Export and --workdir inference of banks larger than the export buffer: peak memory stays
flat when the bank grows.

    flock /tmp/hmem-heavy.lock nice -n 5 python benchmarks/export.py [--quick] [--dir DIR]

For each of two bank sizes 4x apart (3 GB and 0.75 GB of fp32 weights; --quick 192 MB and
48 MB) it trains one step of the tiny anchor (d=64, 2 layers) with FFN memory on the
400-document Wikipedia sample prepared as a k=16, depth-2 tree (256 leaves: the bank is
almost all level 2, 256 rows), then, each in a fresh process:

- export: `hmem export --buffer-mb B` (256; --quick 16) to a bfloat16 bundle;
- eval: `hmem eval --workdir RUN` of 8 texts in mode fetched (rows read from the
  checkpoint on demand);
- generate: `hmem generate --workdir RUN` of 16 tokens from one prompt (the same reads).

Reported per size: bank bytes (fp32), the peak RSS of each process (whole-process,
ru_maxrss), export MB/s (fp32 bytes read over the export's wall time, process start
included), and peak RSS / bank bytes. The training process holds the bank and its two
moments (about 4x the bank) and is not what is measured. Prints a table, then one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

WIKI = os.path.join(ROOT, 'tests', 'data', 'wiki_sample.jsonl')
K, DEPTH = 16, 2
CHILD = ('import json, resource, sys; from hmem.cli import main; rc = main(sys.argv[1:]); '
         'print(json.dumps({"rc": rc, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))')


def _overrides(data: str, width: int) -> list[str]:
  return ['model.vocab_size=512', f'memory.k={K}', f'memory.depth={DEPTH}', f'memory.levels=(16, {width})',
          'memory.generic_prob=0', 'data.source=prepared', f'data.path={data}', 'data.tokenizer_sample=400',
          'data.tree_sample=400', 'data.kmeans_samples=400', 'data.kmeans_steps=5', 'data.tfidf_dim=32',
          'data.eval_fraction=0.05', 'train.steps=1', 'train.checkpoint_every=1', 'train.eval_every=0',
          'train.log_every=1', 'train.warmup_steps=1']


def _child(args: list[str]) -> tuple[dict, float]:
  start = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  wall = time.perf_counter() - start
  if out.returncode or not out.stdout.strip():
    raise SystemExit(f'{args[0]} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1]), wall


def run(root: str, width: int, buffer_mb: float, data: str) -> dict:
  from hmem.config import load_config
  from hmem.sizes import sizes
  config = os.path.join(ROOT, 'configs', 'tiny.py')
  overrides = _overrides(data, width)
  bank = sizes(load_config(config, overrides))['bank_params'] * 4
  workdir = os.path.join(root, f'run{width}')
  _child(['train', '--config', config, '--workdir', workdir, '--no-progress',
          *(f'--config.{o}' for o in overrides)])
  exported, export_s = _child(['export', '--workdir', workdir, '--out', os.path.join(root, f'bundle{width}'),
                               '--buffer-mb', str(buffer_mb), '--no-progress'])
  texts = os.path.join(root, 'texts.jsonl')
  evaluated, eval_s = _child(['eval', '--workdir', workdir, '--data', texts, '--json', '--no-progress'])
  generated, generate_s = _child(['generate', '--workdir', workdir, '--prompt', 'The history of the city',
                                  '--max-new-tokens', '16', '--no-progress'])
  return {'bank_bytes': bank, 'buffer_mb': buffer_mb, 'export_peak_rss': exported['peak_rss'], 'export_s': export_s,
          'export_mb_s': bank / 2**20 / export_s, 'export_rss_over_bank': exported['peak_rss'] / bank,
          'eval_peak_rss': evaluated['peak_rss'], 'eval_s': eval_s, 'eval_rss_over_bank': evaluated['peak_rss'] / bank,
          'generate_peak_rss': generated['peak_rss'], 'generate_s': generate_s,
          'generate_rss_over_bank': generated['peak_rss'] / bank}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='banks of 192 MB and 48 MB, a 16 MB buffer')
  parser.add_argument('--dir', default='', help='working directory (default: a temporary one, removed)')
  args = parser.parse_args()
  widths, buffer_mb = ((512, 128), 16) if args.quick else ((7680, 1920), 256)
  with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
    from hmem.config import load_config
    from hmem.data.prepare import prepare
    data = os.path.join(root, 'data')
    prepare(load_config(os.path.join(ROOT, 'configs', 'tiny.py'), _overrides(data, widths[0])), WIKI, data,
            progress=False)
    with open(WIKI) as f, open(os.path.join(root, 'texts.jsonl'), 'w') as out:
      for line in list(f)[:8]:
        out.write(json.dumps({'text': json.loads(line)['text']}) + '\n')
    rows = {w: run(root, w, buffer_mb, data) for w in widths}
  print(f'{"bank GB":>8} {"buffer MB":>9} {"export RSS GB":>13} {"MB/s":>6} {"RSS/bank":>8} '
        f'{"eval RSS GB":>11} {"RSS/bank":>8} {"generate RSS GB":>15} {"RSS/bank":>8}')
  for r in rows.values():
    print(f'{r["bank_bytes"] / 1e9:8.2f} {r["buffer_mb"]:9.0f} {r["export_peak_rss"] / 1e9:13.2f} '
          f'{r["export_mb_s"]:6.0f} {r["export_rss_over_bank"]:8.2f} {r["eval_peak_rss"] / 1e9:11.2f} '
          f'{r["eval_rss_over_bank"]:8.2f} {r["generate_peak_rss"] / 1e9:15.2f} {r["generate_rss_over_bank"]:8.2f}')
  big, small = (rows[w] for w in widths)
  summary = {'quick': args.quick, 'runs': list(rows.values()),
             'bank_growth': big['bank_bytes'] / small['bank_bytes'],
             'export_rss_growth': big['export_peak_rss'] / small['export_peak_rss'],
             'eval_rss_growth': big['eval_peak_rss'] / small['eval_peak_rss'],
             'generate_rss_growth': big['generate_peak_rss'] / small['generate_peak_rss']}
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
