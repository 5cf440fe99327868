"""`hmem prepare`: inputs and their skip counts, packing invariants, worker-count invariance, faults."""

import gzip
import hashlib
import json
import pathlib
import shutil

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from hmem.config import apply_overrides, default_config
from hmem.data import layout
from hmem.data import prepare as prepare_lib
from hmem.data.embed import load_embedder
from hmem.data.inputs import ReadStats, list_files, read_documents
from hmem.data.loader import PreparedSource
from hmem.data.packing import pack
from hmem.data.tfidf import TfidfEmbedder
from hmem.data.tokenizer import EOT, Tokenizer
from hmem.data.tree import Tree, route
from hmem.errors import ConfigError, DataError

WIKI = pathlib.Path(__file__).parent / 'data' / 'wiki_sample.jsonl'
SMALL = ('memory.k=4', 'memory.depth=2', 'model.vocab_size=512', 'data.seq_len=128',
         'data.tokenizer_sample=400', 'data.tree_sample=400', 'data.kmeans_samples=256',
         'data.kmeans_steps=5', 'data.tfidf_dim=32', 'data.eval_fraction=0.1')
SPELLS_EOT = f'A document that spells {EOT} in its text must not end there.'
# What the messy corpus below skips, by reason.
SKIPPED = {'blank_line': 1, 'empty': 4, 'invalid_unicode': 1, 'malformed_json': 1, 'missing_field': 3,
           'non_string_field': 1, 'non_utf8': 2, 'not_an_object': 1}


def prepare(cfg, corpus, out, workers=1, **kw):
  """One DirectRunner worker, in this process (monkeypatches reach it), unless told."""
  return prepare_lib.prepare(cfg, corpus, out, workers=workers, **kw)


def small_config(*overrides):
  cfg = default_config()
  apply_overrides(cfg, SMALL + overrides)
  return cfg


