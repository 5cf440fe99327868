"""A fake `gs://` object store for tests: etils.epath's fsspec backend, pointed at a local
directory, and tensorstore's `gs://` kvstore redirected to the same directory. Code that
reaches files only through epath and tensorstore then runs unchanged against it; code that
calls `open`/`os.path` on a `gs://` path fails, which is what the tests look for."""

from __future__ import annotations

import contextlib

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_classes  # pylint: disable=protected-access
from orbax.checkpoint._src.path import gcs_utils


def _fake_gcs(root: str):

  class FakeGCS(DirFileSystem):
    protocol = ('gs', 'gcs')
    cachable = False

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del args, finalize_on_close, kwargs
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))  # objects need no parent

    def _join(self, path):
      if isinstance(path, str):
        path = path.removeprefix('gs://').removeprefix('gcs://')
      elif isinstance(path, (list, tuple)):
        path = [p.removeprefix('gs://').removeprefix('gcs://') for p in path]
      return super()._join(path)

    def mv(self, path1, path2, recursive=False, **kwargs):
      return self.fs.mv(self._join(path1), self._join(path2), recursive=recursive, **kwargs)

  return FakeGCS


@contextlib.contextmanager
def fake_gcs(root, monkeypatch):
  """Makes `gs://BUCKET/...` mean `root/BUCKET/...` for epath and for tensorstore."""
  cls = _fake_gcs(str(root))
  saved = {name: fsspec_classes.get(name) for name in cls.protocol}  # pylint: disable=protected-access
  for name in cls.protocol:
    fsspec.register_implementation(name, cls, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  from hmem.bundle import export, format, reader, stored
  kvstore = reader.kvstore

  def local_kvstore(bundle_root, path):
    bundle_root = str(bundle_root)
    if bundle_root.startswith('gs://'):
      bundle_root = f'{root}/{bundle_root.removeprefix("gs://")}'
    return kvstore(bundle_root, path)

  for module in (reader, format, export, stored):
    monkeypatch.setattr(module, 'kvstore', local_kvstore)
  # orbax: its tensorstore kvstore for gs:// onto the directory, and a bucket without
  # hierarchical namespace (asking GCS which would need google-cloud-storage).
  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs',
                      lambda path: {'driver': 'file', 'path': f'{root}/{str(path).removeprefix("gs://")}'})
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  try:
    yield
  finally:
    for name, old in saved.items():
      fsspec_classes.pop(name, None)  # pylint: disable=protected-access
      if old is not None:
        fsspec.register_implementation(name, old, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
