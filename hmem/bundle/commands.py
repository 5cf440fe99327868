"""`hmem export` (a run -> an inference bundle, or the anchor as a Hugging Face checkpoint)
and `hmem bank` (edit a bundle's bank)."""

from __future__ import annotations

import json

from hmem import command


def _export(args, cfg):
  if args.format == 'hf':
    if args.subtree is not None:
      from hmem.errors import ConfigError
      raise ConfigError('--subtree picks bank rows, and --format hf exports the anchor alone (no bank); drop '
                        '--subtree, or export a bundle (--format bundle) to ship subtrees')
    from hmem.weights import export_run
    written = export_run(args.workdir, args.out, step=args.step, dtype=args.dtype)
    print(json.dumps({'out': args.out, 'format': 'hf', 'files': written}))
    return
  from hmem.bundle.export import export
  command.init_distributed(args)
  m = export(args.workdir, args.out, step=args.step, dtype=args.dtype, subtrees=args.subtree,
             buffer_mb=args.buffer_mb, progress=not args.no_progress)
  import jax
  if jax.process_index():
    return
  print(json.dumps({'out': args.out, 'step': m['step'], 'dtype': m['dtype'], 'subtrees': m['subtrees'], **m['sizes']}))


def _bank(args, cfg):
  from hmem.bundle import edit
  from hmem.bundle.format import read_manifest
  from hmem.data.router import parse_node
  from hmem.errors import ConfigError
  if args.action == 'replace' and not args.source:
    raise ConfigError('hmem bank replace needs --from OTHER_BUNDLE (a bundle of the same run shapes)')
  m = read_manifest(args.bundle)
  nodes = [parse_node(n, m['k'], m['depth']) for n in args.node]
  m = edit.drop(args.bundle, nodes) if args.action == 'drop' else edit.replace(args.bundle, args.source, nodes)
  print(json.dumps(m['edits'][-1]))


def register(sub) -> None:
  p = command.add(sub, 'export', _export, 'write an inference bundle from a run directory', config=False)
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
  command.progress_flag(p)
  command.distributed_args(p)
  p = command.add(sub, 'bank', _bank, "edit a bundle's bank: drop or replace the rows of subtrees (atomic)",
                  config=False)
  p.add_argument('action', choices=('drop', 'replace'), help='drop: zero the rows; replace: copy them from --from')
  p.add_argument('--bundle', required=True, help='the bundle to edit')
  p.add_argument('--node', required=True, nargs='+', help="LEVEL:ID nodes; each names its subtree's rows")
  p.add_argument('--from', dest='source', help='replace: the bundle to copy the rows from')
