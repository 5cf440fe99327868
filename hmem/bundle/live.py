"""A served bundle that follows its edits: the bank rows of its latest committed manifest.

`hmem bank drop/replace` commit an edit by replacing manifest.json (hmem.bundle.edit). A
LiveBank checks the manifest before each read (a stat on a local disk; on an object store
a fresh read at most every `check_every` seconds); on a new one it checksums the files
that changed, opens a Reader of the new array versions and swaps it in, so rows read from
then on are the edited ones and rows already read stay as they were. Cached rows of tables
the edit left alone move to the new Reader. An edit keeps the versions it replaced until
the next edit of the same arrays, and a read that fails because a later edit removed its
version is retried against the latest manifest: no read fails because of an edit. A new
manifest that changes more than the bank (the bundle exported again in place) is not an
edit: it is logged and the old one served on (restart the server to serve it).

`version` counts the edits committed to the bundle (its manifest's `edits` log).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from absl import logging

from hmem.bundle.format import MANIFEST, read_manifest, verify
from hmem.bundle.open import bank_reader
from hmem.bundle.reader import Reader
from hmem.errors import BundleError
from hmem.files import as_path, is_remote

T = TypeVar('T')
_BANK_KEYS = ('bank', 'files', 'edits')  # what an edit may change in a manifest


def _fixed(manifest: dict) -> dict:
  """What an edit leaves unchanged: all but the bank, its files' checksums and the edit log."""
  return {**{k: v for k, v in manifest.items() if k not in _BANK_KEYS},
          'files': {name: digest for name, digest in manifest['files'].items() if not name.startswith('bank/')}}


class LiveBank:
  """The bank rows of a bundle that may be edited while it is read (module docstring)."""

  def __init__(self, reader: Reader, manifest: dict, check_every: float = 1.0):
    self.root, self.reader, self.manifest = reader.root, reader, manifest
    self.version = len(manifest.get('edits', []))
    self._path = as_path(self.root) / MANIFEST
    self._remote = is_remote(self.root)
    self._check_every, self._checked = check_every, time.monotonic()
    self._signature = self._stat()
    self._lock = threading.Lock()

  def _stat(self):
    if self._remote:
      return None
    st = os.stat(self._path)
    return st.st_ino, st.st_mtime_ns, st.st_size

  def _changed(self) -> bool:
    if self._remote:
      if time.monotonic() - self._checked < self._check_every:
        return False
      self._checked = time.monotonic()
      return True  # read and compared in refresh
    return self._stat() != self._signature

  def refresh(self, force: bool = False) -> tuple[int, Reader]:
    """(version, Reader) of the latest committed manifest (swapped in if it is new; `force`:
    read it even on an object store within `check_every` of the last look)."""
    with self._lock:
      if force or self._changed():
        self._signature = self._stat()
        self._swap(read_manifest(self.root))
      return self.version, self.reader

  def _swap(self, manifest: dict) -> None:
    if manifest == self.manifest:
      return
    if json.dumps(_fixed(manifest), sort_keys=True) != json.dumps(_fixed(self.manifest), sort_keys=True):
      logging.error('%s was replaced by another export (not an edit of its bank); serving the bundle as it was: '
                    'restart the server to serve the new one', self.root)
      self.manifest = manifest  # logged once
      return
    changed = {name: digest for name, digest in manifest['files'].items() if self.manifest['files'].get(name) != digest}
    verify(self.root, {'files': changed})
    reader = bank_reader(self.root, manifest, self.reader.cache_bytes)
    kept = {key.split('/')[0] for key, meta in manifest['bank'].items()
            if self.manifest['bank'][key]['path'] == meta['path']}
    edited = {key.split('/')[0] for key, meta in manifest['bank'].items()
              if self.manifest['bank'][key]['path'] != meta['path']}
    reader.adopt(self.reader, kept - edited)
    version = len(manifest.get('edits', []))
    logging.info('%s: edit %d committed (%s); rows read from now on are the edited ones', self.root, version,
                 manifest.get('edits', [{}])[-1])
    self.manifest, self.reader, self.version = manifest, reader, version

  def read(self, fn: Callable[[Reader], T]) -> tuple[int, T]:
    """(version, fn(its Reader)) with the latest manifest's Reader; a read that fails after
    a newer edit removed the version it was reading is run again with the newer one."""
    version, reader = self.refresh()
    while True:
      try:
        return version, fn(reader)
      except BundleError:
        newer = self.refresh(force=True)
        if newer[1] is reader:
          raise
        version, reader = newer
