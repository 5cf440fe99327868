"""`hmem quickstart`: the whole method on a small corpus, compared with a dense baseline."""

from __future__ import annotations

import json

from hmem import command


def _command(args, cfg):
  from hmem import compile_cache
  from hmem.quickstart.run import quickstart
  compile_cache.enable(cfg, args.workdir)
  print(json.dumps(quickstart(cfg, args.workdir, corpus=args.corpus, train_docs=args.train_docs,
                              probes=args.probes, progress=not args.no_progress)))


def register(sub) -> None:
  p = command.add(sub, 'quickstart', _command,
                  'anchor, anchor + memory and a dense baseline on Wikipedia, compared')
  p.add_argument('--workdir', required=True, help='directory for the corpus, dataset, runs, bundle and results')
  p.add_argument('--corpus', default='', help='a JSONL file of {"text"} records (default: offline Wikipedia)')
  p.add_argument('--train-docs', type=int, default=500, help='training documents sampled for evaluation')
  p.add_argument('--probes', default='', help='a JSONL file of multiple-choice probes ("prompt", "candidates", '
                 '"answer"): adds a probe-accuracy row per mode')
  command.progress_flag(p)
