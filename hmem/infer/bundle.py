"""Inference bundles: everything a trained model needs at inference, in one directory.

`export` writes, from a run's checkpoint (docs/BUNDLE.md has the layout):

  manifest.json       format and version, the run's config, sizes, tree shape, dtype, the
                      level-1 subtrees present, a sha256 per file, per bank array its metadata
  anchor.safetensors  the anchor parameters, named by their paths ('blocks/attn/q/kernel')
  tokenizer.json, embedder.json (+ the embedder's files), tree.npz   the router's files
  bank/{table}/{name}.v{N}/   one zarr v3 array per table and named array, one chunk per
                      row (tree node), each chunk checksummed (crc32c); an int8 bundle adds
                      bank/{table}/{name}.scale/ (float32, a scale per row, layer and unit)

Nothing in a bundle executes on load: JSON, safetensors, zarr chunks and
np.load(allow_pickle=False). A partial bundle (`subtrees`) holds every level-1 row, the
generic block and the anchor, and the deeper rows of the given level-1 subtrees only.
A bundle lives on any filesystem epath and tensorstore reach (a local directory, gs://,
s3://). Export writes a local bundle to a temporary directory renamed into place at the
end; an object store has no rename, so there the manifest, written last, marks the bundle
complete (one without a manifest is refused). `open_bundle` checks the format version and
every checksum before any other work, then serves rows through a Reader.

The bank is streamed from the checkpoint in row ranges (never restored whole): host memory
for it stays within `buffer_mb` whatever its size (docs/BUNDLE.md).
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import numpy as np
import safetensors
import safetensors.numpy
import tensorstore as ts
from etils import epath
from flax import nnx, traverse_util
from safetensors import SafetensorError
from tqdm import tqdm

from hmem import sizes
from hmem.config import config_from_json
from hmem.data.embed import CONFIG_FILE, write_config
from hmem.errors import BundleError, ConfigError
from hmem.files import as_path, atomic_path, atomic_write, copy, sha256
from hmem.infer.reader import Reader, kvstore
from hmem.infer.router import TOKENIZER, TREE, Router, check_node
from hmem.infer.source import MemorySource, abstract_params, check_router, restore_params
from hmem.infer.stored import ROW_COPIES, StoredBank
from hmem.memory import bank as memory_bank

FORMAT, VERSION = 'hmem-bundle', 1
MANIFEST, ANCHOR = 'manifest.json', 'anchor.safetensors'
DTYPES = ('bfloat16', 'float32', 'int8')
ANCHOR_DTYPE = {'int8': 'bfloat16'}  # the anchor's dtype in a bundle of a quantized bank (else the bank's)
_SAFETENSORS_DTYPES = {'BF16': np.dtype(jax.numpy.bfloat16), 'F32': np.dtype(np.float32)}  # anchor dtypes
_SLAB_BYTES = 64 << 20  # rows written per tensorstore call (and progress-bar step)


def array_path(table: str, name: str, version: int = 0) -> str:
  return f'bank/{table}/{name}.v{version}'


def scale_path(table: str, name: str) -> str:
  """An int8 array's scales (never edited: `hmem bank` refuses int8 bundles)."""
  return f'bank/{table}/{name}.scale'


def present_rows(k: int, depth: int, table: str, rows: int, subtrees: list[int]) -> np.ndarray:
  """bool [rows]: the rows of `table` a bundle with these level-1 subtrees holds."""
  if table == 'generic' or table == 'level1':
    return np.ones(rows, bool)
  level = int(table.removeprefix('level'))
  return np.isin(np.arange(rows) // k**(level - 1), subtrees)


def create_array(root: str | os.PathLike, path: str, shape, dtype: str):
  """An empty zarr v3 array chunked one row per chunk, chunks checksummed; zero rows are
  stored too (a missing chunk is an error when read, never zeros)."""
  spec = {
      'driver': 'zarr3', 'kvstore': kvstore(str(root), path),
      'metadata': {
          'shape': list(shape), 'data_type': dtype, 'fill_value': 0,
          'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': [1, *shape[1:]]}},
          'chunk_key_encoding': {'name': 'default'},
          'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}, {'name': 'crc32c'}],
      },
      'store_data_equal_to_fill_value': True,
  }
  return ts.open(spec, create=True).result()


def open_array(root: str | os.PathLike, path: str):
  return ts.open({'driver': 'zarr3', 'kvstore': kvstore(str(root), path), 'fill_missing_data_reads': False,
                  'store_data_equal_to_fill_value': True}, read=True, write=True).result()


