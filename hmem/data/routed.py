"""Routed documents between `hmem prepare`'s route pass and packing, kept out of the shuffle.

The route pass writes each range's tokenized documents to one temporary file and sends
through the shuffle only where, in that file, each leaf's documents lie: what the runner
moves (and on the DirectRunner, what the launcher holds) is a few numbers per range and
leaf, not the documents. Packing a leaf reads its blocks back from every range's file in
range order, which is (file, line) order. (Beam's fileio.WriteToFiles keeps payloads out of
the shuffle the same way; one file per range rather than per range and leaf keeps the
file count at the range count: 65,536 leaves would make a file per document.)

A file is a sequence of flushes. A flush writes the documents buffered since the last one,
sorted by leaf (stably: in line order within a leaf), each leaf's as one block:

  keys     n int64: each document's line or row in its file
  lengths  n uint32: its token count
  tokens   the documents' tokens, concatenated, in the dataset's token dtype

A block is named by (byte offset, n, tokens). The route pass flushes every FLUSH_BYTES of
buffered documents, so that is the most routed data a worker holds (twice while sorting).
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np

from hmem.files import atomic_path

FLUSH_BYTES = 32 << 20
_KEY, _LENGTH = np.dtype('<i8'), np.dtype('<u4')


def gather_ranges(tokens: np.ndarray, starts_N: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
  """tokens[starts[0]:starts[0]+lengths[0]], tokens[starts[1]:...], ... concatenated."""
  shift_N = starts_N - (np.cumsum(lengths_N) - lengths_N)
  return tokens[np.repeat(shift_N, lengths_N) + np.arange(lengths_N.sum())]


class RoutedWriter:
  """Buffers one range's routed documents and writes them to `f` in leaf-sorted flushes;
  `blocks` maps each leaf to its [(offset, n, tokens)] in the file, in order."""

  def __init__(self, f, dtype: np.dtype, flush_bytes: int = FLUSH_BYTES):
    self._f, self._dtype, self._flush_bytes = f, np.dtype(dtype), flush_bytes
    self._parts, self._bytes = [], 0
    self.blocks: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)

  def add(self, leaf_N: np.ndarray, key_N: np.ndarray, tokens: list[np.ndarray]) -> None:
    """Documents in line order: their leaves, keys and token ids."""
    if not tokens:
      return
    lengths_N = np.array([len(t) for t in tokens], np.int64)
    tokens_T = np.concatenate(tokens).astype(self._dtype)
    self._parts.append((np.asarray(leaf_N, np.int64), np.asarray(key_N, np.int64), lengths_N, tokens_T))
    self._bytes += tokens_T.nbytes + lengths_N.size * (_KEY.itemsize + _LENGTH.itemsize)
    if self._bytes >= self._flush_bytes:
      self.flush()

  def flush(self) -> None:
    if not self._parts:
      return
    leaf_N, key_N, lengths_N, tokens_T = (np.concatenate(a) for a in zip(*self._parts))
    self._parts, self._bytes = [], 0
    order_N = np.argsort(leaf_N, kind='stable')
    tokens_T = gather_ranges(tokens_T, (np.cumsum(lengths_N) - lengths_N)[order_N], lengths_N[order_N])
    leaf_N, key_N, lengths_N = leaf_N[order_N], key_N[order_N], lengths_N[order_N]
    ends_N = np.cumsum(lengths_N)
    leaves, firsts, counts = np.unique(leaf_N, return_index=True, return_counts=True)
    for leaf, lo, n in zip(leaves.tolist(), firsts.tolist(), counts.tolist()):
      t_lo, t_hi = int(ends_N[lo] - lengths_N[lo]), int(ends_N[lo + n - 1])
      self.blocks[leaf].append((self._f.tell(), n, t_hi - t_lo))
      self._f.write(key_N[lo:lo + n].astype(_KEY).tobytes())
      self._f.write(lengths_N[lo:lo + n].astype(_LENGTH).tobytes())
      self._f.write(tokens_T[t_lo:t_hi].tobytes())


@contextlib.contextmanager
def routed_file(path: str, dtype: np.dtype):
  """A RoutedWriter onto the local file `path`, which appears whole when the block ends (a
  retried range writes the same bytes again)."""
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    writer = RoutedWriter(f, dtype)
    yield writer
    writer.flush()


def read_blocks(path: str, blocks: list[tuple[int, int, int]], dtype: np.dtype):
  """(key_N, lengths_N, tokens_T) of the documents in `blocks` of the file at `path`, in order."""
  dtype = np.dtype(dtype)
  keys, lengths, tokens = [], [], []
  with open(path, 'rb') as f:
    for offset, n, t in blocks:
      f.seek(offset)
      raw = f.read(n * (_KEY.itemsize + _LENGTH.itemsize) + t * dtype.itemsize)
      keys.append(np.frombuffer(raw, _KEY, n))
      lengths.append(np.frombuffer(raw, _LENGTH, n, n * _KEY.itemsize).astype(np.int64))
      tokens.append(np.frombuffer(raw, dtype, t, n * (_KEY.itemsize + _LENGTH.itemsize)))
  return np.concatenate(keys), np.concatenate(lengths), np.concatenate(tokens)
