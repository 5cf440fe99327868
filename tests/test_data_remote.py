"""Data files on an object store (the fake gs:// of tests/object_store.py): what a run or a
bundle reads from a dataset (tokenizer, tree, embedder) round-trips there exactly as on a
local disk, and `hmem prepare` reads its corpus from gs:// but refuses a gs:// output."""

import json

import numpy as np
import pytest

from hmem.data import minilm
from hmem.data.embed import CONFIG_FILE, TfidfEmbedder, load_embedder
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
