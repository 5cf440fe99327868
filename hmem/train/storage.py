"""Storage faults (full disk, quota, read-only or unwritable workdir) as one-line errors,
and which read errors are transient.

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


# Read errors that say nothing about the files: tensorstore's status codes and messages.
_TRANSIENT = re.compile(r'DEADLINE_EXCEEDED|UNAVAILABLE|RESOURCE_EXHAUSTED|ABORTED|CANCELLED|timed out|timeout|'
                        r'out of memory', re.IGNORECASE)
# OS errors that do: the file or directory is not there.
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


def _chain(exc: BaseException | None):
  """`exc` and its causes."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def _errno(exc: BaseException) -> int | None:
  code = getattr(exc, 'errno', None) if isinstance(exc, OSError) else None
  if code is None:
    match = _CODE.search(str(exc))
    code = int(match.group(1) or match.group(2)) if match else None
  return code


def storage_errno(exc: BaseException) -> int | None:
  """The storage errno behind `exc` (or its causes), if a storage fault caused it."""
  return next((code for e in _chain(exc) if (code := _errno(e)) in STORAGE_ERRNOS), None)


def transient_read_error(exc: BaseException) -> bool:
  """Whether a failed checkpoint read says nothing about the files: a timeout, lack of
  memory, an unreachable store, or an I/O error other than a missing file. Anything else
  (a missing item, a truncated or unparsable file) is damage."""
  for e in _chain(exc):
    if isinstance(e, (TimeoutError, MemoryError, ConnectionError)) or _TRANSIENT.search(str(e)):
      return True
    code = _errno(e)
    if isinstance(e, OSError) and code is not None and code not in _MISSING_ERRNOS:
      return True
  return False


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
