"""Document embedders for `hmem prepare`: text -> unit vectors that the memory tree clusters.

Two embedders sit behind one interface (hmem.data.embedder). `minilm` (all-MiniLM-L6-v2, the paper's choice)
gives semantic 384-d vectors; `tfidf` needs no weights and is fit on a sample of the
corpus, which is enough for tests, toy corpora and machines without the model package.

An embedder is saved next to the tree it was used to build, so that documents and
prompts routed later land in the same space: `load_embedder(dir)` rebuilds it from small
files (never pickle) and gives the same vectors.

`EmbeddingCache` keeps computed vectors on disk, keyed by the embedder's `identity()` and
by what was embedded, so a second `hmem prepare` over the same corpus (another tree, say)
does not embed it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from hmem.data.embedder import CONFIG_FILE, Embedder
from hmem.data.minilm import MiniLMEmbedder
from hmem.data.tfidf import TfidfEmbedder
from hmem.errors import ConfigError, DataError
from hmem.files import as_path, atomic_write, is_remote


def make_embedder(data_cfg, fit_texts: Sequence[str] | None = None) -> Embedder:
  """The embedder named by `data_cfg.embedder`; `tfidf` is fit on `fit_texts`."""
  kind = data_cfg.embedder
  if kind == 'tfidf':
    if fit_texts is None:
      raise ConfigError('data.embedder=tfidf is fit on a sample of the corpus: pass fit_texts '
                       '(or use data.embedder=minilm, which needs no fitting)')
    return TfidfEmbedder.fit(fit_texts, data_cfg.tfidf_dim, data_cfg.tfidf_min_df)
  if kind == 'minilm':
    return MiniLMEmbedder(data_cfg.embedder_path, batch_size=data_cfg.embed_batch,
                          max_tokens=data_cfg.embed_max_tokens)
  raise ConfigError(f"data.embedder={kind!r}; use 'tfidf' or 'minilm'")


def load_embedder(directory: str | os.PathLike) -> Embedder:
  """Rebuilds the embedder that `save(directory)` wrote (local or on an object store)."""
  name = os.fspath(directory)
  directory = as_path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise DataError(f'{path} not found: {name!r} holds no saved embedder; '
                            'point at the directory `hmem prepare` wrote')
  config = json.loads(path.read_text(encoding='utf-8'))
  kind = config.get('kind')
  if kind == 'tfidf':
    return TfidfEmbedder.load(directory, config)
  if kind == 'minilm':
    weights = config.get('path')
    if weights and not (os.path.isabs(weights) or is_remote(weights)):  # shipped beside it (a bundle)
      config = {**config, 'path': str(directory / weights)}
    return MiniLMEmbedder.load(config)
  raise DataError(f"{path}: unknown embedder kind {kind!r}; expected 'tfidf' or 'minilm'")


class EmbeddingCache:
  """Embeddings on disk: one float32 [n, dim] array per key, under a directory per embedder.

  `directory`/{kind}-{identity}/{key}.f32 holds the vectors (little-endian float32, row
  after row, no header) and {key}.json their row count, dimension, sha256 and a description
  of their source. A key is a hash of a JSON-able description of what was embedded
  (`key(...)`); the caller makes it name everything that decides the texts and their
  order. Vectors are written as they are computed (`writer`) and read memory-mapped, so no
  process holds a key's vectors whole. An entry that has another shape or fails its
  checksum is reported 'rejected' and overwritten, never used. Writes are atomic (a
  temporary file, then os.replace), so processes may share a directory.
  """

  VERSION = 2  # part of every key: bump it when what a key describes stops pinning the texts
  _DTYPE = np.dtype('<f4')

  def __init__(self, directory: str, embedder: Embedder):
    self.dim = embedder.dim
    self.directory = os.path.join(os.path.abspath(directory), f'{embedder.kind}-{embedder.identity()[:24]}')
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as e:
      raise DataError(f'cannot create the embedding cache {self.directory} ({e}); set '
                      'data.embed_cache to a writable directory') from None

  @classmethod
  def key(cls, **source) -> str:
    return hashlib.sha256(json.dumps([cls.VERSION, source], sort_keys=True).encode()).hexdigest()[:32]

  def _paths(self, key: str) -> tuple[str, str]:
    base = os.path.join(self.directory, key)
    return f'{base}.f32', f'{base}.json'

  def load(self, key: str, rows: int) -> str:
    """'hit' when the entry holds [rows, dim] vectors that pass their checksum, 'miss' when
    it is absent, 'rejected' otherwise."""
    data, meta_path = self._paths(key)
    if not (os.path.exists(data) or os.path.exists(meta_path)):
      return 'miss'
    try:
      with open(meta_path, encoding='utf-8') as f:
        meta = json.load(f)
      digest = hashlib.sha256()
      for x_NxD in self.read(key, rows):
        digest.update(x_NxD)
      ok = meta['rows'] == rows and meta['dim'] == self.dim and digest.hexdigest() == meta['sha256']
    except (OSError, ValueError, KeyError, TypeError):
      ok = False
    return 'hit' if ok else 'rejected'

  def read(self, key: str, rows: int, piece: int = 1 << 16) -> Iterator[np.ndarray]:
    """The entry's [rows, dim] vectors in order, `piece` rows at a time, read as they are
    asked for (a sequential reader holds one piece). ValueError if it has another size."""
    data, _ = self._paths(key)
    row_bytes = self.dim * self._DTYPE.itemsize
    with open(data, 'rb') as f:
      if os.fstat(f.fileno()).st_size != rows * row_bytes:
        raise ValueError(f'{data} holds {os.fstat(f.fileno()).st_size} bytes, not {rows} x {self.dim} floats')
      for lo in range(0, rows, piece):
        n = min(piece, rows - lo)
        yield np.frombuffer(f.read(n * row_bytes), self._DTYPE).reshape(n, self.dim)

  def rows(self, key: str, rows: int) -> np.ndarray:
    """The [rows, dim] vectors under `key`, memory-mapped (a reader touches only the rows it
    indexes). Not checksummed, so use it for entries this run has just loaded or stored."""
    data, _ = self._paths(key)
    try:
      if os.path.getsize(data) != rows * self.dim * self._DTYPE.itemsize:
        raise ValueError(f'{os.path.getsize(data)} bytes')
      return np.memmap(data, self._DTYPE, 'r', shape=(rows, self.dim)) if rows else np.zeros((0, self.dim), self._DTYPE)
    except (OSError, ValueError) as e:
      raise DataError(f'embedding cache entry {data} is unreadable or not {rows} x {self.dim} floats ({e}); '
                      'it changed during the run: rerun the preparation') from None

  @contextlib.contextmanager
  def writer(self, key: str, source: dict, rows: int):
    """Yields append(x_NxD), which stores vectors in order; the entry appears once the block
    ends with `rows` rows appended (fewer or more raise DataError: the input changed)."""
    data, meta_path = self._paths(key)
    digest, written = hashlib.sha256(), 0
    with atomic_write(data, 'wb') as f:

      def append(x_NxD: np.ndarray) -> None:
        nonlocal written
        x_NxD = np.ascontiguousarray(x_NxD, self._DTYPE)
        if x_NxD.ndim != 2 or x_NxD.shape[1] != self.dim:
          raise DataError(f'embedding cache: vectors of shape {x_NxD.shape}, expected [n, {self.dim}]')
        digest.update(x_NxD)
        f.write(x_NxD.tobytes())
        written += x_NxD.shape[0]

      yield append
      if written != rows:
        raise DataError(f'embedding cache: {written} vectors written for {source}, expected {rows}: '
                        'the input changed during the run; rerun the preparation')
    meta = {'rows': rows, 'dim': self.dim, 'sha256': digest.hexdigest(), 'source': source}
    # The vectors first: a reader that finds the new metadata finds the new vectors.
    with atomic_write(meta_path, encoding='utf-8') as f:
      f.write(json.dumps(meta, indent=1) + '\n')
