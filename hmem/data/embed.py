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

import hashlib
import json
import os
from collections.abc import Sequence

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
  """Embeddings on disk: one float32 [n, dim] `.npy` per key, under a directory per embedder.

  `directory`/{kind}-{identity}/{key}.npy holds the vectors and {key}.json their row count,
  dimension, sha256 and a description of their source. A key is a hash of a JSON-able
  description of what was embedded (`key(...)`); the caller makes it name everything
  that decides the texts and their order. A file that does not load, has another shape
  or fails its checksum is reported 'rejected' and overwritten, never used. Writes are
  atomic (a temporary file, then os.replace), so processes may share a directory.
  """

  VERSION = 1  # part of every key: bump it when what a key describes stops pinning the texts

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
    return f'{base}.npy', f'{base}.json'

  def load(self, key: str) -> tuple[np.ndarray | None, str]:
    """(vectors, 'hit'), or (None, 'miss') when absent, (None, 'rejected') when unusable."""
    npy, meta_path = self._paths(key)
    if not (os.path.exists(npy) or os.path.exists(meta_path)):
      return None, 'miss'
    try:
      with open(meta_path, encoding='utf-8') as f:
        meta = json.load(f)
      x_NxD = np.load(npy, allow_pickle=False)
      ok = (x_NxD.dtype == np.float32 and x_NxD.shape == (meta['rows'], self.dim)
            and meta['dim'] == self.dim and _digest(x_NxD) == meta['sha256'])
    except (OSError, ValueError, EOFError, KeyError, TypeError):
      ok = False
    return (x_NxD, 'hit') if ok else (None, 'rejected')

  def rows(self, key: str, rows: int) -> np.ndarray:
    """The vectors under `key`, memory-mapped (a reader touches only the rows it indexes).

    Not checksummed, so use it for entries this run has just loaded or stored; the shape
    is checked against `rows`.
    """
    npy, _ = self._paths(key)
    try:
      x_NxD = np.load(npy, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f'embedding cache entry {npy} is unreadable ({e}); it changed during the run: '
                      'rerun the preparation') from None
    if x_NxD.dtype != np.float32 or x_NxD.shape != (rows, self.dim):
      raise DataError(f'embedding cache entry {npy} has {x_NxD.dtype} {x_NxD.shape}, expected float32 '
                      f'({rows}, {self.dim}); it changed during the run: rerun the preparation')
    return x_NxD

  def store(self, key: str, x_NxD: np.ndarray, source: dict) -> None:
    x_NxD = np.ascontiguousarray(x_NxD, np.float32)
    if x_NxD.ndim != 2 or x_NxD.shape[1] != self.dim:
      raise DataError(f'embedding cache: vectors of shape {x_NxD.shape}, expected [n, {self.dim}]')
    npy, meta_path = self._paths(key)
    meta = {'rows': x_NxD.shape[0], 'dim': self.dim, 'sha256': _digest(x_NxD), 'source': source}
    # The vectors first: a reader that finds the new metadata finds the new vectors.
    with atomic_write(npy, 'wb') as f:
      np.save(f, x_NxD, allow_pickle=False)
    with atomic_write(meta_path, encoding='utf-8') as f:
      f.write(json.dumps(meta, indent=1) + '\n')


def _digest(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
