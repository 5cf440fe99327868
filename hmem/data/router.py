"""Routing new text to a leaf of the memory tree, exactly as `hmem prepare` routed the corpus.

A Router holds what `prepare` saved beside the dataset (tokenizer.json, the embedder's
files, tree.npz) and reads them from a prepared dataset directory or a bundle, which keeps
the same file names. Texts are embedded and sent down the tree by the same greedy descent
(`hmem.data.tree.route`), so a training document routed at inference lands in the leaf it
was trained in.

Blocking routes around nodes: at each level the descent takes the nearest child that is
neither blocked nor leads only to blocked nodes, so no row of a blocked node's subtree is
ever fetched. `block_best` blocks, per text, the level-1 node its routing picks (the
paper's adversarial blocking: the text is then served by the best remaining subtree). A
partial bundle holds only some level-1 subtrees; a text whose routing enters a missing one
falls back to the best present one, and the result says which texts did.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from hmem.data.embed import load_embedder
from hmem.data.tokenizer import Tokenizer
from hmem.data.tree import Tree, route
from hmem.errors import BundleError
from hmem.files import as_path

TOKENIZER, TREE = 'tokenizer.json', 'tree.npz'


@dataclasses.dataclass(frozen=True)
class Routes:
  """Where each text goes. `path[:, l-1]` is its level-l node id; `leaf` is `path[:, -1]`."""

  leaf: np.ndarray       # [B] int64
  path: np.ndarray       # [B, depth] int64
  fallback: np.ndarray   # [B] bool: routed into a level-1 subtree the bank lacks, sent to the best present one
  blocked: np.ndarray    # [B] int64: the level-1 node `block_best` blocked for this text (-1: none)

  @property
  def fallbacks(self) -> int:
    return int(self.fallback.sum())


def parse_node(text: str, k: int, depth: int) -> tuple[int, int]:
  """'LEVEL:ID' -> (level, id), checked against the tree; levels count from 1 (the root's children)."""
  try:
    level, node = (int(part) for part in text.split(':'))
  except ValueError:
    raise BundleError(f'node {text!r} is not LEVEL:ID (e.g. 1:3 for node 3 of level 1)') from None
  check_node(level, node, k, depth)
  return level, node


def check_node(level: int, node: int, k: int, depth: int) -> None:
  if not 1 <= level <= depth:
    raise BundleError(f'node {level}:{node}: level {level} is not in 1..{depth} (the tree has depth {depth})')
  if not 0 <= node < k**level:
    raise BundleError(f'node {level}:{node} does not exist: level {level} has nodes 0..{k**level - 1}')


class Router:
  """Texts -> leaves. `present`: the level-1 subtrees a partial bank holds (None: all)."""

  def __init__(self, tokenizer: Tokenizer, embedder, tree: Tree, present: Sequence[int] | None = None):
    self.tokenizer, self.embedder, self.tree = tokenizer, embedder, tree
    self.k, self.depth = tree.k, tree.depth
    if present is not None:
      present = sorted({int(p) for p in present})
      for node in present:
        check_node(1, node, self.k, self.depth)
      if not present:
        raise BundleError('a bank with no level-1 subtree cannot serve any text')
    self.present = present

  @classmethod
  def load(cls, directory: str | os.PathLike, present: Sequence[int] | None = None) -> 'Router':
    """From a prepared dataset directory or a bundle, on any filesystem. A prepared dataset's
    manifest must agree with its tokenizer (one replaced after `prepare` would route and
    encode wrongly)."""
    directory = as_path(directory)
    router = cls(Tokenizer.load(str(directory / TOKENIZER)), load_embedder(str(directory)),
                 Tree.load(str(directory / TREE)), present)
    manifest_path = directory / 'manifest.json'
    if manifest_path.is_file():
      manifest = json.loads(manifest_path.read_text())
      # The identity of the tokenizer the data was tokenized with: a bundle nests it, a
      # prepared dataset records it at the top.
      expected = manifest.get('tokenizer', {}).get('identity') or manifest.get('tokenizer_sha256')
      if expected and router.tokenizer.identity != expected:
        raise BundleError(f'{directory / TOKENIZER} is not the tokenizer the run was trained with '
                          f'(identity {router.tokenizer.identity}, {manifest_path} records {expected}); '
                          'restore the tokenizer the data was prepared with')
    return router

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    return self.embedder.embed(list(texts), progress=False)

  def route(self, texts: Sequence[str], block: Iterable[tuple[int, int]] = (), block_best: bool = False) -> Routes:
    return self.route_embeddings(self.embed(texts), block, block_best)

  def route_embeddings(self, emb_NxD: np.ndarray, block: Iterable[tuple[int, int]] = (),
                       block_best: bool = False) -> Routes:
    block = [(int(level), int(node)) for level, node in block]
    for level, node in block:
      check_node(level, node, self.k, self.depth)
    n = emb_NxD.shape[0]
    restricted = bool(block) or self.present is not None
    allowed = self._allowed(block, self.present) if restricted else None
    leaf_N = route(self.tree, emb_NxD, allowed=allowed)
    fallback_N = np.zeros(n, bool)
    if self.present is not None:
      wanted_N = route(self.tree, emb_NxD, allowed=self._allowed(block, None) if block else None)
      fallback_N = ~np.isin(self._level1(wanted_N), self.present)
      if fallback_N.any():
        logging.warning('%d of %d texts route into level-1 subtrees this bank does not hold; they use the '
                        'best present one (subtrees present: %s)', fallback_N.sum(), n, self.present)
    blocked_N = np.full(n, -1, np.int64)
    if block_best:
      allowed = allowed if allowed is not None else self._allowed(block, None)
      if allowed[0].sum() < 2:
        raise BundleError('block_best needs two reachable level-1 subtrees, but blocking and the bank leave '
                          f'only {np.flatnonzero(allowed[0]).tolist()}')
      blocked_N = self._level1(leaf_N)
      leaf_N = route(self.tree, emb_NxD, allowed=allowed, avoid_N=blocked_N)
    return Routes(leaf=leaf_N, path=self.path(leaf_N), fallback=fallback_N, blocked=blocked_N)

  def path(self, leaf_N: np.ndarray) -> np.ndarray:
    """[N, depth] node ids of levels 1..depth on each leaf's root-to-leaf path."""
    scale_L = self.k ** np.arange(self.depth - 1, -1, -1, dtype=np.int64)
    return np.asarray(leaf_N, np.int64)[:, None] // scale_L[None, :]

  def _level1(self, leaf_N: np.ndarray) -> np.ndarray:
    return np.asarray(leaf_N, np.int64) // self.k ** (self.depth - 1)

  def _allowed(self, block, present) -> tuple[np.ndarray, ...]:
    """Per level, the nodes a descent may enter: not blocked, not below a blocked node, in a
    present subtree, and with an allowed leaf below (so the descent never gets stuck)."""
    k, depth = self.k, self.depth
    allowed = [np.ones(k**level, bool) for level in range(1, depth + 1)]
    for level, node in block:
      allowed[level - 1][node] = False
    if present is not None:
      allowed[0] &= np.isin(np.arange(k), present)
    for level in range(1, depth):
      allowed[level] &= np.repeat(allowed[level - 1], k)
    for level in range(depth - 1, 0, -1):
      allowed[level - 1] &= allowed[level].reshape(-1, k).any(axis=1)
    if not allowed[0].any():
      raise BundleError(f'the blocked nodes {block} leave no leaf to route to'
                        + (f' among the subtrees present ({present})' if present is not None else ''))
    return tuple(allowed)
