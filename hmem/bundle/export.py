"""`hmem export`: a run's checkpoint -> a bundle (hmem.bundle.format has the layout).

The bank is streamed from the checkpoint in row ranges (never restored whole): host memory
for it stays within `buffer_mb` whatever its size (docs/BUNDLE.md). Export writes a local
bundle to a temporary directory renamed into place at the end; an object store has no
rename, so there the manifest, written last, marks the bundle complete (one without a
manifest is refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import safetensors.numpy
from etils import epath
from flax import traverse_util
from tqdm import tqdm

from hmem import sizes
from hmem.bundle.format import (
  ANCHOR,
  ANCHOR_DTYPE,
  DTYPES,
  FORMAT,
  MANIFEST,
  VERSION,
  array_path,
  create_array,
  file_checksums,
  open_array,
  present_rows,
  read_manifest,
  scale_path,
  true_runs,
  write_json,
  write_rows,
)
from hmem.bundle.open import check_router
from hmem.bundle.reader import kvstore
from hmem.bundle.stored import ROW_COPIES, StoredBank
from hmem.data.embedder import CONFIG_FILE, write_config
from hmem.data.router import TOKENIZER, TREE, Router, check_node
from hmem.errors import BundleError
from hmem.files import as_path, atomic_path, copy
from hmem.memory import bank as memory_bank
from hmem.train.checkpoint import latest_step
from hmem.train.params import restore_params


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

  The bank is streamed: read from the checkpoint in row ranges (hmem.bundle.stored), caught
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


def export_latest(run: str, out: str, progress: bool, dtype: str = 'float32') -> None:
  """Exports the run's latest checkpoint unless `out` already holds that step's bundle (the
  quickstart, benchmarks and sweeps call this to reuse a finished export)."""
  step = latest_step(run)
  if os.path.exists(os.path.join(out, MANIFEST)) and read_manifest(out)['step'] == step:
    return
  shutil.rmtree(out, ignore_errors=True)
  export(run, out, dtype=dtype, progress=progress)
