"""Inference: routing equals `prepare`'s, sources and bundles reproduce the trained model,
blocking, partial bundles, bank edits, and every bad input of a bundle."""

import json
import pathlib

import grain
import jax
import numpy as np
import pytest

from hmem.data import layout
from hmem.data.prepare import prepare
from hmem.data.tokenizer import Tokenizer
from hmem.infer.router import Router
from hmem.infer.source import open_source
from hmem.train.trainer import train

from conftest import tiny_config

WIKI = pathlib.Path(__file__).parent / 'data' / 'wiki_sample.jsonl'
# configs/tiny.py with FFN memory on a k=4, depth-2 tree of the wiki sample.
RUN = ('model.vocab_size=512', 'memory.levels=(8, 4)', 'data.source=prepared', 'data.tokenizer_sample=400',
       'data.tree_sample=400', 'data.kmeans_samples=256', 'data.kmeans_steps=5', 'data.tfidf_dim=32',
       'data.eval_fraction=0.1', 'train.steps=6', 'train.checkpoint_every=6', 'train.eval_every=0',
       'train.log_every=6', 'train.warmup_steps=2')


@pytest.fixture(scope='module')
def memory_run(tmp_path_factory):
  """(config, prepared dataset, manifest, run directory): a few steps of tiny + memory."""
  data = tmp_path_factory.mktemp('infer_data')
  cfg = tiny_config(*RUN, f'data.path={data}')
  manifest = prepare(cfg, str(WIKI), str(data), progress=False)
  workdir = tmp_path_factory.mktemp('infer_run')
  train(cfg, str(workdir), progress=False)
  return cfg, data, manifest, workdir


def _documents(data, manifest):
  """(texts, leaves) of every whole document the prepared shards hold, by its packed leaf."""
  tokenizer = Tokenizer.load(str(data / 'tokenizer.json'))
  texts, leaves = [], []
  for split in layout.SPLITS:
    raw = [bytes(r) for s in manifest['splits'][split]['shards']
           for r in grain.sources.ArrayRecordDataSource(str(data / s['file']))]
    b = layout.decode_batch(raw, manifest['seq_len'])
    for leaf in np.unique(b['leaf_id']):
      rows = b['leaf_id'] == leaf
      stream = b['tokens'][rows][b['segment_ids'][rows] > 0]  # the leaf's documents end to end
      for doc in np.split(stream, np.flatnonzero(stream == manifest['eot_id']) + 1)[:-1]:
        texts.append(tokenizer.decode(doc[:-1]))
        leaves.append(int(leaf))
  return texts, np.asarray(leaves)


def test_routing_new_text_gives_the_leaf_prepare_gave(memory_run):
  cfg, data, manifest, _ = memory_run
  texts, leaves = _documents(data, manifest)
  assert len(texts) == manifest['documents_kept'] == 400
  assert len(np.unique(leaves)) > 4  # a real spread over the 16 leaves
  routes = Router.load(str(data)).route(texts)
  np.testing.assert_array_equal(routes.leaf, leaves)
  np.testing.assert_array_equal(routes.path[:, 0], leaves // 4)
  np.testing.assert_array_equal(routes.path[:, 1], leaves)
  assert routes.fallbacks == 0 and (routes.blocked == -1).all()
