"""Packing the documents of one leaf cluster into fixed-length sequences.

The documents, each followed by EOT, are laid end to end and cut every seq_len tokens, so
only a leaf's last sequence has padding. Inside a sequence, segment ids number the
documents 1..n in order (0 marks padding): attention and RoPE positions restart at each
segment. A document cut at a sequence boundary continues as segment 1 of the next
sequence, which is what per-document attention needs: the two parts never attend to each
other's sequence anyway.
"""

from __future__ import annotations

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from hmem.data import layout
from hmem.files import atomic_path


def pack(tokens: np.ndarray, lengths_N: np.ndarray, seq_len: int, eot_id: int,
         pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Documents (tokens concatenated, [N] lengths) -> [M, seq_len] tokens and segment ids."""
  lengths_N = np.asarray(lengths_N, np.int64)
  n = lengths_N.shape[0]
  if n == 0:
    empty = np.zeros((0, seq_len), np.int32)
    return empty, empty
  total = int(lengths_N.sum()) + n  # each document plus its EOT
  m = -(-total // seq_len)
  eot_P = np.cumsum(lengths_N + 1) - 1  # stream position of each document's EOT
  is_eot = np.zeros(total, bool)
  is_eot[eot_P] = True
  stream = np.full(m * seq_len, pad_id, np.int32)
  stream[:total][is_eot] = eot_id
  stream[:total][~is_eot] = tokens
  doc = np.full(m * seq_len, -1, np.int64)  # the document at each position; -1 is padding
  doc[:total] = np.repeat(np.arange(n), lengths_N + 1)
  doc_MxT = doc.reshape(m, seq_len)
  # Every sequence starts with a real token (only the tail of the last one is padding).
  segment_ids_MxT = np.where(doc_MxT >= 0, doc_MxT - doc_MxT[:, :1] + 1, 0).astype(np.int32)
  return stream.reshape(m, seq_len), segment_ids_MxT


def write_shard(path: str, tokens: np.ndarray, lengths_N: np.ndarray, leaf: int, seq_len: int, eot_id: int,
                dtype: np.dtype) -> tuple[int, int]:
  """Packs one leaf's documents into an ArrayRecord file at `path` (POSIX; none when there
  is no document); (sequences, non-padding tokens)."""
  if not len(lengths_N):
    return 0, 0
  tokens_MxT, segment_ids_MxT = pack(tokens, lengths_N, seq_len, eot_id, pad_id=eot_id)
  with atomic_path(path) as tmp:  # a retried bundle rewrites the same bytes
    writer = ArrayRecordWriter(str(tmp), 'group_size:1')
    for t_T, s_T in zip(tokens_MxT, segment_ids_MxT):
      writer.write(layout.encode(t_T, s_T, leaf, dtype))
    writer.close()
  return tokens_MxT.shape[0], int((segment_ids_MxT > 0).sum())
