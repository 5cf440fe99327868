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

import orbax.checkpoint as ocp

from hmem.errors import CheckpointError
from hmem.files import as_path

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


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Checkpoint steps whose write completed, on any filesystem: orbax renames a step's
  temporary directory to the bare step number once every item is written, or, on an
  object store (no rename), writes the step in place and a commit marker in it last."""
  return sorted(ocp.utils.checkpoint_steps(str(as_path(directory))))


@contextlib.contextmanager
def checkpoint_writes(directory: str | os.PathLike):
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
