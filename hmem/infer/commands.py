"""`hmem generate`, `hmem eval` and `hmem serve`: a run or bundle put to use."""

from __future__ import annotations

import json
import os

from hmem import command
from hmem.train import hooks


def _open(args):
  """The run or bundle of --workdir / --bundle, and the --block nodes parsed against its tree."""
  from hmem import compile_cache
  from hmem.data.router import parse_node
  from hmem.infer.source import open_source
  source = open_source(bundle=args.bundle, workdir=args.workdir, step=args.step)
  compile_cache.enable(source.config, args.workdir)  # a bundle's: $HMEM_CACHE or ~/.cache/hmem/jax
  m = source.config.memory
  return source, [parse_node(n, m.k, m.depth) for n in args.block]


def _generate(args, cfg):
  from hmem.infer.decoder import check_prompt, complete
  check_prompt(args.prompt)  # before the model loads
  source, block = _open(args)
  path, text = complete(source, args.prompt, mode=args.memory, block=block, block_best=args.block_best,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, progress=not args.no_progress)
  nodes = ' '.join(f'{level}:{node}' for level, node in enumerate(path, start=1)) if path is not None else None
  print(f'path: {nodes or (f"none (memory: {args.memory})" if source.has_memory else "none (the run has no memory)")}')
  print(args.prompt + text)


def _eval(args, cfg):
  from hmem.errors import UserError
  flags = (('--modes', args.modes, 'tasks'), ('--include-path', args.include_path, 'tasks'),
           ('--limit', args.limit, 'tasks'), ('--csv', args.csv, 'tasks'), ('--plot', args.plot, 'data'),
           ('--windows', args.windows, 'data'))
  misplaced = [flag for flag, given, kind in flags if given and not getattr(args, kind)]
  if misplaced:
    raise UserError(f'{", ".join(misplaced)} apply to --{"tasks" if args.data else "data"}; leave them out with '
                    f'--{"data" if args.data else "tasks"}')
  if args.tasks:
    return _eval_tasks(args)
  from hmem.infer import evaluate
  source, block = _open(args)
  result = evaluate.evaluate(source, args.data, block=block, block_best=args.block_best, batch_size=args.batch_size,
                             windows=args.windows or 'training', progress=not args.no_progress)
  if not args.json:
    print(evaluate.table(result))
  if args.plot:
    evaluate.plot(result, args.plot)
  print(json.dumps(result))


def _eval_tasks(args):
  """`hmem eval --tasks`: the harness under each mode, tasks x modes (hmem.infer.table)."""
  from hmem.errors import UserError
  try:
    import lm_eval  # noqa: F401
  except ImportError as e:
    raise UserError(f'hmem eval --tasks runs lm-evaluation-harness ({e}); install it with pip install "hmem[eval]"') \
        from None
  from hmem.infer import table
  names = [t for t in args.tasks.split(',') if t]
  manager = table.task_manager(names, args.include_path)
  tasks = table.resolve_tasks(manager, names)  # before the model loads
  source, block = _open(args)
  modes = table.check_modes(source.tables, args.modes.split(',') if args.modes else table.default_modes(source.tables),
                            block)
  result = table.run_modes(source, tasks, modes, manager=manager, block=block, limit=args.limit,
                           batch_size=args.batch_size, progress=not args.no_progress)
  if not args.json:
    print(table.format_table(result, modes))
  if args.csv:
    from hmem.files import atomic_write
    with atomic_write(args.csv) as f:
      f.write(table.to_csv(result))
  print(json.dumps({'tasks': tasks, 'modes': modes, **result}))


def _serve(args, cfg):
  from hmem.errors import UserError
  try:
    from hmem.infer.server import serve
  except ImportError as e:
    raise UserError(f'hmem serve needs the serve extra ({e}); install it with pip install "hmem[serve]"') from None
  source, _ = _open(args)
  name = args.name or os.path.basename(str(args.bundle or args.workdir).rstrip('/'))
  serve(source, host=args.host, port=args.port, name=name, shutdown_timeout=args.shutdown_timeout, slots=args.slots,
        max_prompts=args.max_prompts, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
        readers=args.readers)


