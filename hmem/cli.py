"""The `hmem` command: train, sizes, config, prepare (and more as the framework grows).

Every subcommand takes `--config FILE` plus any number of `--config.a.b=value` overrides.
User errors (bad config, missing file, bad data, unusable checkpoint) print one line
starting with `hmem: error:` and exit 2; a diverged run prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys


def _init_distributed(args) -> None:
  """Joins JAX's multi-controller runtime: explicitly (--coordinator ...) or, with
  --distributed, from the environment (SLURM, TPU VM, GKE/XPK JobSets set it)."""
  import jax
  if args.coordinator:
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def _cmd_train(args, cfg):
  from hmem import compile_cache
  from hmem.train.trainer import train
  _init_distributed(args)
  compile_cache.enable(cfg, args.workdir)
  summary = train(cfg, args.workdir, progress=not args.no_progress)
  import jax
  if jax.process_index() == 0:
    print(json.dumps(summary))


def _cmd_sizes(args, cfg):
  from hmem import sizes
  from hmem.memory import config as memory_config
  memory_config.check(cfg)
  counts = sizes.sizes(cfg)
  counts['flops_per_token'] = sizes.flops_per_token(cfg, counts)
  width = max(map(len, counts))
  for name, value in counts.items():
    print(f'{name:<{width}}  {value:,.0f}')
  print(json.dumps(counts))


def _cmd_config(args, cfg):
  print(cfg)


def _cmd_prepare(args, cfg):
  from hmem.data.prepare import prepare
  manifest = prepare(cfg, args.input, args.out, processes=args.processes, process_index=args.process_index,
                     stage=args.stage, timeout_s=args.timeout, progress=not args.no_progress)
  if manifest is not None:
    print(json.dumps(manifest))


def _cmd_quickstart(args, cfg):
  from hmem import compile_cache
  from hmem.quickstart import quickstart
  compile_cache.enable(cfg, args.workdir)
  print(json.dumps(quickstart(cfg, args.workdir, progress=not args.no_progress)))


def _cmd_plan(args, cfg):
  from hmem import compile_cache, plan
  plan.use_fake_devices(args.devices, args.platform)
  compile_cache.enable(cfg)
  import jax
  devices = jax.devices()
  if len(devices) < args.devices:
    from hmem.errors import ConfigError
    raise ConfigError(f'--devices={args.devices} but {len(devices)} {args.platform} devices are present; '
                      'use --platform cpu to plan on fake devices')
  out = plan.plan(cfg, devices[:args.devices])
  for part, nbytes in out['bytes_per_device'].items():
    print(f'{part + " per device":<28} {nbytes / 2**30:12.4f} GiB')
  for kind, nbytes in sorted(out['collective_bytes'].items()):
    print(f'{kind + " per step":<28} {nbytes / 2**30:12.4f} GiB')
  print(f'{"FLOPs per step":<28} {out["flops_per_step"]:.4e}')
  print(json.dumps(out))


def _cmd_sweep(args, cfg):
  from hmem.sweep import commands
  commands.run_command(args) if args.action == 'run' else commands.collect_command(args)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='hmem', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)

  def add(name, fn, help_text):
    p = sub.add_parser(name, help=help_text)
    p.add_argument('--config', required=True, help='config file defining get_config()')
    p.set_defaults(fn=fn)
    return p

  p = add('train', _cmd_train, 'train (or resume) a run in --workdir')
  p.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  g = p.add_argument_group('multi-host (see BUILD.md)')
  g.add_argument('--distributed', action='store_true', help='jax.distributed.initialize() from the environment')
  g.add_argument('--coordinator', default='', help='HOST:PORT of process 0')
  g.add_argument('--num-processes', type=int, default=1)
  g.add_argument('--process-id', type=int, default=0)
  p = add('quickstart', _cmd_quickstart, 'prepare Wikipedia, pretrain an anchor, add memory, compare')
  p.add_argument('--workdir', required=True, help='directory for the corpus, dataset and both runs')
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  add('sizes', _cmd_sizes, 'print parameter counts and FLOPs per token')
  add('config', _cmd_config, 'print the resolved config')
  p = add('prepare', _cmd_prepare, 'build a clustered, packed dataset from raw documents')
  p.add_argument('--input', required=True, help='file, directory or glob of JSONL / Parquet / .txt')
  p.add_argument('--out', required=True, help='output dataset directory')
  p.add_argument('--processes', type=int, default=1, help='processes sharing the work')
  p.add_argument('--process-index', type=int, default=0, help='index of this process')
  p.add_argument('--stage', choices=('all', 'fit', 'map', 'reduce'), default='all',
                 help='run one stage as its own job (fit: process 0 only; see BUILD.md)')
  p.add_argument('--timeout', type=float, default=6 * 3600, help='seconds to wait for other processes')
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  p = add('plan', _cmd_plan, 'per-device memory, collectives and FLOPs of a train step on N devices')
  p.add_argument('--devices', type=int, required=True, help='devices to plan for (fake CPU devices by default)')
  p.add_argument('--platform', default='cpu', help='cpu (fake devices) or the platform of the devices present')
  p = sub.add_parser('sweep', help='run a sweep file (one workdir per run), or collect, fit and plot it')
  p.set_defaults(fn=_cmd_sweep, config=None)
  p.add_argument('action', choices=('run', 'collect'))
  p.add_argument('file', help='sweep file defining get_config() and sweep() (see configs/sweeps/); '
                 '--config.KEY=VALUE overrides apply to every run')
  p.add_argument('--root', default='', help='directory of the run workdirs (default runs/sweeps/<file name>)')
  p.add_argument('--steps-scale', type=float, default=1.0, help='multiply every run\'s steps (own workdirs)')
  p.add_argument('--launcher', choices=('local', 'slurm'), default='local')
  p.add_argument('--max-parallel', type=int, default=1, help='local: runs at once')
  p.add_argument('--sbatch-arg', action='append', default=[], help='slurm: extra sbatch option (repeatable)')
  p.add_argument('--dry-run', action='store_true', help='list the runs and their state, run nothing')
  p.add_argument('--no-progress', action='store_true')
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith('--config.')]
  args = _parser().parse_args([a for a in argv if not a.startswith('--config.')])
  args.overrides = tuple(overrides)

  from hmem.config import load_config
  from hmem.errors import TrainingError, UserError
  try:
    cfg = load_config(args.config, overrides) if args.config else None
    args.fn(args, cfg)
  except TrainingError as e:
    print(f'hmem: error: {e}', file=sys.stderr)
    return 1
  except UserError as e:
    print(f'hmem: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('hmem: interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
