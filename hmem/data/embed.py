"""Document embedders for `hmem prepare`: text -> unit vectors that the memory tree clusters.

Two embedders sit behind one interface. `minilm` (all-MiniLM-L6-v2, PAPER.md's choice)
gives semantic 384-d vectors; `tfidf` needs no weights and is fit on a sample of the
corpus, which is enough for tests, toy corpora and machines without the model package.

An embedder is saved next to the tree it was used to build, so that documents and
prompts routed later land in the same space: `load_embedder(dir)` rebuilds it from small
files (never pickle) and gives the same vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from hmem.errors import ConfigError, DataError

CONFIG_FILE = 'embedder.json'
_TFIDF_ARRAYS = 'embedder_tfidf.npz'
_TFIDF_VOCAB = 'embedder_vocab.txt'
# sklearn's default: words of two or more word characters. Stored with the embedder so a
# change of default in a later sklearn cannot change the vectors of a saved one.
_TOKEN_PATTERN = r'(?u)\b\w\w+\b'
_MAX_VOCAB = 1 << 16  # bounds the SVD's components [dim, vocab] and the saved files


class Embedder(Protocol):
  """Maps texts to [n, dim] float32 rows of unit L2 norm."""

  dim: int

  def embed(self, texts: Sequence[str]) -> np.ndarray:
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
  def fit(cls, texts: Sequence[str], dim: int) -> 'TfidfEmbedder':
    """Fits vocabulary, idf and a `dim`-d SVD basis on a sample of the corpus.

    `dim` is clipped to the rank the sample allows (fewer documents or terms than `dim`).
    """
    texts = list(texts)
    # On a real sample, words seen once are mostly noise and words in most documents
    # carry no topic; a tiny sample (tests, toy corpora) keeps every word it has.
    big = len(texts) >= 100
    vectorizer = TfidfVectorizer(
        sublinear_tf=True, lowercase=True, token_pattern=_TOKEN_PATTERN, dtype=np.float32,
        min_df=2 if big else 1, max_df=0.5 if big else 1.0, max_features=_MAX_VOCAB)
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

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    counts_NxV = self._counter.transform(list(texts)).tocsr()
    counts_NxV.data = 1.0 + np.log(counts_NxV.data)  # sublinear tf
    tfidf_NxV = counts_NxV.multiply(self.idf_V[None, :]).tocsr()
    # Row norms first, as TfidfVectorizer does, so the SVD basis sees the inputs it was fit on.
    row_norms_N = np.sqrt(np.asarray(tfidf_NxV.multiply(tfidf_NxV).sum(axis=1))).ravel()
    tfidf_NxV = tfidf_NxV.multiply(1.0 / np.maximum(row_norms_N, 1e-12)[:, None]).tocsr()
    x_NxD = np.asarray(tfidf_NxV @ self.components_DxV.T, np.float32)
    return l2_normalize(x_NxD)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    # Terms never contain a newline (they match \w\w+), so one term a line is exact.
    with open(os.path.join(directory, _TFIDF_VOCAB), 'w', encoding='utf-8') as f:
      f.write('\n'.join(self.vocabulary))
    np.savez(os.path.join(directory, _TFIDF_ARRAYS), idf=self.idf_V, components=self.components_DxV)
    write_config(directory, {'kind': 'tfidf', 'dim': self.dim, 'token_pattern': _TOKEN_PATTERN})

  @classmethod
  def load(cls, directory: str, config: dict) -> 'TfidfEmbedder':
    if config.get('token_pattern') != _TOKEN_PATTERN:
      raise DataError(f'{os.path.join(directory, CONFIG_FILE)}: token_pattern '
                       f'{config.get("token_pattern")!r} is not the supported {_TOKEN_PATTERN!r}')
    with open(os.path.join(directory, _TFIDF_VOCAB), encoding='utf-8') as f:
      vocabulary = f.read().split('\n')
    with np.load(os.path.join(directory, _TFIDF_ARRAYS), allow_pickle=False) as arrays:
      return cls(vocabulary, arrays['idf'], arrays['components'])


def write_config(directory: str, config: dict) -> None:
  """Writes the `embedder.json` that `load_embedder` dispatches on (its `kind`)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
    f.write('\n')


def make_embedder(data_cfg, fit_texts: Sequence[str] | None = None) -> Embedder:
  """The embedder named by `data_cfg.embedder`; `tfidf` is fit on `fit_texts`."""
  kind = data_cfg.embedder
  if kind == 'tfidf':
    if fit_texts is None:
      raise ConfigError('data.embedder=tfidf is fit on a sample of the corpus: pass fit_texts '
                       '(or use data.embedder=minilm, which needs no fitting)')
    return TfidfEmbedder.fit(fit_texts, data_cfg.tfidf_dim)
  if kind == 'minilm':
    from hmem.data.minilm import MiniLMEmbedder
    return MiniLMEmbedder(data_cfg.embedder_path, batch_size=data_cfg.embed_batch,
                          max_tokens=data_cfg.embed_max_tokens)
  raise ConfigError(f"data.embedder={kind!r}; use 'tfidf' or 'minilm'")


def load_embedder(directory: str) -> Embedder:
  """Rebuilds the embedder that `save(directory)` wrote."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise DataError(f'{path} not found: {directory!r} holds no saved embedder; '
                            'point at the directory `hmem prepare` wrote')
  with open(path, encoding='utf-8') as f:
    config = json.load(f)
  kind = config.get('kind')
  if kind == 'tfidf':
    return TfidfEmbedder.load(directory, config)
  if kind == 'minilm':
    from hmem.data.minilm import MiniLMEmbedder
    return MiniLMEmbedder.load(config)
  raise DataError(f"{path}: unknown embedder kind {kind!r}; expected 'tfidf' or 'minilm'")
