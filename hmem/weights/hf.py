"""Hugging Face checkpoints: a directory with config.json and *.safetensors (one file or
sharded with model.safetensors.index.json). An import reads a local directory, tensors
lazily, one at a time; an export writes to any filesystem (a local path, gs://, s3://)."""

from __future__ import annotations

import contextlib
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from hmem.data.tokenizer import Tokenizer
from hmem.errors import WeightsError
from hmem.files import as_path, copy, is_remote
from hmem.weights import llama

INDEX = 'model.safetensors.index.json'


def is_hf_dir(path: str) -> bool:
  """Whether `path` is a local directory holding config.json. The tensors are read lazily
  from local files: a checkpoint on an object store is refused, naming the fix."""
  if is_remote(path):
    raise WeightsError(f'{path}: `hmem import` reads a checkpoint from a local directory; copy it down first '
                       '(e.g. gcloud storage cp -r) or mount the bucket with gcsfuse and pass the mount path')
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json'))


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f'{path} is unreadable ({e}); is this a Hugging Face checkpoint directory?') from None


def _tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file."""
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise WeightsError(f'{index} has no weight_map; the sharded checkpoint is incomplete')
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not files:
    raise WeightsError(f'{path} holds no *.safetensors file; convert PyTorch .bin weights to safetensors first')
  out = {}
  for file in files:
    with _open(file) as f:
      out.update(dict.fromkeys(f.keys(), file))
  return out


def _open(file: str):
  if not os.path.isfile(file):
    raise WeightsError(f'safetensors file {file} (named in {INDEX}) is missing; download the whole checkpoint')
  try:
    return safe_open(file, framework='np')
  except (SafetensorError, OSError) as e:
    raise WeightsError(f'{file} is not a readable safetensors file ({e})') from None


def load(path: str, dtype, progress: bool = True, layers: int | None = None) -> tuple[dict, dict, str | None]:
  """(cfg.model keys, anchor parameters of `dtype`, the tokenizer.json beside them or None),
  of the first `layers` layers if given."""
  hf = _read_json(os.path.join(path, 'config.json'))
  files = _tensor_files(path)
  model, names = llama.first_layers(llama.model_config(hf, os.path.join(path, 'config.json')), set(files), layers,
                                    path)
  with contextlib.ExitStack() as stack:
    handles: dict[str, object] = {}

    def read(name: str) -> np.ndarray:
      file = files[name]
      if file not in handles:
        handles[file] = stack.enter_context(_open(file))
      return handles[file].get_tensor(name)

    params = llama.to_params(model, names, read, dtype, path, progress)
  tokenizer = os.path.join(path, 'tokenizer.json')
  return model, params, tokenizer if os.path.isfile(tokenizer) else None


def bos(path: str) -> tuple[bool, str | None]:
  """(whether the checkpoint states its BOS policy, the token put before every text or
  None): `add_bos_token` and `bos_token` of tokenizer_config.json (transformers' slow and
  Llama/Mistral fast tokenizers). Without them the tokenizer.json's own post-processor is
  the policy, as transformers' fast tokenizers apply it (Llama 3's adds <|begin_of_text|>)."""
  file = os.path.join(path, 'tokenizer_config.json')
  config = _read_json(file) if os.path.isfile(file) else {}
  if 'add_bos_token' not in config:
    return False, None
  if not config['add_bos_token']:
    return True, None
  token = config.get('bos_token')
  token = token.get('content') if isinstance(token, dict) else token  # an AddedToken's fields
  if not isinstance(token, str):
    raise WeightsError(f'{file}: add_bos_token is true but bos_token={token!r} names no token; set bos_token')
  return True, token


def export_hf(model: dict, params: dict, out_dir: str | os.PathLike, tokenizer: str | None = None,
              max_positions: int | None = None, max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes the anchor as a Hugging Face checkpoint (config.json, safetensors shards with an
  index when there is more than one) to a directory on any filesystem; returns the files
  written. `model` is `cfg.model` as a dict; tensors keep their dtype. With a `tokenizer`
  (a tokenizer.json) also its files and generation_config.json, and config.json names the
  BOS and EOS ids, so generation stops at the EOT; `max_positions` (the context the model
  ran at) becomes max_position_embeddings. config.json is written last, so a directory cut
  short is no checkpoint."""
  out_dir = as_path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tensors = llama.from_params(model, params)
  config = {**llama.hf_config(model), 'torch_dtype': str(tensors['model.embed_tokens.weight'].dtype)}
  if max_positions:
    config['max_position_embeddings'] = int(max_positions)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  for name, shard in zip(names, shards):
    # Serialized in memory and written as one file (or object): no local file needed.
    (out_dir / name).write_bytes(safetensors.numpy.save(shard, metadata={'format': 'pt'}))
  written = list(names)
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(x.nbytes for x in tensors.values())},
             'weight_map': {t: n for n, shard in zip(names, shards) for t in shard}}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    written.append(INDEX)
  if tokenizer:
    copy(tokenizer, out_dir / 'tokenizer.json')
    written.append('tokenizer.json')
    files = _tokenizer_metadata(Tokenizer.load(tokenizer), max_positions)
    for name, content in files.items():
      (out_dir / name).write_text(json.dumps(content, indent=2))
    written += list(files)
    config.update(files['generation_config.json'])
  (out_dir / 'config.json').write_text(json.dumps(config, indent=2))
  written.append('config.json')
  return written


def _tokenizer_metadata(tokenizer: Tokenizer, max_positions: int | None) -> dict[str, dict]:
  """What transformers reads beside tokenizer.json: the special tokens (the BOS only when the
  model takes one; the EOT is the EOS, which ends generation)."""
  bos = None if tokenizer.bos_id is None else tokenizer.token(tokenizer.bos_id)
  special = {**({'bos_token': bos} if bos else {}), 'eos_token': tokenizer.token(tokenizer.eot_id)}
  limit = {'model_max_length': int(max_positions)} if max_positions else {}
  return {
      'tokenizer_config.json': {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_bos_token': bos is not None,
                                'add_eos_token': False, **special, **limit, 'clean_up_tokenization_spaces': False},
      'special_tokens_map.json': special,
      'generation_config.json': {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eot_id,
                                 'pad_token_id': tokenizer.eot_id},
  }


def export_run(workdir: str, out_dir: str, step: int | None = None, dtype: str | None = None) -> list[str]:
  """`export_hf` of a run's anchor (latest checkpoint, or `step`) cast to `dtype` (None: as
  stored), with the tokenizer it trained with (data.tokenizer, else the prepared dataset's)."""
  from hmem.train.params import restore_params
  if dtype not in (None, 'bfloat16', 'float32'):
    raise WeightsError(f'--dtype {dtype!r} for --format hf; choose bfloat16 or float32 (int8 is for bundles)')
  cfg, _, params, _, _ = restore_params(workdir, step)  # the anchor alone: the bank is never read
  candidates = [cfg.data.tokenizer, str(as_path(cfg.data.path) / 'tokenizer.json') if cfg.data.path else '']
  tokenizer = next((path for path in candidates if path and as_path(path).is_file()), None)
  cast = (lambda x: np.asarray(x)) if dtype is None else (lambda x: np.asarray(x).astype(jnp.dtype(dtype)))
  return export_hf(cfg.model.to_dict(), jax.tree.map(cast, params), out_dir, tokenizer, cfg.data.seq_len)
