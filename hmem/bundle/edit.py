"""Editing a bundle's bank: drop (zero) or replace the rows of subtrees, each edit atomic.

A node LEVEL:ID names its subtree: its own row and the rows of every node below it, in
every level table (in a partial bundle, those of them it holds). `drop` zeroes them: an
FFN or LoRA row of zeros adds exactly nothing, as at init, and so does a KV row once the
whole path of a text is dropped (zero values; zero keys still take a share of the memory
softmax while other slots of the path are non-zero). `replace` copies them from another
bundle with the same bank shapes.

Atomicity: an edited array is written as a new version directory (`{name}.v{N+1}`) whose
unchanged chunks are hard links to the current version's (copies where links are not
possible, and on an object store), so on a local disk the edit costs the rows it changes.
The manifest is the commit point: it is replaced whole (a rename on a local disk, one
object write on an object store); until then readers see the old version whole, after it
the new one. Old and abandoned versions are removed after the commit and at the start of
the next edit.

Concurrency: on a local disk an edit holds an exclusive lock (`flock` on BUNDLE/.edit.lock,
released by the kernel if the process dies, so a crash leaves no stale lock); a second edit
waits for it, then starts from the manifest the first committed, so both edits land. On an
object store there is no such lock: run one edit of a bundle at a time there (two at once
can lose one edit, or remove the other's new version as abandoned).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import errno
import fcntl
import os
import sys

import numpy as np
from etils import epath

from hmem.bundle import format as bundle
from hmem.data.router import check_node
from hmem.errors import BundleError
from hmem.files import as_path, is_remote, sha256


def drop(root: str, nodes: list[tuple[int, int]]) -> dict:
  """Zeroes the rows of the given nodes' subtrees; returns the new manifest."""
  return _edit(root, nodes, {'op': 'drop'}, lambda key, meta, lo, hi: None)


def replace(root: str, other: str, nodes: list[tuple[int, int]]) -> dict:
  """Copies the rows of the given nodes' subtrees from bundle `other`; returns the new manifest."""
  theirs = bundle.read_manifest(other)
  bundle.verify(other, theirs)

  def rows(key, meta, lo, hi):
    their = theirs['bank'].get(key)
    if their is None or their['shape'] != meta['shape'] or their['dtype'] != meta['dtype']:
      raise BundleError(f'bundle {other}: bank array {key} is {their and (their["dtype"], their["shape"])}, '
                        f'not {(meta["dtype"], meta["shape"])} as in {root}; replace rows between bundles of one run')
    table = key.split('/')[0]
    held = bundle.present_rows(theirs['k'], theirs['depth'], table, meta['shape'][0], theirs['subtrees'])[lo:hi]
    if not held.all():
      raise BundleError(f'bundle {other} lacks rows {lo + int(np.argmin(held))}.. of {table} (a partial bundle)')
    return bundle.open_array(other, their['path'])[lo:hi].read().result()

  return _edit(root, nodes, {'op': 'replace', 'from': str(as_path(other))}, rows)


def _subtree_runs(k: int, depth: int, subtrees, table: str, rows: int, level: int, node: int) -> list:
  """[lo, hi) runs of `table`'s rows below node (level, node) that the bundle holds."""
  table_level = int(table.removeprefix('level'))
  if table_level < level:
    return []
  span = k**(table_level - level)
  lo, hi = node * span, (node + 1) * span
  return [(lo + a, lo + b) for a, b in bundle.true_runs(bundle.present_rows(k, depth, table, rows, subtrees)[lo:hi])]


def _link_or_copy(src: epath.Path, dst: epath.Path) -> None:
  if not is_remote(src):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.link(src, dst)
      return
    except OSError as e:
      if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
        raise
  src.copy(dst)


def _new_version(root: epath.Path, meta: dict, path: str, keep_R: np.ndarray) -> None:
  """Starts array version `path` from the current one: its metadata and the chunks of the
  rows in `keep_R` (the rows to rewrite are left out, so a write never goes through a link
  into the current version)."""
  zeros = ['0'] * (len(meta['shape']) - 1)
  names = ['zarr.json', *('/'.join(['c', str(row), *zeros]) for row in np.flatnonzero(keep_R))]
  src, dst = root / meta['path'], root / path
  try:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # an object store copies one object a request
      list(pool.map(lambda name: _link_or_copy(src / name, dst / name), names))
  except FileNotFoundError as e:
    raise BundleError(f'bundle {root}: {e.filename or e} is missing (a damaged bundle); export it again') from None


def _remove_unreferenced(root: epath.Path, manifest: dict) -> None:
  live = {meta['path'] for meta in manifest['bank'].values()}
  for path in root.glob('bank/*/*.v*'):
    if f'bank/{path.parent.name}/{path.name}' not in live:
      path.rmtree(missing_ok=True)


LOCK = '.edit.lock'


@contextlib.contextmanager
def _exclusive(root: epath.Path):
  """Holds the bundle's edit lock (local disks; see the module docstring for object stores)."""
  if is_remote(root):
    yield
    return
  with open(root / LOCK, 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'hmem: waiting for another edit of {root} to finish', file=sys.stderr, flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _edit(root: str, nodes, record: dict, new_rows) -> dict:
  root = as_path(root)
  bundle.read_manifest(root)  # a directory that is no bundle is refused before a lock file is left in it
  with _exclusive(root):
    return _edit_locked(root, nodes, record, new_rows)


def _edit_locked(root: epath.Path, nodes, record: dict, new_rows) -> dict:
  manifest = bundle.read_manifest(root)
  if manifest['dtype'] not in ('bfloat16', 'float32'):
    raise BundleError(f'bundle {root} has an {manifest["dtype"]} bank (rows share per-row scales): edit a '
                      'bfloat16 or float32 export of the run instead')
  bundle.verify(root, manifest)
  _remove_unreferenced(root, manifest)  # left by an edit that crashed
  k, depth = manifest['k'], manifest['depth']
  if not nodes:
    raise BundleError('give at least one --node LEVEL:ID')
  for level, node in nodes:
    check_node(level, node, k, depth)
  changes = {}
  for key, meta in manifest['bank'].items():
    table = key.split('/')[0]
    if table == 'generic':
      continue
    runs = [run for level, node in nodes
            for run in _subtree_runs(k, depth, manifest['subtrees'], table, meta['shape'][0], level, node)]
    if runs:
      changes[key] = runs

  new = copy.deepcopy(manifest)
  for key, runs in changes.items():
    table, name = key.split('/')
    meta = manifest['bank'][key]
    version = int(meta['path'].rsplit('.v', 1)[1]) + 1
    path = bundle.array_path(table, name, version)
    keep_R = bundle.present_rows(k, depth, table, meta['shape'][0], manifest['subtrees'])
    for lo, hi in runs:
      keep_R[lo:hi] = False
    _new_version(root, meta, path, keep_R)
    array = bundle.open_array(root, path)
    for lo, hi in runs:
      rows = new_rows(key, meta, lo, hi)
      if rows is None:
        rows = np.zeros((hi - lo, *meta['shape'][1:]), array.dtype.numpy_dtype)
      bundle.write_rows(array, lo, rows)
    new['bank'][key]['path'] = path
    del new['files'][f'{meta["path"]}/zarr.json']
    new['files'][f'{path}/zarr.json'] = sha256(root / path / 'zarr.json')
  new['files'] = dict(sorted(new['files'].items()))
  new.setdefault('edits', []).append({**record, 'nodes': [f'{level}:{node}' for level, node in nodes]})
  bundle.write_json(root / bundle.MANIFEST, new)  # the commit point
  _remove_unreferenced(root, new)
  return new
