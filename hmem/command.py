"""What every package's `commands.py` shares: adding a subcommand, the flags of multi-host
commands, and joining JAX's multi-controller runtime from them.

Each package registers its own commands (`register(subparsers)`, flags beside handlers);
`hmem.cli` only collects them and maps errors to exit codes.
"""

from __future__ import annotations

import argparse


def add(sub, name: str, fn, help_text: str, *, config: bool = True,
        overrides: bool | None = None) -> argparse.ArgumentParser:
  """A subcommand calling `fn(args, cfg)`. With `config` it takes `--config FILE`, loaded
  with the `--config.KEY=VALUE` overrides `hmem.cli` splits off into `cfg`; without, it
  reads a saved config, `cfg` is None and overrides are refused unless `overrides` (a
  sweep applies them to every run itself, from `args.overrides`)."""
  p = sub.add_parser(name, help=help_text, description=help_text)
  if config:
    p.add_argument('--config', required=True, help='config file defining get_config()')
  p.set_defaults(fn=fn, config=None, takes_overrides=config if overrides is None else overrides)
  return p


def progress_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument('--no-progress', action='store_true', help='no progress bars')


def distributed_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group('multi-host (see BUILD.md)')
  g.add_argument('--distributed', action='store_true', help='jax.distributed.initialize() from the environment')
  g.add_argument('--coordinator', default='', help='HOST:PORT of process 0')
  g.add_argument('--num-processes', type=int, default=1)
  g.add_argument('--process-id', type=int, default=0)


def init_distributed(args) -> None:
  """Joins JAX's multi-controller runtime: explicitly (--coordinator ...) or, with
  --distributed, from the environment (SLURM, TPU VM, GKE/XPK JobSets set it)."""
  import jax
  if args.coordinator:
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()
