"""Data files on an object store (the fake gs:// of tests/object_store.py): what a run or a
bundle reads from a dataset (tokenizer, tree, embedder) round-trips there exactly as on a
local disk, and `hmem prepare` reads its corpus from gs:// but refuses a gs:// output."""

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_prepare import prepare, small_config, wiki_texts

from hmem.data import minilm
from hmem.data.embed import load_embedder
from hmem.data.embedder import CONFIG_FILE
from hmem.data.inputs import ReadStats, list_files, read_documents, stamp
from hmem.data.tfidf import TfidfEmbedder
from hmem.data.tokenizer import Tokenizer, tokenizer_file
from hmem.data.tree import Tree, route
from hmem.errors import DataError

TEXTS = ['The capital of France is Paris.', 'Planets orbit the sun; comets come and go.',
         'Bake the dough in a hot oven.', 'The striker scored a late goal.'] * 5


def test_tokenizer_and_tree_round_trip(gcs, tmp_path):
  tokenizer = Tokenizer.train(TEXTS, 300)
  tokenizer.save(str(tmp_path / 'tokenizer.json'))
  tokenizer.save('gs://bucket/data/tokenizer.json')
  stored = gcs / 'bucket' / 'data' / 'tokenizer.json'
  assert stored.read_bytes() == (tmp_path / 'tokenizer.json').read_bytes()
  # A directory holding one is found too (`hmem prepare --tokenizer RUN`).
  assert tokenizer_file('gs://bucket/data') == 'gs://bucket/data/tokenizer.json'
  loaded = Tokenizer.load('gs://bucket/data/tokenizer.json')
  assert loaded.identity == tokenizer.identity and loaded.eot_id == tokenizer.eot_id
  for got, want in zip(loaded.encode(TEXTS[:4]), tokenizer.encode(TEXTS[:4])):
    np.testing.assert_array_equal(got, want)

  rng = np.random.default_rng(0)
  tree = Tree(2, 2, (rng.normal(size=(2, 6)), rng.normal(size=(4, 6))))
  tree.save(str(tmp_path / 'tree.npz'))
  tree.save('gs://bucket/data/tree.npz')
  assert (gcs / 'bucket' / 'data' / 'tree.npz').read_bytes() == (tmp_path / 'tree.npz').read_bytes()
  remote = Tree.load('gs://bucket/data/tree.npz')
  assert (remote.k, remote.depth) == (2, 2)
  for got, want in zip(remote.centroids, tree.centroids):
    np.testing.assert_array_equal(got, want)
  x_NxD = rng.normal(size=(10, 6)).astype(np.float32)
  np.testing.assert_array_equal(route(remote, x_NxD), route(tree, x_NxD))


def test_tfidf_embedder_directory(gcs, tmp_path):
  embedder = TfidfEmbedder.fit(TEXTS, dim=3)
  local = tmp_path / 'local'
  embedder.save(str(local))
  embedder.save('gs://bucket/emb')
  stored = gcs / 'bucket' / 'emb'
  assert sorted(p.name for p in stored.iterdir()) == sorted(p.name for p in local.iterdir())
  for p in stored.iterdir():
    assert p.read_bytes() == (local / p.name).read_bytes(), p.name
  loaded = load_embedder('gs://bucket/emb')
  probe = TEXTS[:4] + ['a comet over the oven']
  np.testing.assert_array_equal(loaded.embed(probe), embedder.embed(probe))
  assert loaded.identity() == embedder.identity()


def test_minilm_weights_beside_the_embedder(gcs):
  """A bundle ships the MiniLM files under minilm/ beside embedder.json; on gs:// they are
  read (config, tokenizer, weights, hashes) without a local copy."""
  local = minilm.MiniLMEmbedder(batch_size=8)
  bundle = gcs / 'bucket' / 'bundle'
  (bundle / 'minilm').mkdir(parents=True)
  for name in ('model.safetensors', 'tokenizer.json', 'config.json'):
    (bundle / 'minilm' / name).symlink_to(f'{local.directory}/{name}')  # read through the store
  local.save('gs://bucket/bundle')
  config = json.loads((bundle / CONFIG_FILE).read_text())
  (bundle / CONFIG_FILE).write_text(json.dumps({**config, 'path': 'minilm'}))
  remote = load_embedder('gs://bucket/bundle')
  assert remote.directory == 'gs://bucket/bundle/minilm'
  assert remote.identity() == local.identity()
  np.testing.assert_array_equal(remote.embed(TEXTS[:4]), local.embed(TEXTS[:4]))
  with pytest.raises(DataError, match='lacks model.safetensors'):
    minilm.MiniLMEmbedder('gs://bucket/nothing')


def _corpus_files(texts):
  """{name: bytes}: the texts spread over every input kind."""
  lines = lambda ts: ''.join(json.dumps({'text': t}) + '\n' for t in ts).encode()
  parquet = io.BytesIO()
  pq.write_table(pa.table({'text': texts[70:80]}), parquet)
  return {'a.jsonl': lines(texts[:30]), 'b.jsonl.gz': gzip.compress(lines(texts[30:50])),
          'sub/c.jsonl.zst': zstandard.ZstdCompressor().compress(lines(texts[50:70])),
          'sub/d.parquet': parquet.getvalue(), 'sub/e.txt': texts[80].encode(), 'notes.md': b'x'}


def _write(root, files):
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)


