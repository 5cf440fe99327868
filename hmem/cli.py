"""The `hmem` command line: one registry of every package's subcommands.


A registry: each package defines its commands in its own module (`register(subparsers)`,
flags beside their handlers; `hmem.command` has what they share); this module collects
them, splits off `--config.KEY=VALUE` overrides and maps errors to exit codes.

Subcommands that build something take `--config FILE` plus any number of `--config.a.b=value`
overrides; those that read a run, a bundle or outside weights (import, export, bank, generate, serve,
eval) use its saved config and take none.
User errors (bad config, missing file, bad data, unusable checkpoint) print one line
starting with `hmem: error:` and exit 2; a diverged run prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version('hmem')
  except metadata.PackageNotFoundError:  # run from a source tree that is not installed
    return 'unknown (not installed)'


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(other arguments, `--config.KEY=VALUE` overrides); `--config.KEY VALUE` (a space, as
  absl's config flags accept) is one override."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.') and '=' not in arg and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
      overrides.append(f'{arg}={argv[i + 1]}')
      i += 2
      continue
    (overrides if arg.startswith('--config.') else rest).append(arg)
    i += 1
  return rest, overrides


# Each package's commands, in the order `hmem --help` lists them.
COMMANDS = ('hmem.train.commands', 'hmem.quickstart.commands', 'hmem.data.commands', 'hmem.weights.commands',
            'hmem.bundle.commands', 'hmem.infer.commands', 'hmem.plan.commands', 'hmem.sweep.commands')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='hmem', description=__doc__.splitlines()[0])
  parser.add_argument('--version', action='version', version=f'%(prog)s {_version()}')
  sub = parser.add_subparsers(dest='command', required=True)
  for name in COMMANDS:
    importlib.import_module(name).register(sub)
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # After `--`: Beam pipeline options for `hmem prepare --runner ...`, passed on untouched.
  argv, passed = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  args.overrides, args.pipeline_args = tuple(overrides), passed

  from hmem.config import load_config
  from hmem.errors import ConfigError, TrainingError, UserError
  try:
    if overrides and not args.takes_overrides:
      raise ConfigError(f'`hmem {args.command}` takes no --config overrides: it reads the saved config')
    cfg = load_config(args.config, overrides) if args.config else None
    args.fn(args, cfg)
  except TrainingError as e:
    print(f'hmem: error: {e}', file=sys.stderr)
    return 1
  except UserError as e:
    print(f'hmem: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    from hmem.train.storage import storage_errno
    if storage_errno(e) is None:
      raise
    print(f'hmem: error: cannot write {e.filename or "to the workdir"}: {e.strerror}; free space or make it '
          'writable, then run again (complete checkpoints are kept)', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('hmem: interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
