"""Raw documents from JSONL, Parquet and plain-text files, optionally gzip- or zstd-compressed.

A corpus is a file, a directory (searched recursively) or a glob, local or on an object
store (gs://, s3://: read through etils.epath, where a glob's `**` is refused because each
level would be one more listing). Its files are sorted,
and every document gets a stable key (file index in that sorted list, line or row index),
which fixes the packing order and the held-out split whatever the number of processes.
Kept documents are exactly the text that was stored. Records that cannot be used are
skipped and counted by reason, never dropped silently; problems the user must fix
(a missing path, an unreadable file, no usable document) raise `DataError`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import io
import itertools
import json
import os
import re
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from etils import epath

from hmem.errors import DataError
from hmem.files import as_path, is_remote

_FORMATS = {'.jsonl': 'jsonl', '.ndjson': 'jsonl', '.json': 'jsonl', '.parquet': 'parquet',
            '.txt': 'text'}
_COMPRESSIONS = ('.gz', '.zst')
_GLOB = re.compile(r'[*?[]')
SUPPORTED = ('.jsonl/.ndjson/.json (one JSON object a line), .parquet or .txt (one document a '
             'file); all but .parquet may be .gz or .zst compressed')


class Stamp(NamedTuple):
  """What tells that an input file changed: its size and modification time."""

  size: int
  mtime: float   # seconds
  mtime_ns: int


def stamp(path: str) -> Stamp:
  """The file's Stamp. Local files keep os.stat's nanosecond mtime (a file rewritten within
  the same second is still seen to change); an object store's has whole seconds."""
  if is_remote(path):
    st = as_path(path).stat()
    return Stamp(st.length, float(st.mtime), st.mtime * 10**9)
  st = os.stat(path)
  return Stamp(st.st_size, st.st_mtime, st.st_mtime_ns)


class Document(NamedTuple):
  file: int   # index in the sorted file list
  index: int  # line (JSONL), row (Parquet) or 0 (one text file is one document)
  text: str


@dataclasses.dataclass
class ReadStats:
  """Records seen, documents kept, and skipped records by reason."""

  read: int = 0
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def skip(self, reason: str, count: int = 1) -> None:
    self.read += count
    self.skipped[reason] += count

  def keep(self) -> None:
    self.read += 1
    self.kept += 1

  def add(self, other: 'ReadStats') -> None:
    self.read += other.read
    self.kept += other.kept
    self.skipped.update(other.skipped)

  def to_json(self) -> dict:
    return {'read': self.read, 'kept': self.kept, 'skipped': dict(sorted(self.skipped.items()))}

  @classmethod
  def from_json(cls, d: dict) -> 'ReadStats':
    return cls(d['read'], d['kept'], collections.Counter(d['skipped']))


def file_format(path: str) -> str | None:
  """'jsonl', 'parquet', 'text', or None for a file hmem cannot read."""
  stem, ext = os.path.splitext(path.lower())
  if ext in _COMPRESSIONS:
    stem, ext = os.path.splitext(stem)
    if ext == '.parquet':  # Parquet compresses internally; a compressed wrapper is an error
      return None
  return _FORMATS.get(ext)


def list_files(path_or_glob: str) -> tuple[list[str], list[str]]:
  """(readable files, unsupported files), each sorted, of a file, directory or glob.

  Local paths come back absolute, object-store ones as URLs (gs://bucket/...).
  """
  path = as_path(path_or_glob)
  if path.is_file():
    if file_format(path_or_glob) is None:
      raise DataError(f'input {path_or_glob!r} has an unsupported format; use {SUPPORTED}')
    return [str(path)], []
  if path.is_dir():
    found = _walk(path)
  else:
    found = [p for p in _glob(path_or_glob) if as_path(p).is_file()]
    if not found:
      raise DataError(f'input {path_or_glob!r} does not exist or matches no file; '
                      'pass an existing file, directory or glob')
  found = sorted(found)
  files = [p for p in found if file_format(p) is not None]
  if not files:
    raise DataError(f'input {path_or_glob!r} holds no readable file ({len(found)} files of other '
                    f'types); use {SUPPORTED}')
  return files, [p for p in found if file_format(p) is None]


