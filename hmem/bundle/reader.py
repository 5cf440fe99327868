"""Reading bank rows from a bundle: concurrent tensorstore reads, an LRU cache of rows, read counts.

Each bank array is a zarr v3 array chunked one row (tree node) per chunk, so a path's rows
are read as one chunk per (table, array), all issued at once and awaited together. Rows are
cached whole ({name: array} per (table, row)) in a least-recently-used cache bounded in
bytes: the top levels (few, often shared rows) stay warm, deep rows come and go.
tensorstore's own cache is off, so `reads` counts exactly the rows fetched from storage
(tests use it to prove a blocked node is never read). The cache and the counts live in
`RowCache`; `Reader` fetches from a bundle (dequantizing an int8 bank's rows with their
scales), `hmem.bundle.stored.StoredRows` from a run's checkpoint.

The arrays are opened through tensorstore kvstore specs relative to the bundle's root, so
any tensorstore kvstore works (a local directory, gs://, s3://, ...). Every chunk carries a
crc32c checksum and missing chunks are errors (never silently read as zeros): a damaged
chunk fails the read that touches it, with the array and row named.
"""

from __future__ import annotations

import collections
import re
import threading

import ml_dtypes
import numpy as np
import tensorstore as ts

from hmem.errors import BundleError
from hmem.files import is_remote


def kvstore(root: str, path: str) -> dict | str:
  """The kvstore spec of `path` under `root`: a local directory, or a URL tensorstore reads
  (gs://, s3://, file://, ...; epath's alias gcs:// is spelled gs:// for tensorstore)."""
  root = str(root)
  if not is_remote(root):
    return {'driver': 'file', 'path': f'{root.rstrip("/")}/{path}/'}
  url = re.sub('^gcs://', 'gs://', root).rstrip('/') + '/' + path + '/'
  try:
    ts.KvStore.Spec(url)
  except ValueError as e:
    raise BundleError(f'bundle {root}: tensorstore cannot read or write there ({e}); keep bundles on a '
                      'local path, gs:// or s3://') from None
  return url


class RowCache:
  """Bank rows read from storage by `_fetch`, behind an LRU cache bounded in bytes, with read
  counts. `names`: {table: [array names]}; `present`: {table: bool [rows]} which rows the
  storage holds (a partial bundle holds some)."""

  def __init__(self, root: str, names: dict[str, list[str]], present: dict[str, np.ndarray], cache_bytes: int):
    self.root, self.names, self.present, self.cache_bytes = root, names, present, cache_bytes
    self.reads: collections.Counter = collections.Counter()  # (table, row) -> reads from storage
    self._cache: collections.OrderedDict = collections.OrderedDict()  # (table, row) -> {name: array}
    self._cached_bytes = 0
    self._lock = threading.Lock()

  def _fetch(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """{(table, row): {name: [layers_m, width, features]}} of rows not cached, read from storage."""
    raise NotImplementedError

  def read(self, requests: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{table: row ids [U]} -> {table: {name: [U, layers_m, width, features]}}; rows not cached
    are read concurrently, all tables at once."""
    for table, ids_U in requests.items():
      missing = [int(i) for i in ids_U if not self.present[table][i]]
      if missing:
        raise BundleError(f'bundle {self.root}: rows {missing[:5]} of {table} are not in this partial bundle; '
                          'route with its Router (it falls back to the subtrees present)')
    with self._lock:
      wanted = {(t, int(i)) for t, ids_U in requests.items() for i in ids_U}
      hits = {key: self._cache[key] for key in wanted if key in self._cache}
      for key in hits:
        self._cache.move_to_end(key)
    fetched = self._fetch(sorted(wanted - hits.keys()))
    for rows in fetched.values():
      for a in rows.values():
        a.flags.writeable = False  # shared with the cache and handed out as views
    with self._lock:
      for key, rows in fetched.items():
        self.reads[key] += 1
        self._insert(key, rows)
    found = {**hits, **fetched}
    # One row (a single path) is handed out as a view of the cached row: no copy.
    stack = lambda rows: rows[0][None] if len(rows) == 1 else np.stack(rows)
    return {table: {name: stack([found[table, int(i)][name] for i in ids_U]) for name in self.names[table]}
            for table, ids_U in requests.items()}

  def _insert(self, key, rows) -> None:
    size = sum(a.nbytes for a in rows.values())
    if size > self.cache_bytes:
      return
    self._cache[key] = rows
    self._cached_bytes += size
    while self._cached_bytes > self.cache_bytes:
      _, old = self._cache.popitem(last=False)
      self._cached_bytes -= sum(a.nbytes for a in old.values())

  def clear_cache(self) -> None:
    with self._lock:
      self._cache.clear()
      self._cached_bytes = 0


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """int8 rows and their scales (hmem.bundle.export.quantize) -> bfloat16 rows."""
  return (q.astype(np.float32) * scale).astype(ml_dtypes.bfloat16)


class Reader(RowCache):
  """Rows of a bundle's bank. `arrays`: {table: {name: array path under root}};
  `present`: {table: bool [rows]} which rows a (partial) bundle holds; `scales`: for an
  int8 bundle, {table: {name: path of the array's scales}}, applied on fetch."""

  def __init__(self, root: str, arrays: dict[str, dict[str, str]], present: dict[str, np.ndarray],
               cache_bytes: int = 256 << 20, scales: dict[str, dict[str, str]] | None = None):
    super().__init__(root, {t: list(names) for t, names in arrays.items()}, present, cache_bytes)
    context = ts.Context({'cache_pool': {'total_bytes_limit': 0}})
    paths = {(t, name): path for t, names in arrays.items() for name, path in names.items()}
    paths.update({(t, name, 'scale'): path for t, names in (scales or {}).items() for name, path in names.items()})
    futures = {key: (path, ts.open({'driver': 'zarr3', 'kvstore': kvstore(root, path),
                                    'fill_missing_data_reads': False}, read=True, context=context))
               for key, path in paths.items()}
    self._arrays = {}
    for key, (path, future) in futures.items():
      try:
        self._arrays[key] = future.result()
      except (ValueError, RuntimeError, OSError) as e:
        raise BundleError(f'bundle {root}: bank array {path} cannot be opened ({e}); export the bundle again') from None
    self.quantized = bool(scales)

  def _fetch(self, keys):
    parts = ('', 'scale') if self.quantized else ('',)
    pending = {(table, row, name, part): self._arrays[(table, name, part) if part else (table, name)][row].read()
               for table, row in keys for name in self.names[table] for part in parts}
    got = {}
    for (table, row, name, part), future in pending.items():
      try:
        got[table, row, name, part] = future.result()
      except (ValueError, RuntimeError, OSError) as e:
        raise BundleError(f'bundle {self.root}: row {row} of bank array {table}/{name} cannot be read ({e}); '
                          'the bundle is damaged: export it again') from None
    row = lambda t, r, n: dequantize(got[t, r, n, ''], got[t, r, n, 'scale']) if self.quantized else got[t, r, n, '']
    return {(t, r): {n: row(t, r, n) for n in self.names[t]} for t, r in keys}
