"""`hmem train`, `hmem sizes` and `hmem config`: train a config, and look at one."""

from __future__ import annotations

import json

from hmem import command


def _train(args, cfg):
  from hmem import compile_cache
  from hmem.files import as_path
  from hmem.train.trainer import train
  command.init_distributed(args)
  compile_cache.enable(cfg, args.workdir)
  workdir = as_path(args.workdir)
  new = not workdir.exists()
  try:
    summary = train(cfg, args.workdir, progress=not args.no_progress)
  except Exception:
    if new and workdir.is_dir() and not any(workdir.iterdir()):  # a run stopped before it wrote anything
      workdir.rmdir()
    raise
  import jax
  if jax.process_index() == 0:
    print(json.dumps(summary))


def _sizes(args, cfg):
  from hmem import sizes
  from hmem.memory import config as memory_config
  memory_config.check(cfg)
  counts = sizes.sizes(cfg)
  counts['flops_per_token'] = sizes.flops_per_token(cfg, counts)
  width = max(map(len, counts))
  for name, value in counts.items():
    print(f'{name:<{width}}  {value:,.0f}')
  print(json.dumps(counts))


def _config(args, cfg):
  from hmem.config import as_overrides
  if args.json:
    print(cfg.to_json_best_effort(indent=2))
  else:
    print('\n'.join(as_overrides(cfg)))


def register(sub) -> None:
  p = command.add(sub, 'train', _train, 'train (or resume) a run in --workdir')
  p.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config')
  command.progress_flag(p)
  command.distributed_args(p)
  command.add(sub, 'sizes', _sizes, 'print parameter counts and FLOPs per token')
  p = command.add(sub, 'config', _config, 'print the resolved config as --config.KEY=VALUE lines (paste them back)')
  p.add_argument('--json', action='store_true', help='print it as JSON instead')