def write_rows(array, lo: int, rows_RxS: np.ndarray, bar=None) -> None:
  """Writes rows [lo, lo + R) in slabs of about _SLAB_BYTES."""
  per_slab = max(1, _SLAB_BYTES // max(1, rows_RxS[0].nbytes))
  for start in range(0, rows_RxS.shape[0], per_slab):
    slab = rows_RxS[start:start + per_slab]
    array[lo + start:lo + start + slab.shape[0]].write(slab).result()
    if bar is not None:
      bar.update(slab.nbytes)


def true_runs(mask_R: np.ndarray) -> list[tuple[int, int]]:
  """[lo, hi) runs of True in a bool mask."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask_R.astype(np.int8), [0]])))
  return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def write_json(path: str | os.PathLike, obj) -> None:
  with atomic_write(path) as f:
    json.dump(obj, f, indent=1)
    f.write('\n')


def _files(directory: epath.Path, rel: str = ''):
  """Paths under `directory` of every file, relative to it, but the bank's chunks (the
  bank's `c/` directories: they carry crc32c, and an object store lists them slowly)."""
  for child in directory.iterdir():
    path = f'{rel}{child.name}'
    if child.is_dir():
      if not (path.startswith('bank/') and child.name == 'c'):
        yield from _files(child, path + '/')
    else:
      yield path


def file_checksums(root: str | os.PathLike) -> dict[str, str]:
  """sha256 of every file but the manifest and the bank chunks (those carry crc32c)."""
  root = as_path(root)
  return {path: sha256(root / path) for path in sorted(_files(root)) if path != MANIFEST}


def _save_router(router: Router, out: epath.Path, data_path: str) -> None:
  data_path = as_path(data_path)
  copy(data_path / TOKENIZER, out / TOKENIZER)
  copy(data_path / TREE, out / TREE)
  embedder = router.embedder
  embedder.save(str(out))
  if embedder.kind == 'minilm':  # ship the weights, found relative to the bundle
    (out / 'minilm').mkdir()
    for name in ('model.safetensors', 'tokenizer.json', 'config.json'):
      copy(as_path(embedder.directory) / name, out / 'minilm' / name)
    write_config(str(out), {**json.loads((out / CONFIG_FILE).read_text()), 'path': 'minilm'})


def quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """fp32 rows [R, layers_m, width, features] -> (int8 rows, float32 scales [R, layers_m, width, 1]):
  symmetric, one scale per row, layer and unit (the unit's feature vector: the output
  feature of gate/up, LoRA A and KV keys), so one large unit does not coarsen the others."""
  scale = np.abs(rows).max(axis=-1, keepdims=True) / 127
  q = np.divide(rows, scale, out=np.zeros_like(rows), where=scale > 0)
  return np.rint(q).astype(np.int8), scale.astype(np.float32)


def row_ranges(lo: int, hi: int, per_range: int) -> list[tuple[int, int]]:
  return [(start, min(start + per_range, hi)) for start in range(lo, hi, per_range)]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = 'bfloat16',
           subtrees: list[int] | None = None, buffer_mb: float = 1024, progress: bool = True) -> dict:
  """Writes the bundle of a run's checkpoint (latest, or `step`) to `out`; returns its manifest.

  The bank is streamed: read from the checkpoint in row ranges (hmem.infer.stored), caught
  up to the checkpoint's step, cast and written, one range at a time; a range holds at most
  `buffer_mb` MB of bank data however large the bank. On several processes (jax.distributed)
  each writes every process_count-th range and process 0 writes the rest and, last, the
  manifest; the bundle is then written in place (the manifest marks it complete)."""
  if dtype not in DTYPES:
    raise BundleError(f'--dtype {dtype!r}; choose one of {", ".join(DTYPES)}')
  if not buffer_mb > 0:
    raise BundleError(f'--buffer-mb {buffer_mb}: give a positive size in MB')
  out = as_path(out)
  if out.exists():
    raise BundleError(f'{out} already exists; remove it or choose another --out')
  kvstore(str(out), 'bank')  # the bank is written through tensorstore: fail here if it cannot reach `out`
  cfg, _, params, step, step_dir = restore_params(workdir, step)
  if cfg.data.source != 'prepared':
    raise BundleError(f'{workdir} was trained on synthetic data: a bundle needs the tokenizer and tree of a '
                      'prepared dataset (hmem prepare, data.source=prepared)')
  router = Router.load(cfg.data.path)
  check_router(router, cfg, cfg.data.path)
  k, depth = cfg.memory.k, cfg.memory.depth
  subtrees = sorted({int(s) for s in subtrees}) if subtrees else list(range(k))
  for s in subtrees:
    check_node(1, s, k, depth)
  tables = memory_bank.tables(cfg)
  stored = StoredBank(cfg, step_dir, step) if tables else None
  anchor_dtype = ANCHOR_DTYPE.get(dtype, dtype)
  out_itemsize = 2 if dtype == 'int8' else np.dtype(jax.numpy.dtype(dtype)).itemsize  # a cast copy (int8: + fp32 work)
  ranges = []  # (table, lo, hi): every range of present rows, each within the buffer
  for table, (rows, _) in tables.items():
    row_cost = stored.row_bytes(table) * (ROW_COPIES + out_itemsize / 4)
    per_range = int(buffer_mb * 2**20 // row_cost)
    if per_range < 1:
      raise BundleError(f'--buffer-mb {buffer_mb} holds no row of bank table {table} (one row needs '
                        f'{row_cost / 2**20:.1f} MB while it is caught up and cast); raise --buffer-mb')
    for lo, hi in true_runs(present_rows(k, depth, table, rows, subtrees)):
      ranges += [(table, a, b) for a, b in row_ranges(lo, hi, per_range)]
  mine = ranges[jax.process_index()::jax.process_count()]

  # Local, one process: the bundle appears whole (a renamed directory) or not at all. Object
  # store or several processes: written in place, and the manifest, written last, is what
  # makes the files present a bundle.
  with (atomic_path(out) if jax.process_count() == 1 else contextlib.nullcontext(out)) as tmp:
    arrays, meta = {}, {}
    for table, named in (stored.shapes if stored else {}).items():
      for name, shape in named.items():
        arrays[table, name] = (array_path(table, name), *((scale_path(table, name),) if dtype == 'int8' else ()))
        meta[f'{table}/{name}'] = {
            'path': arrays[table, name][0], 'shape': list(shape), 'dtype': dtype, 'chunk_shape': [1, *shape[1:]],
            'codecs': ['bytes', 'crc32c'], 'rows_present': int(present_rows(k, depth, table, shape[0], subtrees).sum()),
            **({'scale': {'path': arrays[table, name][1], 'shape': [*shape[:-1], 1], 'dtype': 'float32'}}
               if dtype == 'int8' else {})}
    if jax.process_index() == 0:
      tmp.mkdir(parents=True)
      np_dtype = np.dtype(jax.numpy.dtype(anchor_dtype))
      flat = traverse_util.flatten_dict(jax.tree.map(lambda a: np.asarray(a).astype(np_dtype), params), sep='/')
      (tmp / ANCHOR).write_bytes(safetensors.numpy.save(flat, metadata={'format': FORMAT}))
      _save_router(router, tmp, cfg.data.path)
      for key, m in meta.items():
        create_array(tmp, m['path'], m['shape'], dtype)
        if 'scale' in m:
          create_array(tmp, m['scale']['path'], m['scale']['shape'], 'float32')
    _sync('hmem-export-created')
    opened = {key: tuple(open_array(tmp, path) for path in paths) for key, paths in arrays.items()}
    total = sum(stored.row_bytes(t) * (b - a) for t, a, b in mine)
    with tqdm(total=total, unit='B', unit_scale=True, desc='export bank', disable=not progress) as bar:
      for table, lo, hi in mine:
        for name, rows in stored.rows(table, slice(lo, hi)).items():
          if dtype == 'int8':
            for array, part in zip(opened[table, name], quantize(rows)):
              write_rows(array, lo, part)
          else:
            write_rows(opened[table, name][0], lo, rows.astype(jax.numpy.dtype(dtype)))
        bar.update(stored.row_bytes(table) * (hi - lo))
    _sync('hmem-export-written')
    manifest = None
    if jax.process_index() == 0:
      data_manifest = json.loads((as_path(cfg.data.path) / 'manifest.json').read_text())
      manifest = {
          'format': FORMAT, 'version': VERSION, 'step': int(step), 'dtype': dtype, 'anchor_dtype': anchor_dtype,
          'config': json.loads(cfg.to_json_best_effort()), 'sizes': sizes.sizes(cfg),
          'k': k, 'depth': depth, 'subtrees': subtrees,
          'tokenizer': {'vocab_size': data_manifest['vocab_size'], 'eot_id': data_manifest['eot_id'],
                        'identity': data_manifest.get('tokenizer_sha256') or router.tokenizer.identity},
          'files': file_checksums(tmp), 'bank': meta,
      }
      write_json(tmp / MANIFEST, manifest)  # last: the commit point
    _sync('hmem-export-done')
  return manifest if manifest is not None else read_manifest(out)


def read_manifest(root: str | os.PathLike) -> dict:
  """The manifest, after checking it is a bundle of the version this code reads."""
  path = as_path(root) / MANIFEST
  if not path.is_file():
    raise BundleError(f'{path} not found: {str(root)!r} is not a bundle written by `hmem export` '
                      '(or its export did not finish: export it again)')
  try:
    manifest = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise BundleError(f'{path} is not valid JSON ({e}); the bundle is damaged: export it again') from None
  if manifest.get('format') != FORMAT:
    raise BundleError(f'{path}: format {manifest.get("format")!r} is not {FORMAT!r}; not an hmem bundle')
  if manifest.get('version') != VERSION:
    raise BundleError(f'{path}: bundle format version {manifest.get("version")!r}, but this hmem reads version '
                      f'{VERSION}; export the run again with this version')
  return manifest


def verify(root: str | os.PathLike, manifest: dict) -> None:
  """Every file the manifest lists exists and has its sha256."""
  for name, digest in manifest['files'].items():
    path = as_path(root) / name
    if not path.is_file():
      raise BundleError(f'bundle {root}: {name} is missing; the bundle is incomplete: export it again')
    if sha256(path) != digest:
      raise BundleError(f'bundle {root}: {name} fails its sha256 checksum (changed or damaged since export); '
                        'export the bundle again')


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


def open_bundle(root: str | os.PathLike, *, check: bool = True, cache_bytes: int = 256 << 20) -> MemorySource:
  """A MemorySource over a bundle; `check` verifies every file's checksum first."""
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
  return MemorySource(cfg, nnx.merge(graphdef, params), router, reader, manifest['step'], manifest=manifest)
