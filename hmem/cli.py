"""The `hmem` command: train, sizes, config, prepare, import, export, bank, generate, eval, serve.

Subcommands that build something take `--config FILE` plus any number of `--config.a.b=value`
overrides; those that read a run, a bundle or outside weights (import, export, bank, generate, serve,
eval) use its saved config and take none.
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


def _distributed_args(p) -> None:
  g = p.add_argument_group('multi-host (see BUILD.md)')
  g.add_argument('--distributed', action='store_true', help='jax.distributed.initialize() from the environment')
  g.add_argument('--coordinator', default='', help='HOST:PORT of process 0')
  g.add_argument('--num-processes', type=int, default=1)
  g.add_argument('--process-id', type=int, default=0)


def _cmd_train(args, cfg):
  from hmem import compile_cache
  from hmem.files import as_path
  from hmem.train.trainer import train
  _init_distributed(args)
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
  from hmem.config import as_overrides
  if args.json:
    print(cfg.to_json_best_effort(indent=2))
  else:
    print('\n'.join(as_overrides(cfg)))


def _cmd_prepare(args, cfg):
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


def _cmd_quickstart(args, cfg):
  from hmem import compile_cache
  from hmem.quickstart import quickstart
  compile_cache.enable(cfg, args.workdir)
  print(json.dumps(quickstart(cfg, args.workdir, corpus=args.corpus, train_docs=args.train_docs,
                              probes=args.probes, progress=not args.no_progress)))


def _cmd_import(args, cfg):
  from hmem.imports import import_checkpoint
  print(json.dumps(import_checkpoint(args.source, args.out, args.dtype, args.tokenizer, args.layers,
                                     progress=not args.no_progress)))


def _cmd_export(args, cfg):
  if args.format == 'hf':
    if args.subtree is not None:
      from hmem.errors import ConfigError
      raise ConfigError('--subtree picks bank rows, and --format hf exports the anchor alone (no bank); drop '
                        '--subtree, or export a bundle (--format bundle) to ship subtrees')
    from hmem.imports import export_run
    written = export_run(args.workdir, args.out, step=args.step, dtype=args.dtype)
    print(json.dumps({'out': args.out, 'format': 'hf', 'files': written}))
    return
  from hmem.infer.bundle import export
  _init_distributed(args)
  m = export(args.workdir, args.out, step=args.step, dtype=args.dtype, subtrees=args.subtree,
             buffer_mb=args.buffer_mb, progress=not args.no_progress)
  import jax
  if jax.process_index():
    return
  print(json.dumps({'out': args.out, 'step': m['step'], 'dtype': m['dtype'], 'subtrees': m['subtrees'], **m['sizes']}))


def _cmd_bank(args, cfg):
  from hmem.errors import ConfigError
  from hmem.infer import edit
  from hmem.infer.bundle import read_manifest
  from hmem.infer.router import parse_node
  if args.action == 'replace' and not args.source:
    raise ConfigError('hmem bank replace needs --from OTHER_BUNDLE (a bundle of the same run shapes)')
  m = read_manifest(args.bundle)
  nodes = [parse_node(n, m['k'], m['depth']) for n in args.node]
  m = edit.drop(args.bundle, nodes) if args.action == 'drop' else edit.replace(args.bundle, args.source, nodes)
  print(json.dumps(m['edits'][-1]))


def _open(args):
  """The run or bundle of --workdir / --bundle, and the --block nodes parsed against its tree."""
  from hmem import compile_cache
  from hmem.infer.router import parse_node
  from hmem.infer.source import open_source
  source = open_source(bundle=args.bundle, workdir=args.workdir, step=args.step)
  compile_cache.enable(source.config, args.workdir)  # a bundle's: $HMEM_CACHE or ~/.cache/hmem/jax
  m = source.config.memory
  return source, [parse_node(n, m.k, m.depth) for n in args.block]


def _cmd_generate(args, cfg):
  from hmem.infer.decoder import check_prompt, complete
  check_prompt(args.prompt)  # before the model loads
  source, block = _open(args)
  path, text = complete(source, args.prompt, mode=args.memory, block=block, block_best=args.block_best,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, progress=not args.no_progress)
  nodes = ' '.join(f'{level}:{node}' for level, node in enumerate(path, start=1)) if path is not None else None
  print(f'path: {nodes or (f"none (memory: {args.memory})" if source.has_memory else "none (the run has no memory)")}')
  print(args.prompt + text)


def _cmd_eval(args, cfg):
  from hmem.infer import evaluate
  source, block = _open(args)
  result = evaluate.evaluate(source, args.data, block=block, block_best=args.block_best,
                             progress=not args.no_progress)
  if not args.json:
    print(evaluate.table(result))
  if args.plot:
    evaluate.plot(result, args.plot)
  print(json.dumps(result))


def _cmd_serve(args, cfg):
  import os

  from hmem.errors import UserError
  try:
    from hmem.infer.server import serve
  except ImportError as e:
    raise UserError(f'hmem serve needs the serve extra ({e}); install it with pip install "hmem[serve]"') from None
  source, _ = _open(args)
  name = args.name or os.path.basename(str(args.bundle or args.workdir).rstrip('/'))
  serve(source, host=args.host, port=args.port, name=name, slots=args.slots)


def _cmd_plan(args, cfg):
  from hmem import compile_cache, plan
  plan.use_fake_devices(args.devices, args.platform)
  compile_cache.enable(cfg)
  import jax

  from hmem.errors import ConfigError
  try:
    devices = jax.devices()
  except RuntimeError as e:  # no backend for --platform on this machine
    raise ConfigError(f'--platform {args.platform}: no such devices here ({str(e).splitlines()[0]}); '
                      'use --platform cpu to plan on fake devices') from None
  if len(devices) < args.devices:
    raise ConfigError(f'--devices={args.devices} but {len(devices)} {args.platform} devices are present; '
                      'use --platform cpu to plan on fake devices')
  devices, budget = devices[:args.devices], int(args.memory_gb * 1e9)
  if not args.search:
    out = plan.plan(cfg, devices, budget)
    _print_plan(out)
    if out['fits']:
      print(json.dumps(out))
      return
    print(f'hmem: {out["bytes_per_device"]["total"] / 1e9:.1f} GB per device does not fit --memory-gb='
          f'{args.memory_gb:g}; searching layouts', file=sys.stderr)
  best, tried = plan.search(cfg, devices, budget, progress=lambda flags: print(f'hmem: trying {flags}',
                                                                              file=sys.stderr))
  if best is None:
    smallest = min((t['total'] for t in tried if 'total' in t), default=None)
    least = f' (the least: {smallest / 1e9:.1f} GB)' if smallest else ''
    raise ConfigError(f'no data/fsdp layout and remat policy fits {args.memory_gb:g} GB per device on '
                      f'{args.devices} devices{least}; add devices, or lower train.batch_size and raise '
                      'train.grad_accum')
  _print_plan(best)
  print(f'fits {args.memory_gb:g} GB per device with: {" ".join(best["flags"])}')
  print(json.dumps({**best, 'searched': tried}))


def _print_plan(out: dict) -> None:
  for part, nbytes in out['bytes_per_device'].items():
    print(f'{part + " per device":<28} {nbytes / 2**30:12.4f} GiB')
  for kind, nbytes in sorted(out['collective_bytes'].items()):
    print(f'{kind + " per step":<28} {nbytes / 2**30:12.4f} GiB')
  print(f'{"FLOPs per step":<28} {out["flops_per_step"]:.4e}')


def _cmd_sweep(args, cfg):
  from hmem.sweep import commands
  commands.run_command(args) if args.action == 'run' else commands.collect_command(args)


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


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='hmem', description=__doc__.splitlines()[0])
  parser.add_argument('--version', action='version', version=f'%(prog)s {_version()}')
  sub = parser.add_subparsers(dest='command', required=True)

  def add(name, fn, help_text, config=True):
    p = sub.add_parser(name, help=help_text)
    if config:
      p.add_argument('--config', required=True, help='config file defining get_config()')
    p.set_defaults(fn=fn)
    return p

  p = add('train', _cmd_train, 'train (or resume) a run in --workdir')
  p.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  _distributed_args(p)
  p = add('quickstart', _cmd_quickstart, 'anchor, anchor + memory and a dense baseline on Wikipedia, compared')
  p.add_argument('--workdir', required=True, help='directory for the corpus, dataset, runs, bundle and results')
  p.add_argument('--corpus', default='', help='a JSONL file of {"text"} records (default: offline Wikipedia)')
  p.add_argument('--train-docs', type=int, default=500, help='training documents sampled for evaluation')
  p.add_argument('--probes', default='', help='a JSONL file of multiple-choice probes ("prompt", "candidates", '
                 '"answer"): adds a probe-accuracy row per mode')
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  add('sizes', _cmd_sizes, 'print parameter counts and FLOPs per token')
  p = add('config', _cmd_config, 'print the resolved config as --config.KEY=VALUE lines (paste them back)')
  p.add_argument('--json', action='store_true', help='print it as JSON instead')
  p = add('prepare', _cmd_prepare, 'build a clustered, packed dataset from raw documents')
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
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  p = add('import', _cmd_import, 'convert Llama-family weights (GGUF, Hugging Face) into an anchor run', config=False)
  p.add_argument('--from', dest='source', required=True, help='a .gguf file or a Hugging Face checkpoint directory')
  p.add_argument('--out', required=True, help='new run directory (checkpoint, config.py, tokenizer.json)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='parameter and compute dtype')
  p.add_argument('--tokenizer', default=None, help="a tokenizer.json to use instead of the checkpoint's")
  p.add_argument('--layers', type=int, default=None, help='import only the first N layers (tests, quick looks)')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  p = add('export', _cmd_export, 'write an inference bundle from a run directory', config=False)
  p.add_argument('--workdir', required=True, help='run directory (hmem train --workdir)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  p.add_argument('--out', required=True, help='bundle (or --format hf) directory to create: a local path, gs:// or s3://')
  p.add_argument('--format', choices=('bundle', 'hf'), default='bundle',
                 help='bundle: anchor + bank for hmem generate/eval; hf: the anchor alone as a Hugging Face '
                 'checkpoint (config.json, safetensors, tokenizer.json)')
  p.add_argument('--dtype', default='bfloat16', help='bank dtype: bfloat16, float32 or int8 (a scale per row, '
                 'layer and unit; the anchor then bfloat16); the anchor takes it too (hf: bfloat16 or float32)')
  p.add_argument('--subtree', type=int, nargs='+', default=None, help='level-1 subtrees to ship (default: all)')
  p.add_argument('--buffer-mb', type=float, default=1024,
                 help='host memory for the bank while it streams out of the checkpoint, in MB (any bank size)')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  _distributed_args(p)
  p = add('bank', _cmd_bank, "edit a bundle's bank: drop or replace the rows of subtrees (atomic)", config=False)
  p.add_argument('action', choices=('drop', 'replace'), help='drop: zero the rows; replace: copy them from --from')
  p.add_argument('--bundle', required=True, help='the bundle to edit')
  p.add_argument('--node', required=True, nargs='+', help="LEVEL:ID nodes; each names its subtree's rows")
  p.add_argument('--from', dest='source', help='replace: the bundle to copy the rows from')
  for name, fn, help_text in (('generate', _cmd_generate, 'continue a prompt with its routed memory'),
                              ('eval', _cmd_eval, 'perplexity and accuracy of a JSONL file per memory mode')):
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(fn=fn)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--bundle', help='a bundle written by hmem export (a local path, gs:// or s3://)')
    g.add_argument('--workdir', help='a run directory (hmem train --workdir)')
    p.add_argument('--step', type=int, default=None, help='with --workdir: checkpoint step (default: the latest)')
    p.add_argument('--block', nargs='+', default=[], metavar='LEVEL:ID', help='route around these nodes')
    p.add_argument('--block-best', action='store_true', help="route each text around its own level-1 subtree")
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
  p.add_argument('--data', required=True, help='JSONL of {"text"} and {"prompt", "candidates", "answer"} records')
  p.add_argument('--json', action='store_true', help='print only the JSON summary (no table)')
  p.add_argument('--plot', default='', metavar='FILE.png', help='also draw the results as a bar chart')
  p = sub.choices['generate']
  p.add_argument('--prompt', required=True, help='the text to continue')
  p.add_argument('--memory', choices=('fetched', 'generic', 'none'), default='fetched', help='which memory to use')
  p.add_argument('--max-new-tokens', type=int, default=64)
  p.add_argument('--temperature', type=float, default=0.0, help='0: greedy')
  p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling mass')
  p.add_argument('--seed', type=int, default=0)
  p = sub.add_parser('serve', help='an OpenAI-compatible completions server (continuous batching)')
  p.set_defaults(fn=_cmd_serve, config=None, block=[])
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument('--bundle', help='a bundle written by hmem export (a local path, gs:// or s3://)')
  g.add_argument('--workdir', help='a run directory (hmem train --workdir)')
  p.add_argument('--step', type=int, default=None, help='with --workdir: checkpoint step (default: the latest)')
  p.add_argument('--host', default='127.0.0.1', help='address to listen on (0.0.0.0: every interface)')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--slots', type=int, default=16, help='sequences decoded together (the batch of the decode step)')
  p.add_argument('--name', default='', help='the model id clients ask for (default: the bundle or run directory name)')
  p = add('plan', _cmd_plan, 'per-device memory, collectives and FLOPs of a train step on N devices')
  p.add_argument('--devices', type=int, required=True, help='devices to plan for (fake CPU devices by default)')
  p.add_argument('--platform', default='cpu', help='cpu (fake devices) or the platform of the devices present')
  p.add_argument('--memory-gb', type=float, default=80.0, help='memory per device to fit in (GB, 1e9 bytes)')
  p.add_argument('--search', action='store_true', help='find the cheapest data/fsdp layout and remat policy that '
                 'fits --memory-gb (also done when the given layout does not fit) and print its flags')
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
  # After `--`: Beam pipeline options for `hmem prepare --runner ...`, passed on untouched.
  argv, passed = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  args.overrides, args.pipeline_args = tuple(overrides), passed

  from hmem.config import load_config
  from hmem.errors import ConfigError, TrainingError, UserError
  try:
    if overrides and 'config' not in args:
      raise ConfigError(f'`hmem {args.command}` takes no --config overrides: it reads the saved config')
    cfg = load_config(args.config, overrides) if getattr(args, 'config', None) else None
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
