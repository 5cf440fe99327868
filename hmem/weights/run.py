"""`hmem import`: outside Llama-family weights -> an anchor run directory.

RUN/
  checkpoints/0/   an orbax checkpoint with the `params` item (as `hmem train` writes it),
                   so `train.init_from=RUN` starts a memory run from these weights
  config.py        `get_config()` reproducing the architecture (pass it as --config); it
                   points data.tokenizer and train.init_from at RUN
  config.json      the same config resolved, as `hmem train` writes it
  tokenizer.json   the model's tokenizer (GGUF: converted from the embedded one), set to
                   put the checkpoint's BOS before every text when its metadata says so
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from hmem.config import default_config
from hmem.data.source import Position
from hmem.data.tokenizer import Tokenizer, set_bos
from hmem.errors import WeightsError
from hmem.files import as_path, atomic_write, copy, is_remote
from hmem.model.transformer import dtype_of
from hmem.train.checkpoint import Checkpoints
from hmem.train.state import TrainState
from hmem.weights import gguf_file, hf

DTYPES = ('float32', 'bfloat16')

_CONFIG_PY = '''"""Written by `hmem import` from {source}: that checkpoint's architecture.

Pass it as --config; data.tokenizer and train.init_from point at this directory.
"""

import os

from hmem.config import default_config

HERE = {here}


def get_config():
  c = default_config()
  c.model.update({model})
  c.model.rope_scaling.update({rope_scaling})
  c.data.tokenizer = os.path.join(HERE, 'tokenizer.json')
  c.train.init_from = HERE
  return c
'''


def import_checkpoint(source: str, out: str, dtype: str = 'float32', tokenizer: str | None = None,
                      layers: int | None = None, progress: bool = True) -> dict:
  """Converts `source` (a GGUF file or a Hugging Face directory) into the run directory `out`;
  `tokenizer` (a tokenizer.json) replaces the checkpoint's own; `layers` keeps only the
  first layers (for tests). Returns a summary."""
  if dtype not in DTYPES:
    raise WeightsError(f'--dtype {dtype!r}; choose one of {DTYPES}')
  run = as_path(out)  # any filesystem; the inputs below are local files
  if (run / 'checkpoints').is_dir() and any((run / 'checkpoints').iterdir()):
    raise WeightsError(f'{out} already holds checkpoints; import into a new directory')
  if tokenizer and not os.path.isfile(tokenizer):
    raise WeightsError(f'--tokenizer {tokenizer!r} not found; pass a tokenizer.json')
  np_dtype = dtype_of(dtype)
  if gguf_file.is_gguf(source):
    f = gguf_file.GGUFFile(source)
    f.hf_config()  # every unsupported field stops here, before the tokenizer or any tensor
    embedded = None if tokenizer else f.tokenizer()
    stated, bos = f.bos()
    model, params = f.load(np_dtype, progress, layers)
  elif hf.is_hf_dir(source):
    stated, bos = hf.bos(source)
    model, params, found = hf.load(source, np_dtype, progress, layers)
    tokenizer, embedded = tokenizer or found, None
  else:
    raise WeightsError(f'--from {source!r} is neither a GGUF file nor a directory with config.json '
                       '(a Hugging Face checkpoint)')

  cfg = default_config()
  rope_scaling = model.pop('rope_scaling')
  cfg.model.update(model, dtype=dtype, param_dtype=dtype)
  cfg.model.rope_scaling.update(rope_scaling)
  run.mkdir(parents=True, exist_ok=True)
  tokenizer_path = run / 'tokenizer.json'
  if embedded is not None:
    tokenizer_path.write_text(embedded.to_str(pretty=True))
  elif tokenizer:
    copy(tokenizer, tokenizer_path)
  has_tokenizer = tokenizer_path.is_file()
  if stated and has_tokenizer:  # the checkpoint's BOS policy, kept in the tokenizer file
    set_bos(tokenizer_path, bos)
  bos_id = Tokenizer.load(tokenizer_path).bos_id if has_tokenizer else None
  cfg.data.tokenizer = str(tokenizer_path) if has_tokenizer else ''
  cfg.train.init_from = str(run)

  state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.asarray, params),
                     opt_state={}, bank={}, bank_opt={})
  meta = {'config': json.loads(cfg.to_json_best_effort()), 'imported_from': os.path.abspath(source)}
  ckpt = Checkpoints(run / 'checkpoints', async_save=False)
  ckpt.save(state, Position(), meta)
  ckpt.close()

  # A config file is loaded from local disk: one kept on an object store is copied out first,
  # so there it names the run by its URL instead of by its own location.
  here = f'{str(run)!r}' if is_remote(run) else 'os.path.dirname(os.path.abspath(__file__))'
  with atomic_write(run / 'config.py') as f:
    f.write(_CONFIG_PY.format(source=os.path.basename(os.path.abspath(source)), here=here,
                              model=_literal(cfg.model), rope_scaling=dict(cfg.model.rope_scaling)))
  with atomic_write(run / 'config.json') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  return {'run': str(run), 'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
          'dtype': dtype, 'tokenizer': cfg.data.tokenizer or None, 'bos_id': bos_id,
          **{k: cfg.model[k] for k in ('layers', 'd_model', 'heads', 'kv_heads', 'vocab_size')}}


def _literal(model) -> dict:
  """The architecture keys of `cfg.model` as a dict literal (rope_scaling goes separately)."""
  keys = ('vocab_size', 'd_model', 'layers', 'heads', 'kv_heads', 'head_dim', 'ffn', 'norm', 'norm_eps', 'qk_norm',
          'qkv_bias', 'rope_base', 'tie_embeddings', 'dtype', 'param_dtype')
  return {k: model[k] for k in keys}