def _source_args(p, routing: bool = True) -> None:
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument('--bundle', help='a bundle written by hmem export (a local path, gs:// or s3://)')
  g.add_argument('--workdir', help='a run directory (hmem train --workdir)')
  p.add_argument('--step', type=int, default=None, help='with --workdir: checkpoint step (default: the latest)')
  if routing:
    p.add_argument('--block', nargs='+', default=[], metavar='LEVEL:ID', help='route around these nodes')
    p.add_argument('--block-best', action='store_true', help="route each text around its own level-1 subtree")
    command.progress_flag(p)
  else:
    p.set_defaults(block=[])


def _live_harness(cfg, mesh):
  """`train.harness`'s hook (hmem.infer.live), imported only when a run turns it on (it
  brings lm-eval and the router's scikit-learn: seconds of every `hmem train` start)."""
  if not (cfg.train.harness.every or cfg.train.harness.tasks):
    return None
  from hmem.infer.live import Harness
  return Harness.create(cfg, mesh)


def register(sub) -> None:
  hooks.register('harness', _live_harness)  # `hmem train` runs lm-eval on the live state (train.harness)
  p = command.add(sub, 'generate', _generate, 'continue a prompt with its routed memory', config=False)
  _source_args(p)
  p.add_argument('--prompt', required=True, help='the text to continue')
  p.add_argument('--memory', choices=('fetched', 'generic', 'none'), default='fetched', help='which memory to use')
  p.add_argument('--max-new-tokens', type=int, default=64)
  p.add_argument('--temperature', type=float, default=0.0, help='0: greedy')
  p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling mass')
  p.add_argument('--seed', type=int, default=0)
  p = command.add(sub, 'eval', _eval, 'per memory mode: perplexity and accuracy of a JSONL file, or lm-eval tasks',
                  config=False)
  _source_args(p)
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument('--data', help='JSONL of {"text"} and {"prompt", "candidates", "answer"} records')
  what.add_argument('--tasks', help='comma-separated lm-eval task names or task YAML files: the harness under each '
                    'mode, printed as tasks x modes (hmem\'s offline tasks: hmem_knowledge, hmem_wiki_heldout)')
  p.add_argument('--modes', default='', help='with --tasks: comma-separated, among fetched,generic,none,blocked '
                 '(default: every mode the run has; blocked routes around --block, else --block-best)')
  p.add_argument('--include-path', action='append', default=[], metavar='DIR',
                 help='with --tasks: a directory of task YAML to search too (repeatable)')
  p.add_argument('--limit', type=int, default=None, help='with --tasks: at most this many documents per task')
  p.add_argument('--csv', default='', metavar='FILE.csv', help='with --tasks: also write one row per table cell')
  p.add_argument('--windows', choices=('training', 'lm-eval'), default=None,
                 help="with --data: the perplexity's convention: training's (default: each text and its EOT, "
                 "as packed) or lm-evaluation-harness's rolling windows")
  p.add_argument('--batch-size', type=int, default=16, help='sequences scored at once')
  p.add_argument('--json', action='store_true', help='print only the JSON summary (no table)')
  p.add_argument('--plot', default='', metavar='FILE.png', help='with --data: also draw the results as a bar chart')
  p = command.add(sub, 'serve', _serve, 'an OpenAI-compatible completions server (continuous batching)',
                  config=False)
  _source_args(p, routing=False)
  p.add_argument('--host', default='127.0.0.1', help='address to listen on (0.0.0.0: every interface)')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--slots', type=int, default=16, help='sequences decoded together (the most a decode step holds)')
  p.add_argument('--name', default='', help='the model id clients ask for (default: the bundle or run directory '
                 'name; NAME:generic and NAME:none select those memory modes)')
  p.add_argument('--max-prompts', type=int, default=64, help='prompts in one request (more: 400)')
  p.add_argument('--max-queue', type=int, default=256, help='prompts waiting for a slot (more: 429, Retry-After)')
  p.add_argument('--max-body-bytes', type=int, default=4 << 20, help='request body size (more: 413)')
  p.add_argument('--readers', type=int, default=4, help="threads reading queued requests' memory rows")
  p.add_argument('--shutdown-timeout', type=float, default=30.0,
                 help='on SIGTERM, seconds the requests in flight get to finish before they are ended')
