"""Document embedders for `hmem prepare`: text -> unit vectors that the memory tree clusters.

Two embedders sit behind one interface. `minilm` (all-MiniLM-L6-v2, the paper's choice)
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
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from hmem.errors import ConfigError, DataError
from hmem.files import as_path, atomic_write, is_remote

CONFIG_FILE = 'embedder.json'
_TFIDF_ARRAYS = 'embedder_tfidf.npz'
_TFIDF_VOCAB = 'embedder_vocab.txt'
# sklearn's default: words of two or more word characters. Stored with the embedder so a
# change of default in a later sklearn cannot change the vectors of a saved one.
_TOKEN_PATTERN = r'(?u)\b\w\w+\b'
_MAX_VOCAB = 1 << 16  # bounds the SVD's components [dim, vocab] and the saved files


class Embedder(Protocol):
  """Maps texts to [n, dim] float32 rows of unit L2 norm."""

  kind: str
  dim: int

  def embed(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
    """`progress`: a progress bar where embedding is slow enough to want one."""
    ...

  def identity(self) -> str:
    """A hex digest of everything the vectors depend on: equal digests, equal vectors."""
    ...

  def save(self, directory: str) -> None:
    """Writes what `load_embedder(directory)` needs to rebuild this embedder."""
    ...


def l2_normalize(x_NxD: np.ndarray) -> np.ndarray:
  """Rows scaled to unit norm; an all-zero row (a text with no known term) stays zero."""
  norms_Nx1 = np.linalg.norm(x_NxD, axis=1, keepdims=True)
  return (x_NxD / np.maximum(norms_Nx1, 1e-12)).astype(np.float32)


class TfidfEmbedder:
  """Sublinear TF-IDF over a fixed vocabulary, projected onto an SVD basis (LSA).

  The transform is computed here from plain arrays (vocabulary, idf, components) rather
  than by a fitted sklearn object, so a fresh and a reloaded embedder run the same code
  on the same numbers and give bit-identical vectors.
  """

  kind = 'tfidf'

  def __init__(self, vocabulary: Sequence[str], idf_V: np.ndarray, components_DxV: np.ndarray):
    if len(vocabulary) != idf_V.shape[0] or components_DxV.shape[1] != idf_V.shape[0]:
      raise DataError(f'tfidf embedder: vocabulary ({len(vocabulary)}), idf {idf_V.shape} and '
                       f'components {components_DxV.shape} disagree')
    self.vocabulary = list(vocabulary)
    self.idf_V = np.asarray(idf_V, np.float32)
    self.components_DxV = np.asarray(components_DxV, np.float32)
    self.dim = self.components_DxV.shape[0]
    self._counter = CountVectorizer(
        vocabulary={term: i for i, term in enumerate(self.vocabulary)},
        lowercase=True, token_pattern=_TOKEN_PATTERN, dtype=np.float32)

  @classmethod
  def fit(cls, texts: Sequence[str], dim: int, min_df: int = 0) -> 'TfidfEmbedder':
    """Fits vocabulary, idf and a `dim`-d SVD basis on a sample of the corpus.

    `dim` is clipped to the rank the sample allows (fewer documents or terms than `dim`).
    `min_df`: the fewest sample documents a word must occur in to be kept; 0 = 2 on a
    sample of 100 documents or more, else 1.
    """
    texts = list(texts)
    # On a real sample, words seen once are mostly noise and words in most documents
    # carry no topic; a tiny sample (tests, toy corpora) keeps every word it has. A corpus
    # whose key words are each in one document (a name per entity) asks for min_df 1.
    big = len(texts) >= 100
    vectorizer = TfidfVectorizer(
        sublinear_tf=True, lowercase=True, token_pattern=_TOKEN_PATTERN, dtype=np.float32,
        min_df=min_df or (2 if big else 1), max_df=0.5 if big else 1.0, max_features=_MAX_VOCAB)
    try:
      tfidf_NxV = vectorizer.fit_transform(texts)
    except ValueError as e:  # sklearn's "empty vocabulary"
      raise DataError(f'tfidf embedder: cannot fit on {len(texts)} sample texts ({e}); '
                       'give data.tokenizer_sample more non-empty documents') from e
    vocab_size = tfidf_NxV.shape[1]
    dim = min(dim, len(texts), vocab_size - 1)
    if dim < 1:
      raise DataError(f'tfidf embedder: the sample ({len(texts)} texts, {vocab_size} terms) '
                       'is too small for an SVD basis; give it more documents')
    svd = TruncatedSVD(n_components=dim, algorithm='randomized', n_iter=7, random_state=0)
    svd.fit(tfidf_NxV)
    terms = [None] * vocab_size
    for term, i in vectorizer.vocabulary_.items():
      terms[i] = term
    return cls(terms, vectorizer.idf_, svd.components_)

  def embed(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
    del progress  # tens of thousands of documents a second: no bar
    counts_NxV = self._counter.transform(list(texts)).tocsr()
    counts_NxV.data = 1.0 + np.log(counts_NxV.data)  # sublinear tf
    tfidf_NxV = counts_NxV.multiply(self.idf_V[None, :]).tocsr()
    # Row norms first, as TfidfVectorizer does, so the SVD basis sees the inputs it was fit on.
    row_norms_N = np.sqrt(np.asarray(tfidf_NxV.multiply(tfidf_NxV).sum(axis=1))).ravel()
    tfidf_NxV = tfidf_NxV.multiply(1.0 / np.maximum(row_norms_N, 1e-12)[:, None]).tocsr()
    x_NxD = np.asarray(tfidf_NxV @ self.components_DxV.T, np.float32)
    return l2_normalize(x_NxD)

  def identity(self) -> str:
    digest = hashlib.sha256(json.dumps(['tfidf', _TOKEN_PATTERN, self.idf_V.shape,
                                        self.components_DxV.shape]).encode())
    digest.update('\n'.join(self.vocabulary).encode('utf-8'))
    digest.update(self.idf_V.astype('<f4').tobytes())
    digest.update(self.components_DxV.astype('<f4').tobytes())
    return digest.hexdigest()

  def save(self, directory: str | os.PathLike) -> None:
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Terms never contain a newline (they match \w\w+), so one term a line is exact.
    with atomic_write(directory / _TFIDF_VOCAB, encoding='utf-8') as f:
      f.write('\n'.join(self.vocabulary))
    with atomic_write(directory / _TFIDF_ARRAYS, 'wb') as f:
      np.savez(f, idf=self.idf_V, components=self.components_DxV)
    write_config(directory, {'kind': 'tfidf', 'dim': self.dim, 'token_pattern': _TOKEN_PATTERN})

  @classmethod
  def load(cls, directory: str | os.PathLike, config: dict) -> 'TfidfEmbedder':
    directory = as_path(directory)
    if config.get('token_pattern') != _TOKEN_PATTERN:
      raise DataError(f'{directory / CONFIG_FILE}: token_pattern '
                       f'{config.get("token_pattern")!r} is not the supported {_TOKEN_PATTERN!r}')
    vocabulary = (directory / _TFIDF_VOCAB).read_text(encoding='utf-8').split('\n')
    arrays_bytes = (directory / _TFIDF_ARRAYS).read_bytes()
    with np.load(io.BytesIO(arrays_bytes), allow_pickle=False) as arrays:
      return cls(vocabulary, arrays['idf'], arrays['components'])


def write_config(directory: str | os.PathLike, config: dict) -> None:
  """Writes the `embedder.json` that `load_embedder` dispatches on (its `kind`)."""
  directory = as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  with atomic_write(directory / CONFIG_FILE, encoding='utf-8') as f:
    json.dump(config, f, indent=2)
    f.write('\n')


def make_embedder(data_cfg, fit_texts: Sequence[str] | None = None) -> Embedder:
  """The embedder named by `data_cfg.embedder`; `tfidf` is fit on `fit_texts`."""
  kind = data_cfg.embedder
  if kind == 'tfidf':
    if fit_texts is None:
      raise ConfigError('data.embedder=tfidf is fit on a sample of the corpus: pass fit_texts '
                       '(or use data.embedder=minilm, which needs no fitting)')
    return TfidfEmbedder.fit(fit_texts, data_cfg.tfidf_dim, data_cfg.tfidf_min_df)
  if kind == 'minilm':
    from hmem.data.minilm import MiniLMEmbedder
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
    from hmem.data.minilm import MiniLMEmbedder
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