def test_inputs_listed_and_read_from_an_object_store(gcs, tmp_path):
  texts = wiki_texts()[:81]
  _write(tmp_path / 'corpus', _corpus_files(texts))
  _write(gcs / 'bucket' / 'corpus', _corpus_files(texts))
  local, remote = str(tmp_path / 'corpus'), 'gs://bucket/corpus'

  def listed(root):
    files, unsupported = list_files(root)
    return [p.removeprefix(root) for p in files], [p.removeprefix(root) for p in unsupported]

  assert listed(remote) == listed(local) == (
      ['/a.jsonl', '/b.jsonl.gz', '/sub/c.jsonl.zst', '/sub/d.parquet', '/sub/e.txt'], ['/notes.md'])
  assert list_files(f'{remote}/*.jsonl*')[0] == [f'{remote}/a.jsonl', f'{remote}/b.jsonl.gz']
  assert list_files(f'{remote}/sub/c.jsonl.zst')[0] == [f'{remote}/sub/c.jsonl.zst']
  with pytest.raises(DataError, match='matches no file'):
    list_files(f'{remote}/*.parquet')
  with pytest.raises(DataError, match=r'recursive \*\* glob'):
    list_files(f'{remote}/**/*.jsonl')
  stats = ReadStats()
  docs = [d for i, p in enumerate(list_files(remote)[0]) for d in read_documents(p, i, 'text', stats)]
  assert [d.text for d in docs] == texts and stats.kept == 81 and not stats.skipped
  assert stamp(f'{remote}/a.jsonl').size == len(_corpus_files(texts)['a.jsonl'])


def _dataset_files(root):
  """{name: bytes} of a prepared dataset but its embedding cache (keyed by input path) and
  the manifest's fields that name the input (its path, and the fingerprint hashing it)."""
  out = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and p.name != 'manifest.json'}
  manifest = json.loads((root / 'manifest.json').read_text())
  return out, {k: v for k, v in manifest.items() if k not in ('input', 'fingerprint')}


def test_prepare_reads_a_corpus_on_an_object_store(gcs, tmp_path):
  texts = wiki_texts()[:90]
  lines = lambda ts: ''.join(json.dumps({'text': t}) + '\n' for t in ts).encode()
  corpus = {'a.jsonl': lines(texts[:50]), 'b.jsonl': lines(texts[50:])}
  _write(tmp_path / 'corpus', corpus)
  _write(gcs / 'bucket' / 'corpus', corpus)
  cfg = small_config('data.eval_fraction=0.2')
  prepare(cfg, str(tmp_path / 'corpus' / '*.jsonl'), str(tmp_path / 'local'), progress=False)
  remote = prepare(cfg, 'gs://bucket/corpus/*.jsonl', str(tmp_path / 'remote'), progress=False)
  assert remote['files'] == 2 and remote['documents_kept'] == 90 and remote['splits']['eval']['documents'] > 0
  assert _dataset_files(tmp_path / 'remote') == _dataset_files(tmp_path / 'local')
  assert any(p.suffix == '.array_record' for p in (tmp_path / 'remote').iterdir())
  # The cache keys the vectors by the object's URL, size and mtime: a rerun finds them all.
  sources = [json.loads(p.read_text())['source'] for p in (tmp_path / 'remote' / 'embed_cache').rglob('*.json')]
  assert sorted(s['file'] for s in sources) == ['gs://bucket/corpus/a.jsonl', 'gs://bucket/corpus/b.jsonl']
  # A rerun finds the dataset done (same objects, sizes and mtimes); a changed object is seen.
  assert prepare(cfg, 'gs://bucket/corpus/*.jsonl', str(tmp_path / 'remote'), progress=False) == remote
  (gcs / 'bucket' / 'corpus' / 'b.jsonl').write_bytes(lines(texts[50:-1]))
  with pytest.raises(DataError, match='prepared from other inputs'):
    prepare(cfg, 'gs://bucket/corpus/*.jsonl', str(tmp_path / 'remote'), progress=False)


def test_dataset_directory_on_an_object_store_is_refused_up_front(gcs, tmp_path, monkeypatch):
  """Shards (ArrayRecord) and prepare's memory-mapped files need POSIX files: a gs:// --out,
  embedding cache or data.path fails with the fix before any input is read or state built."""
  fix = 'on an object store.*mount the bucket with gcsfuse.*pass the mount path'
  missing = str(tmp_path / 'no-such-corpus')  # read first, it would fail with another message
  with pytest.raises(DataError, match=f"--out='gs://bucket/out' is {fix}"):
    prepare(small_config(), missing, 'gs://bucket/out', progress=False)
  with pytest.raises(DataError, match=f'data.embed_cache=.* is {fix}'):
    prepare(small_config('data.embed_cache=gs://bucket/cache'), missing, str(tmp_path / 'out'), progress=False)
  assert not (tmp_path / 'out').exists() and list((gcs / 'bucket').iterdir()) == []

  from conftest import tiny_config

  from hmem.train import trainer
  monkeypatch.setattr(trainer, 'state_spec', lambda *a, **k: pytest.fail('state built before the check'))
  cfg = tiny_config('data.source=prepared', 'data.path=gs://bucket/data', 'data.seq_len=128')
  with pytest.raises(DataError, match=f"data.path='gs://bucket/data' is {fix}"):
    trainer.train(cfg, str(tmp_path / 'run'), progress=False)
