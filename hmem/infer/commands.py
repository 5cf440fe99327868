"""`hmem generate`, `hmem eval` and `hmem serve`: a run or bundle put to use."""

from __future__ import annotations

import json
import os

from hmem import command


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
  from hmem.infer import evaluate
  source, block = _open(args)
  result = evaluate.evaluate(source, args.data, block=block, block_best=args.block_best,
                             progress=not args.no_progress)
  if not args.json:
    print(evaluate.table(result))
  if args.plot:
    evaluate.plot(result, args.plot)
  print(json.dumps(result))


def _serve(args, cfg):
  from hmem.errors import UserError
  try:
    from hmem.infer.server import serve
  except ImportError as e:
    raise UserError(f'hmem serve needs the serve extra ({e}); install it with pip install "hmem[serve]"') from None
  source, _ = _open(args)
  name = args.name or os.path.basename(str(args.bundle or args.workdir).rstrip('/'))
  serve(source, host=args.host, port=args.port, name=name, slots=args.slots)


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


def register(sub) -> None:
  p = command.add(sub, 'generate', _generate, 'continue a prompt with its routed memory', config=False)
  _source_args(p)
  p.add_argument('--prompt', required=True, help='the text to continue')
  p.add_argument('--memory', choices=('fetched', 'generic', 'none'), default='fetched', help='which memory to use')
  p.add_argument('--max-new-tokens', type=int, default=64)
  p.add_argument('--temperature', type=float, default=0.0, help='0: greedy')
  p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling mass')
  p.add_argument('--seed', type=int, default=0)
  p = command.add(sub, 'eval', _eval, 'perplexity and accuracy of a JSONL file per memory mode', config=False)
  _source_args(p)
  p.add_argument('--data', required=True, help='JSONL of {"text"} and {"prompt", "candidates", "answer"} records')
  p.add_argument('--json', action='store_true', help='print only the JSON summary (no table)')
  p.add_argument('--plot', default='', metavar='FILE.png', help='also draw the results as a bar chart')
  p = command.add(sub, 'serve', _serve, 'an OpenAI-compatible completions server (continuous batching)',
                  config=False)
  _source_args(p, routing=False)
  p.add_argument('--host', default='127.0.0.1', help='address to listen on (0.0.0.0: every interface)')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--slots', type=int, default=16, help='sequences decoded together (the batch of the decode step)')
  p.add_argument('--name', default='', help='the model id clients ask for (default: the bundle or run directory name)')
