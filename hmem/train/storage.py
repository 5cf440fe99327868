"""Storage faults (full disk, quota, read-only or unwritable workdir) as one-line errors.

They reach us as `OSError`s from our own writes, and from orbax's asynchronous writes as
tensorstore `ValueError`s whose message carries the OS error code; either way, possibly
as the cause of another exception.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re

from hmem.errors import CheckpointError

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


class StorageError(CheckpointError):
  """A write the run needs failed for lack of space or permission."""


def storage_errno(exc: BaseException) -> int | None:
  """The storage errno behind `exc` (or its causes), if a storage fault caused it."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    code = getattr(exc, 'errno', None) if isinstance(exc, OSError) else None
    if code is None:
      match = _CODE.search(str(exc))
      code = int(match.group(1) or match.group(2)) if match else None
    if code in STORAGE_ERRNOS:
      return code
    exc = exc.__cause__ or exc.__context__
  return None


def committed_steps(directory: str) -> list[int]:
  """Checkpoint steps whose write completed (orbax renames a step's temporary directory
  to the bare step number only once every item is written)."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


@contextlib.contextmanager
def checkpoint_writes(directory: str):
  """Turns a storage fault while checkpointing into a StorageError naming the last good step."""
  try:
    yield
  except Exception as e:
    code = storage_errno(e)
    if code is None:
      raise
    steps = committed_steps(directory)
    kept = (f'the last complete checkpoint, step {steps[-1]}, is intact and the run resumes from it'
            if steps else 'no checkpoint was completed')
    raise StorageError(f'writing a checkpoint to {directory} failed: {os.strerror(code)}; '
                       f'free space (or make it writable) and run again: {kept}') from e
