"""Files on any filesystem etils.epath reaches (local, gs://, s3://, ...), written so a reader
(or a resumed run) sees a whole file or the old one, never part.

Every workdir, dataset and bundle path goes through `as_path`, so the same code serves a
local directory and an object store. Two things differ on an object store, and only here:
it has no rename (but an object appears whole once written, so writing in place is already
atomic), and it cannot append (so an appended file is kept in memory and the object is
rewritten on each flush).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import uuid

from etils import epath

_SCHEME = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path; a local path is made absolute (its meaning must not change
  when a later call runs from another directory)."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(os.path.expanduser(path)))


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store (it has a URL scheme: gs://, s3://, ...)."""
  return bool(_SCHEME.match(os.fspath(path)))


def sha256(path: str | os.PathLike) -> str:
  """The file's sha256 (hex), read in 4 MB pieces."""
  digest = hashlib.sha256()
  with as_path(path).open('rb') as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies a file between any two filesystems (epath's own copy stays within one)."""
  as_path(dst).write_bytes(as_path(src).read_bytes())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
  """Yields a path to write (a file or a directory) that appears at `path` whole.

  Local: a temporary beside `path`, renamed onto it when the block succeeds and removed when
  it fails; the name is unique per process and call, so processes sharing a directory never
  write the same temporary. Object store (no rename): `path` itself, which must be new, so
  a directory written this way must write the file that marks it complete last; what a
  failed block wrote is removed.
  """
  path = as_path(path)
  tmp = path if is_remote(path) else path.parent / f'{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    yield tmp
    if tmp != path:
      tmp.replace(path)
  except BaseException:
    if tmp.is_dir():
      tmp.rmtree(missing_ok=True)
    else:
      tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'w', **open_kwargs):
  """`open(path, mode)` whose content appears at `path` only once the block completes (on an
  object store the content is kept in memory and written as one object at the end)."""
  path = as_path(path)
  if not is_remote(path):
    with atomic_path(path) as tmp, tmp.open(mode, **open_kwargs) as f:
      yield f
    return
  binary = 'b' in mode
  with io.BytesIO() if binary else io.StringIO(newline=open_kwargs.get('newline')) as f:
    yield f
    data = f.getvalue()
  path.write_bytes(data if binary else data.encode(open_kwargs.get('encoding') or 'utf-8'))


class _ObjectAppender(io.BytesIO):
  """A binary file open for appending to an object: the object is rewritten whole on every
  flush (object stores cannot append). Meant for logs flushed every few seconds."""

  def __init__(self, path: epath.Path):
    super().__init__(path.read_bytes() if path.exists() else b'')
    self.seek(0, io.SEEK_END)
    self._path = path

  def flush(self) -> None:
    super().flush()
    if not self.closed:
      self._path.write_bytes(self.getvalue())

  def close(self) -> None:
    if not self.closed:
      self.flush()
    super().close()


def open_append(path: str | os.PathLike, binary: bool = False):
  """`path` open for appending (text, UTF-8, unless `binary`), on any filesystem."""
  path = as_path(path)
  raw = _ObjectAppender(path) if is_remote(path) else open(path, 'ab')
  return raw if binary else io.TextIOWrapper(raw, encoding='utf-8', write_through=True)