def _walk(directory: epath.Path) -> list[str]:
  """Every file under `directory`, recursively, as `directory`/relative path."""
  found, top = [], None
  for root, _, names in directory.walk():
    # On an object store the roots come without their scheme (fsspec's walk): only their
    # part below the top (the first root) is used.
    top = str(root) if top is None else top
    below = str(root)[len(top):]
    found.extend(f'{directory}{below}/{name}' for name in names)
  return found


def _glob(pattern: str) -> list[str]:
  """Absolute paths (local) or URLs matching `pattern`; locally `**` spans directories."""
  if not is_remote(pattern):
    return [os.path.abspath(p) for p in glob.glob(pattern, recursive=True)]
  parts = pattern.split('/')
  first = next((i for i, part in enumerate(parts) if _GLOB.search(part)), len(parts))
  rest = '/'.join(parts[first:])
  if '**' in rest:
    raise DataError(f'input {pattern!r}: a recursive ** glob is not supported on an object store; '
                    'pass the directory (read recursively) or a glob with * in each level')
  if not rest:
    return []
  return [str(p) for p in as_path('/'.join(parts[:first])).glob(rest)]


class Range(NamedTuple):
  """A part of one input file that a worker reads on its own (ranges.py cuts them).

  unit 'bytes': the JSONL lines whose first byte lies in [start, stop); 'row_groups': the
  Parquet row groups start..stop-1; 'file': the whole file, read as one stream (compressed
  files, text files). `first` is the key of the range's first record (its line or row in
  the file), or -1 when it is only known once the lines before the range are counted.
  """

  id: int     # position among the corpus's ranges, which are in (file, start) order
  file: int   # index in the sorted file list
  path: str
  unit: str
  start: int
  stop: int
  first: int


def read_documents(path: str, file_index: int, text_field: str, stats: ReadStats) -> Iterator[Document]:
  """The kept documents of one file, in order; `stats` counts every record as it is read."""
  return read_range(Range(0, file_index, path, 'file', 0, 0, 0), text_field, stats)


def read_range(rng: Range, text_field: str, stats: ReadStats, keep=None) -> Iterator[Document]:
  """The kept documents of one range (its `first` known), in order; `stats` counts every
  record as it is read. `keep`: a filters.RecordFilter, or None; the records it drops are
  counted as 'filtered'. Records stream: nothing holds a whole range."""
  if rng.first < 0:
    raise ValueError(f'range {rng}: the key of its first record is not known yet')
  reader = {'jsonl': _read_jsonl, 'parquet': _read_parquet, 'text': _read_text}[file_format(rng.path)]
  try:
    yield from reader(rng, text_field, stats, keep)
  except (OSError, EOFError, zstandard.ZstdError, pa.ArrowException) as e:
    raise DataError(f'cannot read {rng.path} ({type(e).__name__}: {e}); fix or remove the file') from None


def skip_reason(text) -> str | None:
  """Why a document's text cannot be used, or None to keep it (also the check of eval's and
  generate's texts: what prepare would skip, they skip or refuse for the same reason)."""
  if text is None:
    return 'missing_field'
  if not isinstance(text, str):
    return 'non_string_field'
  if not text.strip():
    return 'empty'
  try:
    text.encode('utf-8')  # JSON can smuggle in lone surrogates, which no tokenizer accepts
  except UnicodeEncodeError:
    return 'invalid_unicode'
  return None


@contextlib.contextmanager
def _open(path: str) -> Iterator[BinaryIO]:
  """The file's bytes, decompressed."""
  ext = os.path.splitext(path.lower())[1]
  with as_path(path).open('rb') as raw:
    if ext == '.gz':
      with gzip.GzipFile(fileobj=raw, mode='rb') as f:
        yield f
    elif ext == '.zst':
      reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
      with io.BufferedReader(reader) as f:
        yield f
    else:
      yield raw