def wiki_texts():
  with open(WIKI, encoding='utf-8') as f:
    return [json.loads(line)['text'] for line in f]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """The 400 wiki documents spread over every input kind, with bad records between them."""
  root = tmp_path_factory.mktemp('corpus')
  texts = wiki_texts()
  line = lambda obj: json.dumps(obj).encode()
  bad = [b'{"text": "unterminated', b'\xff\xfe not utf-8 \xc3\x28', line({'text': ''}),
         line({'text': ' \n\t '}), line({'label': 'no text'}), line({'text': 42}), line({'text': None}),
         b'["not", "an", "object"]', b'', line({'text': '\ud800 lone surrogate'})]
  lines = [line({'text': t, 'label': 'x'}) for t in texts[:250]] + [line({'text': SPELLS_EOT})]
  for i, b in enumerate(bad):
    lines.insert(1 + 25 * i, b)
  (root / 'main.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
  part = lambda ts: ''.join(json.dumps({'text': t}) + '\n' for t in ts).encode()
  (root / 'part.jsonl.gz').write_bytes(gzip.compress(part(texts[250:300])))
  (root / 'part.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(part(texts[300:350])))
  pq.write_table(pa.table({'text': texts[350:380] + [None, '']}), root / 'rows.parquet', row_group_size=8)
  (root / 'txt').mkdir()
  for i, t in enumerate(texts[380:]):
    (root / 'txt' / f'doc{i:02d}.txt').write_text(t, encoding='utf-8')
  (root / 'txt' / 'empty.txt').write_text('  \n')
  (root / 'txt' / 'latin1.txt').write_bytes(b'caf\xe9')
  (root / 'notes.md').write_text('not a corpus file')
  return root


@pytest.fixture(scope='module')
def prepared(corpus, tmp_path_factory):
  """(config, output directory, manifest) of the corpus prepared by one process."""
  cfg = small_config()
  out = tmp_path_factory.mktemp('prepared')
  return cfg, out, prepare(cfg, str(corpus), str(out), progress=False)


def read_split(out, manifest, split):
  """All sequences of a split in shard order: {tokens, segment_ids, leaf_id}."""
  raw = [bytes(r) for s in manifest['splits'][split]['shards']
         for r in grain.sources.ArrayRecordDataSource(str(out / s['file']))]
  return layout.decode_batch(raw, manifest['seq_len'])


def test_manifest_counts_every_record(prepared):
  _, out, m = prepared
  assert m['documents_kept'] == 401 and m['skipped'] == SKIPPED
  assert m['documents_read'] == 401 + sum(SKIPPED.values())
  assert m['files'] == 26 and m['files_unsupported'] == 1  # notes.md
  assert m['splits']['train']['documents'] + m['splits']['eval']['documents'] == 401
  assert 20 <= m['splits']['eval']['documents'] <= 60  # eval_fraction=0.1
  assert m['sequences'] == sum(m['splits'][s]['sequences'] for s in layout.SPLITS)
  assert (m['k'], m['depth'], m['leaves'], m['seq_len'], m['eot_id']) == (4, 2, 16, 128, 0)
  assert 257 <= m['vocab_size'] <= 512 and m['token_dtype'] == 'uint16'
  assert m['occupancy']['1']['nodes'] == 4 and m['occupancy']['2']['nodes'] == 16
  assert 0 < m['padding_fraction'] < 0.2
  for split in layout.SPLITS:
    assert sum(s['sequences'] for s in m['splits'][split]['shards']) == m['splits'][split]['sequences']
  for name in ('tokenizer.json', 'tree.npz', 'embedder.json', 'manifest.json'):
    assert (out / name).is_file()


def test_packing_keeps_every_document_once_in_order(prepared, corpus):
  cfg, out, m = prepared
  tokenizer = Tokenizer.load(str(out / 'tokenizer.json'))
  eot = m['eot_id']
  # What should be there: every kept document, routed to its leaf, in (file, line) order.
  files, _ = list_files(str(corpus))
  docs = [d for i, p in enumerate(files) for d in read_documents(p, i, 'text', ReadStats())]
  assert sorted(d.text for d in docs) == sorted(wiki_texts() + [SPELLS_EOT])
  texts = [d.text for d in docs]
  leaf_N = route(Tree.load(str(out / 'tree.npz')), load_embedder(str(out)).embed(texts))
  expected = {}
  for leaf, ids, text in zip(leaf_N, tokenizer.encode(texts), texts):
    assert tokenizer.decode(ids) == text  # byte-exact round trip
    expected.setdefault(int(leaf), []).append(ids.tolist())

  found = {}  # split -> leaf -> documents rebuilt from the shards
  for split in layout.SPLITS:
    b = read_split(out, m, split)
    tokens, seg, leaf = b['tokens'], b['segment_ids'], b['leaf_id']
    assert (np.diff(leaf) >= 0).all()  # shards are leaf ranges, written in leaf order
    real = seg > 0
    assert (seg[:, 0] == 1).all()
    assert not (real[:, 1:] & ~real[:, :-1]).any()  # padding only at the end
    # Inside a sequence the segment id grows by one exactly after each EOT.
    step = np.diff(seg, axis=1)
    both = real[:, 1:]
    assert (step[both] == (tokens[:, :-1] == eot)[both]).all()
    # Only a leaf's last sequence is padded.
    padded = ~real[:, -1]
    assert (leaf[:-1][padded[:-1]] != leaf[1:][padded[:-1]]).all()
    for l in np.unique(leaf):
      stream = tokens[leaf == l][real[leaf == l]]
      assert stream[-1] == eot
      cuts = np.flatnonzero(stream == eot)
      found.setdefault(split, {})[int(l)] = [d.tolist() for d in np.split(stream, cuts + 1)[:-1]]
      assert all(d[-1] == eot for d in found[split][int(l)])

  for leaf, want in expected.items():
    train = [d[:-1] for d in found['train'].get(leaf, [])]
    held = [d[:-1] for d in found['eval'].get(leaf, [])]
    # The two splits partition the leaf's documents and each keeps their order.
    for ids in want:
      if train and train[0] == ids:
        train.pop(0)
      else:
        assert held and held[0] == ids, f'leaf {leaf}: document missing or out of order'
        held.pop(0)
    assert not train and not held
  assert set(found['train']) | set(found['eval']) == set(expected)


def test_output_does_not_depend_on_worker_count_or_ranges(prepared, corpus, tmp_path):
  """Two DirectRunner worker processes reading main.jsonl in 2 KB byte ranges (cuts inside
  records and characters) and rows.parquet a row group at a time write the same bytes as
  one process reading each file whole: shards, tokenizer, embedder, tree, manifest."""
  cfg, out, manifest = prepared
  two = prepare(cfg, str(corpus), str(tmp_path / 'two'), workers=2, progress=False, range_bytes=2048)
  byte_ranges = -(-(corpus / 'main.jsonl').stat().st_size // 2048)
  assert manifest['ranges'] == 26 and two['ranges'] == byte_ranges + 4 + 24  # 4 row groups, 24 whole files
  assert two['embed_cache'] == {'hits': 0, 'misses': two['ranges'], 'rejected': 0}
  assert {**two, 'ranges': 0, 'embed_cache': 0} == {**manifest, 'ranges': 0, 'embed_cache': 0}
  skip = ('embed_cache', 'manifest.json')
  assert files_of(tmp_path / 'two', skip=skip) == files_of(out, skip=skip)


def test_a_document_that_makes_a_step_raise_is_counted_and_skipped(corpus, tmp_path, monkeypatch):
  """The tokenizer raises on one document, the embedder on another (in their batches, then
  alone): both are counted by reason, the other 399 documents are packed."""
  real_encode, real_embed, first = Tokenizer.encode, TfidfEmbedder.embed, wiki_texts()[0]

  def encode(self, texts):
    if any(SPELLS_EOT in t for t in texts):
      raise RuntimeError('tokenizer crash')
    return real_encode(self, texts)

  def embed(self, texts, progress=True):
    if first in texts:
      raise ValueError('embedder crash')
    return real_embed(self, texts, progress)

  monkeypatch.setattr(Tokenizer, 'encode', encode)
  monkeypatch.setattr(TfidfEmbedder, 'embed', embed)
  m = prepare(small_config(), str(corpus), str(tmp_path / 'out'), progress=False)
  assert m['skipped'] == {**SKIPPED, 'tokenize_error': 1, 'embed_error': 1}
  assert m['documents_kept'] == 399 and m['documents_read'] == 401 + sum(SKIPPED.values())
  assert m['splits']['train']['documents'] + m['splits']['eval']['documents'] == 399


def test_a_failed_pipeline_leaves_no_manifest_and_a_rerun_starts_clean(prepared, corpus, tmp_path, monkeypatch):
  """A failed run leaves no manifest; the rerun clears what it left and, on Beam's retrying
  BundleBasedDirectRunner, survives a range whose routing raises once: the same dataset."""
  _, _, manifest = prepared
  out = tmp_path / 'out'
  monkeypatch.setattr(prepare_lib, 'write_shard', lambda *a: (_ for _ in ()).throw(OSError('disk full')))
  with pytest.raises(Exception, match='disk full'):
    prepare(small_config(), str(corpus), str(out), progress=False)
  assert (out / 'tree.npz').exists() and not (out / 'manifest.json').exists()
  assert len(list((out / prepare_lib.ROUTED).iterdir())) == manifest['ranges']  # the routed documents
  with pytest.raises(DataError, match='has no manifest.json'):
    PreparedSource(str(out), batch_size=1, seq_len=128, seed=0)
  (out / 'train-00003-of-00016.array_record').write_bytes(b'left by a failed run')
  monkeypatch.undo()

  real_route, raised = prepare_lib.route, []

  def route_raising_once(*args, **kwargs):
    if not raised:  # one range's bundle fails once, after its temporary file was begun
      raised.append(True)
      raise OSError('a transient failure')
    return real_route(*args, **kwargs)

  monkeypatch.setattr(prepare_lib, 'route', route_raising_once)
  again = prepare(small_config(), str(corpus), str(out), progress=False, runner='BundleBasedDirectRunner')
  assert raised == [True]
  assert again['embed_cache']['hits'] == again['ranges']  # the failed run's vectors were kept
  assert {**again, 'embed_cache': None} == {**manifest, 'embed_cache': None}
  skip = ('embed_cache', 'manifest.json')
  assert files_of(out, skip=skip) == files_of(prepared[1], skip=skip)  # no temporary file is left either


def test_tree_is_fit_on_a_uniform_sample_of_training_documents(prepared, corpus, tmp_path, monkeypatch):
  cfg, out, _ = prepared
  fitted = []
  real_fit = prepare_lib.fit_tree
  monkeypatch.setattr(prepare_lib, 'fit_tree', lambda x, *a, **kw: fitted.append(x) or real_fit(x, *a, **kw))
  # The prepared run's cache holds every vector, so only the tree is fit again.
  shared = small_config('data.tree_sample=120', f'data.embed_cache={out / "embed_cache"}')
  assert prepare(shared, str(corpus), str(tmp_path / 'sampled'), progress=False)['tree_documents'] == 120
  # Which documents were drawn: match the rows against every document's vector.
  files, _ = list_files(str(corpus))
  docs = [d for i, p in enumerate(files) for d in read_documents(p, i, 'text', ReadStats())]
  emb_NxD = load_embedder(str(out)).embed([d.text for d in docs])
  held_N = np.array([prepare_lib.held_out(d.file, np.array([d.index]), 0.1)[0] for d in docs])
  drawn = [int(np.flatnonzero((emb_NxD == row).all(1))[0]) for row in fitted[0]]
  assert len(set(drawn)) == 120 and not held_N[drawn].any()
  # Spread over the corpus, not the head of each file: main.jsonl (file 0, 251 documents)
  # gives about its share, from both of its halves.
  main = [i for i in drawn if docs[i].file == 0]
  assert 50 <= len(main) <= 100
  assert min(main) < 100 and max(main) > 150
  # Another seed, another draw (worker counts never change it: see the test above).
  prepare(small_config('data.tree_sample=120', f'data.embed_cache={out / "embed_cache"}', 'train.seed=1'),
          str(corpus), str(tmp_path / 'seed1'), progress=False)
  assert fitted[1].shape == fitted[0].shape and not np.array_equal(fitted[0], fitted[1])


def test_a_streamed_sample_is_the_k_smallest_whatever_the_chunks():
  """The passes' bounded heaps: fed in chunks of any size, from several files, with tied
  hashes, they keep exactly the k smallest (hash, file, key) entries."""
  rng = np.random.default_rng(0)
  hash_N, key_N = rng.integers(0, 50, 600), np.arange(600)  # many ties: the key decides
  every = sorted((int(h), f, int(k), f'doc {f}/{k}') for f in (0, 1) for h, k in zip(hash_N, key_N))
  for k, chunk in [(0, 7), (1, 600), (37, 1), (37, 64), (1200, 100), (2000, 33)]:
    sample = prepare_lib._Smallest(k)
    for f in (1, 0):
      for lo in range(0, 600, chunk):
        sl = slice(lo, lo + chunk)
        sample.add(hash_N[sl], f, key_N[sl], [(f'doc {f}/{k}',) for k in key_N[sl].tolist()])
    assert sorted(sample.items()) == every[:k], (k, chunk)


def files_of(root, skip=()):
  """{relative path: bytes} of every file under root, but those under the names in skip."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
          if p.is_file() and p.relative_to(root).parts[0] not in skip}


def test_embed_cache_is_reused_by_another_tree_and_never_trusted_blindly(prepared, corpus, tmp_path):
  cfg, out, manifest = prepared
  lookups = manifest['ranges']  # one per range; here each file is one
  assert lookups == manifest['files'] and manifest['embed_cache'] == {'hits': 0, 'misses': lookups, 'rejected': 0}
  assert len(list((out / 'embed_cache').rglob('*.f32'))) == lookups
  cache = tmp_path / 'cache'
  shared = lambda *o: small_config(f'data.embed_cache={cache}', *o)
  # Another tree fills the shared cache; then the prepared tree, into a new --out, reads it.
  first = prepare(shared('memory.depth=1'), str(corpus), str(tmp_path / 'depth1'), progress=False)
  assert first['embed_cache'] == {'hits': 0, 'misses': lookups, 'rejected': 0}
  assert not (tmp_path / 'depth1' / 'embed_cache').exists()

  def same_dataset(got, other):
    # Equal to the run that embedded everything itself, but for the cache counts.
    assert {**got, 'embed_cache': None} == {**manifest, 'embed_cache': None}
    assert files_of(other, skip=('manifest.json',)) == files_of(out, skip=('manifest.json', 'embed_cache'))

  second = prepare(shared(), str(corpus), str(tmp_path / 'second'), progress=False)
  assert second['embed_cache'] == {'hits': lookups, 'misses': 0, 'rejected': 0}
  same_dataset(second, tmp_path / 'second')

  # A corrupt file and one with a row too few (valid checksum) are recomputed, not used.
  entries = {json.loads(p.read_text())['source']['file']: p.with_suffix('.f32') for p in cache.rglob('*.json')}
  gz_f32, main_f32 = entries[str(corpus / 'part.jsonl.gz')], entries[str(corpus / 'main.jsonl')]
  gz_f32.write_bytes(gz_f32.read_bytes()[:-100])
  meta = json.loads(main_f32.with_suffix('.json').read_text())
  short = np.fromfile(main_f32, '<f4').reshape(meta['rows'], meta['dim'])[:-1]
  short.tofile(main_f32)
  meta.update(rows=short.shape[0], sha256=hashlib.sha256(short.tobytes()).hexdigest())
  main_f32.with_suffix('.json').write_text(json.dumps(meta))
  third = prepare(shared(), str(corpus), str(tmp_path / 'third'), progress=False)
  assert third['embed_cache'] == {'hits': lookups - 2, 'misses': 2, 'rejected': 2}
  same_dataset(third, tmp_path / 'third')
  # The recomputed vectors replaced the bad files.
  assert files_of(cache) == files_of(out / 'embed_cache')


def test_rerun_returns_the_dataset_and_refuses_other_settings(prepared, corpus):
  cfg, out, manifest = prepared
  assert prepare(cfg, str(corpus), str(out), progress=False) == manifest
  with pytest.raises(DataError, match='already holds a dataset'):
    prepare(small_config('data.seq_len=64'), str(corpus), str(out), progress=False)


@pytest.mark.parametrize('key, other', [('tfidf_min_df', 1), ('tree_metric', "'cosine'")])
def test_a_key_added_later_keeps_earlier_datasets_at_its_default(prepared, corpus, key, other):
  """Keys that came after datasets were prepared: at the default (what was done before
  them) the fingerprint is the one a config without the key gives, so those datasets are
  still done; any other value is another dataset."""
  cfg, out, manifest = prepared
  files, unsupported = list_files(str(corpus))
  without = small_config()
  with without.unlocked():
    del without.data[key]
  assert prepare_lib._fingerprint(without, str(corpus), files, unsupported) == manifest['fingerprint']
  with pytest.raises(DataError, match='already holds a dataset'):
    prepare(small_config(f'data.{key}={other}'), str(corpus), str(out), progress=False)


def test_cosine_tree_has_unit_centroids_and_a_wrong_metric_stops_before_any_work(corpus, tmp_path):
  out = tmp_path / 'cosine'
  prepare(small_config("data.tree_metric='cosine'"), str(corpus), str(out), progress=False)
  for c_MxD in Tree.load(out / 'tree.npz').centroids:
    np.testing.assert_allclose(np.linalg.norm(c_MxD, axis=1), 1.0, atol=1e-5)
  with pytest.raises(ConfigError, match="tree_metric='dot'; use 'l2' or 'cosine'"):
    prepare(small_config("data.tree_metric='dot'"), str(corpus), str(tmp_path / 'bad'), progress=False)
  assert not (tmp_path / 'bad').exists()


def test_an_output_inside_the_input_is_not_read_back(corpus, tmp_path):
  shutil.copytree(corpus, tmp_path / 'in')
  cfg, out = small_config(), tmp_path / 'in' / 'prepared'
  first = prepare(cfg, str(tmp_path / 'in'), str(out), progress=False)
  assert first['files'] == 26
  assert prepare(cfg, str(tmp_path / 'in'), str(out), progress=False) == first


def test_missing_input_and_empty_corpus_stop_with_one_message(tmp_path):
  cfg = small_config()
  with pytest.raises(DataError, match='does not exist or matches no file'):
    prepare(cfg, str(tmp_path / 'missing.jsonl'), str(tmp_path / 'out'))
  with pytest.raises(DataError, match='matches no file'):
    prepare(cfg, str(tmp_path / '*.jsonl'), str(tmp_path / 'out'))
  (tmp_path / 'bad.jsonl').write_bytes(b'{"text": ""}\nnot json\n{"body": "x"}\n')
  with pytest.raises(DataError, match=r"no usable document \(3 records.*empty.*data.text_field='text'"):
    prepare(cfg, str(tmp_path / 'bad.jsonl'), str(tmp_path / 'out'))
  (tmp_path / 'corpus.csv').write_text('text\n')
  with pytest.raises(DataError, match='unsupported format'):
    prepare(cfg, str(tmp_path / 'corpus.csv'), str(tmp_path / 'out'))


def documents_of(out, manifest):
  """The texts of every document packed in the dataset (both splits), sorted."""
  tokenizer, eot = Tokenizer.load(str(out / 'tokenizer.json')), manifest['eot_id']
  texts = []
  for split in layout.SPLITS:
    b = read_split(out, manifest, split)
    for leaf in np.unique(b['leaf_id']):
      stream = b['tokens'][b['leaf_id'] == leaf][b['segment_ids'][b['leaf_id'] == leaf] > 0]
      texts += [tokenizer.decode(d) for d in np.split(stream, np.flatnonzero(stream == eot) + 1)[:-1]]
  return sorted(t.removesuffix(EOT) for t in texts)


def test_a_web_parquet_corpus_prepares_as_is_and_its_filter_counts_as_skips(tmp_path):
  """The schema web corpora ship (ids, URLs, dates, scores, language beside the text, in row
  groups), the text column named by data.text_field; data.filter keeps English rows of
  score >= 0.5, and exactly those are packed."""
  texts, rng = wiki_texts()[:240], np.random.default_rng(0)
  language, score = rng.choice(['en', 'de', 'fr'], 240, p=[0.6, 0.2, 0.2]), rng.random(240)
  (tmp_path / 'web').mkdir()
  pq.write_table(pa.table({
      'id': [f'<urn:uuid:{i:08x}>' for i in range(240)], 'content': texts,
      'url': [f'https://example.org/{i}' for i in range(240)],
      'date': pa.array(np.datetime64('2024-01-01') + np.arange(240), pa.date32()),
      'language': language, 'language_score': score, 'token_count': rng.integers(50, 900, 240)}),
      tmp_path / 'web' / '000_00000.parquet', row_group_size=60)
  cfg = small_config("data.text_field='content'", "data.filter=\"language == 'en' and language_score >= 0.5\"")
  m = prepare(cfg, str(tmp_path / 'web'), str(tmp_path / 'out'), progress=False, range_bytes=1 << 14)
  want = (language == 'en') & (score >= 0.5)
  assert m['ranges'] == 4 and m['documents_read'] == 240  # a row group a range
  assert m['skipped'] == {'filtered': int((~want).sum())} and m['documents_kept'] == want.sum()
  assert documents_of(tmp_path / 'out', m) == sorted(np.array(texts)[want].tolist())


def test_a_filter_that_cannot_apply_stops_before_any_work(corpus, tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(ConfigError, match='is not an expression'):
    prepare(small_config("data.filter='lang = 1'"), str(corpus), str(out))
  with pytest.raises(DataError, match=r'text files have none of \(22 in the input'):
    prepare(small_config("data.filter='label == 1'"), str(corpus), str(out))
  with pytest.raises(DataError, match=r"data.filter reads \['label'\], which .*rows.parquet lacks"):
    prepare(small_config("data.filter='label == 1'"), str(corpus / '*.*'), str(out))
  assert not out.exists()


def test_pack_splits_long_documents_and_pads_only_the_end():
  # Documents of 2, 6, 1 and 1 tokens, each + EOT (0), in sequences of 4; padding is 99.
  tokens, seg = pack(np.arange(1, 11), np.array([2, 6, 1, 1]), 4, eot_id=0, pad_id=99)
  np.testing.assert_array_equal(tokens, [[1, 2, 0, 3], [4, 5, 6, 7], [8, 0, 9, 0], [10, 0, 99, 99]])
  # The long document continues as segment 1 of the next sequences.
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 0, 0]])


def test_record_round_trip():
  tokens = np.array([5, 65535, 0, 7, 0, 0], np.int32)
  seg = np.array([1, 1, 2, 2, 0, 0], np.int32)
  rec = layout.encode(tokens, seg, 13, layout.token_dtype(65536))
  assert len(rec) == 24 + 6 * 2 + 2 * 4
  b = layout.decode_batch([rec, rec], 6)
  np.testing.assert_array_equal(b['tokens'][1], tokens)
  np.testing.assert_array_equal(b['segment_ids'][0], seg)
  np.testing.assert_array_equal(b['leaf_id'], [13, 13])
  with pytest.raises(ValueError, match='runs'):
    layout.encode(tokens, np.array([1, 2, 1, 0, 0, 0]), 0, np.dtype('<u2'))


def test_runner_options_pass_through(monkeypatch):
  """`hmem prepare --runner flink -- OPTIONS` hands OPTIONS to Beam untouched; direct runs
  one worker in process, more as local processes (the cores by default)."""
  got = {}
  monkeypatch.setattr(prepare_lib, 'prepare', lambda cfg, i, o, **kw: got.update(kw) or {'ok': 1})
  from hmem.cli import main
  config = str(WIKI.parents[2] / 'configs' / 'tiny.py')
  assert main(['prepare', '--config', config, '--input', 'in', '--out', 'out', '--runner', 'flink',
               '--', '--flink_master=host:8081', '--parallelism', '64']) == 0
  assert got['runner'] == 'flink' and got['pipeline_args'] == ['--flink_master=host:8081', '--parallelism', '64']
  flink = prepare_lib.pipeline_options(got['runner'], 0, got['pipeline_args'])
  flink = flink.get_all_options(retain_unknown_options=True)
  assert flink['runner'] == 'FlinkRunner' and flink['flink_master'] == 'host:8081' and flink['parallelism'] == 64
  one = prepare_lib.pipeline_options('direct', 1, []).get_all_options()
  assert (one['runner'], one['direct_running_mode'], one['direct_num_workers']) == ('DirectRunner', 'in_memory', 1)
  monkeypatch.setattr('os.cpu_count', lambda: 3)
  cores = prepare_lib.pipeline_options('direct', 0, []).get_all_options()
  assert (cores['direct_running_mode'], cores['direct_num_workers']) == ('multi_processing', 3)
