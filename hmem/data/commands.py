"""`hmem prepare`: raw documents -> a tokenized, clustered, packed dataset."""

from __future__ import annotations

import json

from hmem import command


def _prepare(args, cfg):
  from hmem.data.prepare import prepare
  if args.tokenizer:
    from hmem.data.tokenizer import tokenizer_file
    cfg.data.tokenizer = tokenizer_file(args.tokenizer)
  if args.filter is not None:
    cfg.data.filter = args.filter
  manifest = prepare(cfg, args.input, args.out, runner=args.runner, workers=args.workers,
                     pipeline_args=args.pipeline_args, progress=not args.no_progress,
                     range_bytes=int(args.range_mb * 2**20))
  if manifest is not None:
    print(json.dumps(manifest))


def register(sub) -> None:
  p = command.add(sub, 'prepare', _prepare, 'build a clustered, packed dataset from raw documents')
  p.add_argument('--input', required=True, help='file, directory or glob of JSONL / Parquet / .txt')
  p.add_argument('--out', required=True, help='output dataset directory')
  p.add_argument('--runner', default='direct', help='Beam runner: direct (local processes), dataflow, '
                 'flink, spark, or a runner class; its pipeline options follow a `--` (BUILD.md)')
  p.add_argument('--workers', type=int, default=0, help='direct runner: worker processes (0 = the cores)')
  p.add_argument('--range-mb', type=float, default=16, help='the unit of work: MB of a JSONL file, or of a Parquet '
                 "file's row groups (compressed and text files are read whole); the output does not depend on it")
  p.add_argument('--tokenizer', default='', help='tokenizer.json, or a run directory holding one (hmem import); '
                 'sets data.tokenizer')
  p.add_argument('--filter', default=None, help="keep only the records this expression of their fields holds "
                 "for, e.g. \"language == 'en' and score >= 0.5\" (sets data.filter)")
  command.progress_flag(p)
