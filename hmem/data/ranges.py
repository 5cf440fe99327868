"""A corpus cut into ranges, the unit of work of `hmem prepare`'s passes.

Workers read ranges independently and in parallel, so one large file keeps every worker
busy, and what a worker holds is bounded by its chunk of documents, never by a file:

  JSONL          byte ranges of RANGE_BYTES; a line belongs to the range its first byte
                 is in (a cut inside a line, or inside a multi-byte character, is resolved
                 by the reader: only a newline ends a line, and it never occurs inside one)
  Parquet        consecutive row groups, up to RANGE_BYTES of (uncompressed) data each
  .gz, .zst      the whole file, read as one stream (a compressed stream has no offsets
  and .txt       to start from)

Cutting reads no data: a file's size, and a Parquet file's footer. A document keeps its
key (file, line or row), which decides the samples, the held-out split and the packing
order, so the output does not depend on the cut. A Parquet range knows the row its first
group starts at; a byte range past the first of its file knows its first line only once
the lines before it are counted (`count_lines`, one cheap pass over the bytes, in
parallel), which `first_keys` turns into each range's first key.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from hmem.data.inputs import Range, file_format, stamp
from hmem.errors import DataError
from hmem.files import as_path

RANGE_BYTES = 16 << 20  # ~10k-100k documents: a few ranges a worker even for a 100 MB file
_COUNT_BLOCK = 16 << 20


def plan_ranges(files: list[str], range_bytes: int = RANGE_BYTES, columns=frozenset()) -> list[Range]:
  """The ranges of `files` (in order), cut from sizes and Parquet footers only.

  `columns`: fields that every Parquet file must have (those data.filter reads).
  """
  ranges = []
  for f, path in enumerate(files):
    for unit, start, stop, first in _cut(path, range_bytes, columns):
      ranges.append(Range(len(ranges), f, path, unit, start, stop, first))
  return ranges


def _cut(path: str, range_bytes: int, columns) -> list[tuple[str, int, int, int]]:
  """(unit, start, stop, first) of each range of one file."""
  fmt, compressed = file_format(path), path.lower().endswith(('.gz', '.zst'))
  if fmt == 'jsonl' and not compressed:
    size = stamp(path).size
    return [('bytes', a, min(a + range_bytes, size), 0 if a == 0 else -1) for a in range(0, max(size, 1), range_bytes)]
  if fmt != 'parquet':
    return [('file', 0, 0, 0)]
  with as_path(path).open('rb') as f:
    meta = pq.ParquetFile(f).metadata
  if missing := sorted(set(columns) - set(meta.schema.to_arrow_schema().names)):
    raise DataError(f'data.filter reads {missing}, which {path} lacks (its columns: '
                    f'{meta.schema.to_arrow_schema().names}); fix the filter or the input')
  if not meta.num_row_groups:
    return [('file', 0, 0, 0)]
  cuts, rows, size = [], 0, 0
  for g in range(meta.num_row_groups):
    if g == 0 or size >= range_bytes:
      cuts.append([g, g, rows])
      size = 0
    cuts[-1][1] = g + 1
    group = meta.row_group(g)
    rows, size = rows + group.num_rows, size + group.total_byte_size
  return [('row_groups', start, stop, first) for start, stop, first in cuts]


def count_lines(rng: Range) -> int:
  """The lines that start in a byte range: the newlines in [start - 1, stop - 1) (each
  starts a line unless it ends the file), plus the file's first line."""
  size = stamp(rng.path).size
  lo, hi = max(rng.start - 1, 0), min(rng.stop, size) - 1
  count = int(rng.start == 0 and size > 0)
  with as_path(rng.path).open('rb') as f:
    f.seek(lo)
    while lo < hi:
      block = f.read(min(_COUNT_BLOCK, hi - lo))
      if not block:
        break
      count += block.count(b'\n')
      lo += len(block)
  return count


def first_keys(ranges: list[Range], counts: dict[int, int]) -> dict[int, int]:
  """{range id: key of its first record}; `counts` has the lines of each byte range that
  another range of its file follows."""
  first = {}
  for prev, rng in zip([None, *ranges], ranges):
    first[rng.id] = rng.first if rng.first >= 0 else first[prev.id] + counts[prev.id]
  return first


def counted(ranges: list[Range]) -> list[Range]:
  """The ranges whose lines must be counted: those followed by a range of unknown first key."""
  return [rng for rng, nxt in zip(ranges, ranges[1:]) if nxt.first < 0]
