"""Opening a bundle: the format version and every checksum checked before any other work,
then the config, the anchor parameters on one device, the router and a Reader of the bank
rows (read as paths need them). hmem.infer.source wraps the parts into a MemorySource.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import safetensors
from etils import epath
from flax import nnx, traverse_util
from safetensors import SafetensorError

from hmem.bundle.format import ANCHOR, MANIFEST, present_rows, read_manifest, verify
from hmem.bundle.reader import Reader
from hmem.config import config_from_json
from hmem.data.router import Router
from hmem.data.tokenizer import Tokenizer
from hmem.errors import BundleError, ConfigError
from hmem.files import as_path
from hmem.memory import bank as memory_bank
from hmem.memory import config as memory_config
from hmem.train.params import abstract_params

_SAFETENSORS_DTYPES = {'BF16': np.dtype(jax.numpy.bfloat16), 'F32': np.dtype(np.float32)}  # anchor dtypes


@dataclasses.dataclass(frozen=True)
class Bundle:
  """An opened bundle. rows: a Reader of its bank rows (None for a run without memory)."""
  root: str
  manifest: dict
  config: object
  graphdef: nnx.GraphDef
  params: dict
  router: Router
  rows: Reader | None
  step: int


def check_router(router: Router, cfg, where: str) -> None:
  """The router's tree and tokenizer must be the ones the model was trained with."""
  m = cfg.memory
  if memory_config.enabled(cfg) and (router.k, router.depth) != (m.k, m.depth):
    raise BundleError(f'{where}: its tree has k={router.k}, depth={router.depth} but the run was trained with '
                      f'memory.k={m.k}, memory.depth={m.depth}; route with the tree the run was trained on')
  check_tokenizer(router.tokenizer, cfg, where)


def check_tokenizer(tokenizer: Tokenizer, cfg, where: str) -> None:
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise BundleError(f'{where}: its tokenizer has {tokenizer.vocab_size} tokens but the model embeds '
                      f'{cfg.model.vocab_size}: it is not the tokenizer the run was trained with')


def _load_params(root: epath.Path, cfg, dtype: str):
  path = root / ANCHOR
  try:
    tensors = safetensors.deserialize(path.read_bytes())  # parsed from memory: the file may be an object
  except (SafetensorError, OSError) as e:
    raise BundleError(f'{path} cannot be read ({e}); export the bundle again') from None
  flat = {}
  for name, t in tensors:  # safetensors.numpy.load knows no bfloat16
    if t['dtype'] not in _SAFETENSORS_DTYPES:
      raise BundleError(f'{path}: {name} is {t["dtype"]}, not BF16 or F32; export the bundle again')
    flat[name] = np.frombuffer(t['data'], _SAFETENSORS_DTYPES[t['dtype']]).reshape(t['shape'])
  graphdef, abstract = abstract_params(cfg)
  expected = traverse_util.flatten_dict(abstract, sep='/')
  if set(flat) != set(expected):
    diff = sorted(set(flat) ^ set(expected))
    raise BundleError(f'{path}: parameters {diff[:3]} differ from the model of the run config; export again')
  for name, a in flat.items():
    if a.shape != expected[name].shape or a.dtype != np.dtype(jax.numpy.dtype(dtype)):
      raise BundleError(f'{path}: {name} is {a.dtype}{list(a.shape)}, expected {dtype}{list(expected[name].shape)}')
  device = jax.devices()[0]
  return graphdef, traverse_util.unflatten_dict({tuple(n.split('/')): jax.device_put(a, device)
                                                 for n, a in flat.items()})


def open_bundle(root: str | os.PathLike, *, check: bool = True, cache_bytes: int = 256 << 20) -> Bundle:
  """A bundle's parts, opened; `check` verifies every file's checksum first."""
  root = as_path(root)
  manifest = read_manifest(root)
  if check:
    verify(root, manifest)
  try:
    cfg = config_from_json(manifest['config'])
  except ConfigError as e:
    raise BundleError(f'{root / MANIFEST}: {e}') from None
  k, subtrees = manifest['k'], manifest['subtrees']
  router = Router.load(root, present=subtrees if len(subtrees) < k else None)
  check_router(router, cfg, str(root))
  graphdef, params = _load_params(root, cfg, manifest.get('anchor_dtype', manifest['dtype']))
  arrays, scales, present = {}, {}, {}
  for key, meta in manifest['bank'].items():
    table, name = key.split('/')
    arrays.setdefault(table, {})[name] = meta['path']
    if 'scale' in meta:
      scales.setdefault(table, {})[name] = meta['scale']['path']
    present[table] = present_rows(k, manifest['depth'], table, meta['shape'][0], subtrees)
  expected = {f'{t}/{name}': list(shape) for t, named in memory_bank.bank_shapes(cfg).items()
              for name, shape in named.items()}
  if {key: meta['shape'] for key, meta in manifest['bank'].items()} != expected:
    raise BundleError(f'bundle {root}: its bank arrays {sorted(manifest["bank"])} do not match the run config')
  reader = Reader(str(root), arrays, present, cache_bytes, scales=scales) if arrays else None
  return Bundle(str(root), manifest, cfg, graphdef, params, router, reader, manifest['step'])
