"""Atomic file writes: a reader (or a resumed run) sees a whole file or the old one, never part."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside `path` to write (a file or a directory); when the block
  succeeds it replaces `path` in one rename, when it fails it is removed. The name is unique
  per process and call, so processes sharing a directory never write the same temporary."""
  tmp = f'{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_kwargs):
  """`open(path, mode)` whose content appears at `path` only once the block completes."""
  with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
    yield f