def jsonl_record(line: bytes) -> tuple[str | None, dict | None]:
  """(why the line cannot be used, None) or (None, the JSON object it holds)."""
  if not line.strip():
    return 'blank_line', None
  try:
    record = json.loads(line.decode('utf-8'))
  except UnicodeDecodeError:
    return 'non_utf8', None
  except json.JSONDecodeError:
    return 'malformed_json', None
  if not isinstance(record, dict):
    return 'not_an_object', None
  return None, record


def _lines(rng: Range) -> Iterator[bytes]:
  """The range's lines: those that start in [start, stop) of a byte range (the line that
  straddles `start` belongs to the range before), or every line of a whole file."""
  if rng.unit == 'file':
    with _open(rng.path) as f:
      yield from f
    return
  with as_path(rng.path).open('rb') as f:
    pos = rng.start
    if pos:  # skip the rest of the line that began before the range (nothing when pos - 1 is a newline)
      f.seek(pos - 1)
      pos += len(f.readline()) - 1
    while pos < rng.stop and (line := f.readline()):
      pos += len(line)
      yield line


def _read_jsonl(rng, text_field, stats, keep):
  for line_index, line in enumerate(_lines(rng), rng.first):
    reason, record = jsonl_record(line)
    if not reason and keep is not None and not keep.keeps(record):
      reason = 'filtered'
    text = record.get(text_field) if record is not None else None
    if reason := reason or skip_reason(text):
      stats.skip(reason)
      continue
    stats.keep()
    yield Document(rng.file, line_index, text)


def _read_text(rng, text_field, stats, keep):
  del text_field, keep  # the whole file is the document; prepare refuses a filter on text files
  with _open(rng.path) as f:
    data = f.read()
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError:
    stats.skip('non_utf8')
    return
  if reason := skip_reason(text):
    stats.skip(reason)
    return
  stats.keep()
  yield Document(rng.file, 0, text)


def _read_parquet(rng, text_field, stats, keep):
  with as_path(rng.path).open('rb') as f:
    pf = pq.ParquetFile(f)
    groups = range(rng.start, rng.stop) if rng.unit == 'row_groups' else range(pf.metadata.num_row_groups)
    yield from _read_row_groups(pf, list(groups), rng.file, rng.first, text_field, stats, keep)


def _read_row_groups(pf, groups, file_index, first, text_field, stats, keep):
  rows = sum(pf.metadata.row_group(g).num_rows for g in groups)
  schema = pf.schema_arrow
  if text_field not in schema.names:
    stats.skip('missing_field', rows)
    return
  column_type = schema.field(text_field).type
  is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
  is_bytes = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
  if not (is_text or is_bytes):
    stats.skip('non_string_field', rows)
    return
  if not groups:
    return
  columns = [text_field, *sorted((keep.columns if keep else set()) - {text_field})]
  start = first  # the key of the batch's first row
  for batch in pf.iter_batches(batch_size=8192, row_groups=groups, columns=columns):
    passes_B = _filtered(batch, keep) if keep is not None else itertools.repeat(True)
    for row, value, passes in zip(itertools.count(start), batch.column(0).to_pylist(), passes_B):
      reason = None if passes else 'filtered'
      if not reason and is_bytes and value is not None:
        try:
          value = value.decode('utf-8')
        except UnicodeDecodeError:
          reason = 'non_utf8'
      if reason := reason or skip_reason(value):
        stats.skip(reason)
      else:
        stats.keep()
        yield Document(file_index, row, value)
    start += batch.num_rows


def _filtered(batch: pa.RecordBatch, keep) -> list[bool]:
  """Whether each row of the batch passes the filter (its columns are in the batch)."""
  columns = {name: batch.column(name).to_pylist() for name in keep.columns if name in batch.schema.names}
  return [keep.keeps({name: values[i] for name, values in columns.items()}) for i in range(batch.num_rows)]
