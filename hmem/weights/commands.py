"""`hmem import`: Llama-family weights (GGUF, Hugging Face) -> an anchor run directory."""

from __future__ import annotations

import json

from hmem import command


def _import(args, cfg):
  from hmem.weights import import_checkpoint
  print(json.dumps(import_checkpoint(args.source, args.out, args.dtype, args.tokenizer, args.layers,
                                     progress=not args.no_progress)))


def register(sub) -> None:
  p = command.add(sub, 'import', _import, 'convert Llama-family weights (GGUF, Hugging Face) into an anchor run',
                  config=False)
  p.add_argument('--from', dest='source', required=True, help='a .gguf file or a Hugging Face checkpoint directory')
  p.add_argument('--out', required=True, help='new run directory (checkpoint, config.py, tokenizer.json)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='parameter and compute dtype')
  p.add_argument('--tokenizer', default=None, help="a tokenizer.json to use instead of the checkpoint's")
  p.add_argument('--layers', type=int, default=None, help='import only the first N layers (tests, quick looks)')
  command.progress_flag(p)
