"""hmem.files on a local directory and on an object store (a fake gs://, tests/object_store.py)."""

import pytest

from hmem.files import as_path, atomic_path, atomic_write, is_remote, open_append


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'local')
  request.getfixturevalue('gcs')
  return 'gs://bucket/run'


def test_paths():
  assert is_remote('gs://b/x') and is_remote('s3://b/x') and not is_remote('/tmp/x') and not is_remote('rel/x')
  assert str(as_path('gs://b/x')) == 'gs://b/x'
  assert as_path('rel/x').is_absolute()


def test_atomic_write_replaces_whole_or_keeps_old(root):
  path = as_path(root) / 'config.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_write(path) as f:
    f.write('old')
  with pytest.raises(RuntimeError):
    with atomic_write(path) as f:
      f.write('half')
      raise RuntimeError('killed')
  assert path.read_text() == 'old'
  assert sorted(p.name for p in path.parent.iterdir()) == ['config.json']  # no temporary left behind
  with atomic_write(path, 'wb') as f:
    f.write(b'new')
  assert path.read_bytes() == b'new'


def test_atomic_directory(root):
  out = as_path(root) / 'bundle'
  out.parent.mkdir(parents=True, exist_ok=True)
  with pytest.raises(RuntimeError):
    with atomic_path(out) as tmp:
      tmp.mkdir()
      (tmp / 'a').write_text('x')
      raise RuntimeError('killed')
  assert list(out.parent.iterdir()) == []
  with atomic_path(out) as tmp:
    tmp.mkdir()
    (tmp / 'a').write_text('x')
  assert (out / 'a').read_text() == 'x'


def test_append_survives_reopen(root):
  path = as_path(root) / 'metrics.jsonl'
  path.parent.mkdir(parents=True, exist_ok=True)
  f = open_append(path)
  f.write('1\n')
  f.flush()
  assert path.read_text() == '1\n'  # visible after a flush, before close
  f.write('2\n')
  f.close()
  with open_append(path) as f:
    f.write('3\n')
  assert path.read_text() == '1\n2\n3\n'
  with open_append(as_path(root) / 'events', binary=True) as f:
    f.write(b'\x00\x01')
  assert (as_path(root) / 'events').read_bytes() == b'\x00\x01'
