"""The bundle format: names, zarr arrays one chunk per row, checksums, and the manifest.

A bundle holds everything a trained model needs at inference, in one directory
(docs/BUNDLE.md has the layout):

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
s3://). Writing one: hmem.bundle.export; opening one: hmem.bundle.open; reading its rows:
hmem.bundle.reader; editing its bank: hmem.bundle.edit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorstore as ts
from etils import epath

from hmem.bundle.reader import kvstore
from hmem.errors import BundleError
from hmem.files import as_path, atomic_write, sha256

FORMAT, VERSION = 'hmem-bundle', 1
MANIFEST, ANCHOR = 'manifest.json', 'anchor.safetensors'
DTYPES = ('bfloat16', 'float32', 'int8')
ANCHOR_DTYPE = {'int8': 'bfloat16'}  # the anchor's dtype in a bundle of a quantized bank (else the bank's)
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


