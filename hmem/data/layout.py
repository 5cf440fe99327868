"""The on-disk layout of a prepared dataset: file names, and the bytes of one sequence.

A dataset directory holds manifest.json, tokenizer.json, tree.npz, the embedder's files,
and per split ArrayRecord shards named by `shard_name`. Each record is one packed
sequence (no pickle, no protobuf), little-endian:

  header    24 bytes: magic b'HMSQ', u8 format version (1), u8 token width in bytes (2 or 4),
            u16 zero, u32 seq_len, u32 number of segments n, i64 leaf id
  tokens    seq_len unsigned ints of the token width
  lengths   n u32: the lengths of segments 1..n, in order; the positions after them are
            padding (segment id 0)

The directory must be on a POSIX filesystem (a local disk, NFS, or a bucket mounted with
gcsfuse): the open-source array_record reads and writes only POSIX files, and
`hmem prepare` memory-maps its embedding cache. `check_posix`
refuses an object-store URL for it up front. The small files (manifest, tokenizer, tree,
embedder) are read through etils.epath, so runs and bundles may copy them anywhere.

Segment ids are stored as run lengths because packing makes them runs 1, 1, .., 2, 2, ..,
n, 0, .., 0: a few bytes instead of seq_len more integers. Tokens take 2 bytes each while
the vocabulary fits in 16 bits.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from hmem.errors import DataError
from hmem.files import is_remote

FORMAT, VERSION = 'hmem-prepared', 1  # manifest['format'], manifest['version']
MANIFEST = 'manifest.json'
SPLITS = ('train', 'eval')
_MAGIC = b'HMSQ'
_RECORD_VERSION = 1
_HEADER = struct.Struct('<4sBBHIIq')


def check_posix(path: str, what: str) -> None:
  """Raises DataError if `path` (named `what` in the message) is an object-store URL."""
  if is_remote(path):
    raise DataError(f'{what}={path!r} is on an object store, but dataset shards (ArrayRecord) and '
                    "prepare's memory-mapped files need a POSIX filesystem; mount the bucket with "
                    'gcsfuse (or use a local/NFS path) and pass the mount path')


def shard_name(split: str, shard: int, shards: int) -> str:
  return f'{split}-{shard:05d}-of-{shards:05d}.array_record'


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned dtype that holds every token id."""
  return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<u4')


def encode(tokens_T: np.ndarray, segment_ids_T: np.ndarray, leaf_id: int, dtype: np.dtype) -> bytes:
  """One record; `segment_ids_T` must be packed runs 1..n followed by zeros."""
  num_segments = int(segment_ids_T.max(initial=0))
  lengths_S = np.bincount(segment_ids_T, minlength=num_segments + 1)[1:]
  used = int(lengths_S.sum())
  expected_T = np.repeat(np.arange(1, num_segments + 1), lengths_S)
  if not (np.array_equal(segment_ids_T[:used], expected_T) and not segment_ids_T[used:].any()):
    raise ValueError('segment ids are not runs 1..n followed by padding zeros')
  header = _HEADER.pack(_MAGIC, _RECORD_VERSION, dtype.itemsize, 0, tokens_T.shape[0], num_segments,
                        leaf_id)
  return header + tokens_T.astype(dtype).tobytes() + lengths_S.astype('<u4').tobytes()


def decode_batch(records: Sequence[bytes], seq_len: int) -> dict[str, np.ndarray]:
  """Records -> {tokens, segment_ids: [B, seq_len], leaf_id: [B]}, int32 as the trainer takes them."""
  b = len(records)
  tokens_BxT = np.empty((b, seq_len), np.int32)
  segment_ids_BxT = np.zeros((b, seq_len), np.int32)
  leaf_B = np.empty(b, np.int32)
  for i, record in enumerate(records):
    magic, version, width, _, length, num_segments, leaf = _HEADER.unpack_from(record)
    if magic != _MAGIC or version != _RECORD_VERSION or length != seq_len:
      raise ValueError(f'not an hmem v{_RECORD_VERSION} sequence record of length {seq_len} '
                       f'(magic {magic!r}, version {version}, length {length})')
    tokens_BxT[i] = np.frombuffer(record, f'<u{width}', seq_len, _HEADER.size)
    lengths_S = np.frombuffer(record, '<u4', num_segments, _HEADER.size + seq_len * width)
    used = int(lengths_S.sum())
    segment_ids_BxT[i, :used] = np.repeat(np.arange(1, num_segments + 1, dtype=np.int32), lengths_S)
    leaf_B[i] = leaf
  return {'tokens': tokens_BxT, 'segment_ids': segment_ids_BxT, 'leaf_id': leaf_B}
