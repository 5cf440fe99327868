"""The TF-IDF embedder: sublinear TF-IDF projected onto an SVD basis fit on a sample of the
corpus (LSA). Needs no weights: for tests, toy corpora and machines without the MiniLM package."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from hmem.data.embedder import CONFIG_FILE, l2_normalize, write_config
from hmem.errors import DataError
from hmem.files import as_path, atomic_write

_TFIDF_ARRAYS = 'embedder_tfidf.npz'
_TFIDF_VOCAB = 'embedder_vocab.txt'
# sklearn's default: words of two or more word characters. Stored with the embedder so a
# change of default in a later sklearn cannot change the vectors of a saved one.
_TOKEN_PATTERN = r'(?u)\b\w\w+\b'
_MAX_VOCAB = 1 << 16  # bounds the SVD's components [dim, vocab] and the saved files



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
