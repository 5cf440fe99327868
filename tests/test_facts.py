"""The synthetic-biography fact corpus (hmem.corpora.facts)."""

import collections
import json
import os
import re

import numpy as np
import pytest

from hmem.config import load_config
from hmem.corpora import facts
from hmem.data.embed import make_embedder
from hmem.data.tree import fit_tree, route
from hmem.errors import DataError
from hmem.infer.evaluate import read_records


def _read(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path):
  a = facts.write_facts(str(tmp_path / 'a'), 60, seed=3, probes=50)
  b = facts.write_facts(str(tmp_path / 'b'), 60, seed=3, probes=50)
  c = facts.write_facts(str(tmp_path / 'c'), 60, seed=4, probes=50)
  for stem in a:
    with open(a[stem], 'rb') as fa, open(b[stem], 'rb') as fb:
      assert fa.read() == fb.read(), stem
  assert _read(a['train']) != _read(c['train'])
  mtimes = {stem: os.stat(path).st_mtime_ns for stem, path in a.items()}
  facts.write_facts(str(tmp_path / 'a'), 60, seed=3, probes=50)  # same corpus: files left as they are
  assert {stem: os.stat(path).st_mtime_ns for stem, path in a.items()} == mtimes


def test_each_probe_is_answered_in_its_entity_document_only(tmp_path):
  paths = facts.write_facts(str(tmp_path), 300, seed=0)
  docs = [r['text'] for r in _read(paths['train'])]
  people = facts.entities(300, 0)
  probes = _read(paths['probes'])
  assert len(probes) == 300 * len(facts.ATTRIBUTES)
  # Each word of a name, first name and surname alike, is in one document only: a probe
  # shares no word with another entity's document, so it routes to its own.
  words = collections.Counter(w for doc in docs for w in set(re.findall(r'[A-Za-z]+', doc)))
  holder = {}
  for i, person in enumerate(people):
    for word in person['name'].split():
      assert words[word] == 1 and re.search(rf'\b{word}\b', docs[i]), (word, words[word])
    holder[person['name']] = i
  for probe in probes:
    name = probe['prompt'].split(' of ', 1)[1].removesuffix(' is')
    assert f'{probe["prompt"]} {probe["answer"]}.' in docs[holder[name]]  # stated there, probe's phrasing
    assert probe['answer'] in probe['candidates'] and len(probe['candidates']) == 16
  records = read_records(paths['probes'])  # hmem eval's reader (and `hmem quickstart --probes`) accepts every probe
  assert len(records.prompts) == len(probes) and not records.skipped
  assert records.ignored == {'documents': len(probes)}  # the popularity field, for the benchmark only


def test_names_run_to_three_syllables_and_say_when_they_run_out():
  small, large = facts.names(100, 0), facts.names(8000, 0)
  assert len({w for n in large for w in n.split()}) == 2 * 8000  # no word of a name used twice
  assert max(len(n) for n in small) < max(len(n) for n in large)  # two syllables while they last
  with pytest.raises(DataError, match='at most 8820'):
    facts.names(9000, 0)


def _sentence(template):
  """A regex for any sentence written in the template (any name, any value)."""
  pattern = re.escape(template).replace(r'\{n\}', '[A-Z][a-z]+ [A-Z][a-z]+').replace(r'\{v\}', '[^.]+')
  return re.compile(r'(?:^|\. )' + pattern + r'\.')


def test_heldout_templates_never_appear_in_training_text(tmp_path):
  paths = facts.write_facts(str(tmp_path), 200, seed=1, probes=100)
  train_text = ' '.join(r['text'] for r in _read(paths['train']))
  heldout_text = ' '.join(r['text'] for r in _read(paths['heldout']))
  for attribute, templates in facts.TEMPLATES.items():
    for t, template in enumerate(templates):
      trained, held = t < facts.TRAIN_TEMPLATES, t in facts.HELDOUT_TEMPLATES  # 6.. are the augmentation's
      assert bool(_sentence(template).search(train_text)) == trained, (attribute, template)
      assert bool(_sentence(template).search(heldout_text)) == held, (attribute, template)
  held = _read(paths['probes_heldout'])
  assert len(held) == 100 and [p['answer'] for p in held] == [p['answer'] for p in _read(paths['probes'])]
  for probe in held:
    assert probe['prompt'] not in train_text  # the question's phrasing was never trained on


def test_names_route_to_their_entity_subtree_with_the_cosine_tree():
  """What configs/facts.py relies on: a probe (its name is its only rare word) reaches its
  entity's level-1 subtree. Cluster means of many documents are short vectors of unequal
  norm, so L2 sends a query with a small overlap to the shortest centroid; unit centroids
  (data.tree_metric=cosine) compare the overlap itself. At 1,000 entities (more than the
  embedder's 384 dimensions) L2 sent half of them elsewhere."""
  cfg = load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'facts.py'))
  people = facts.entities(1000, 0)
  rng = np.random.default_rng(0)
  docs = [' '.join(facts.biography(e, t, rng) for t in range(facts.TRAIN_TEMPLATES)) for e in people]
  embedder = make_embedder(cfg.data, docs)
  x_doc, x_probe = embedder.embed(docs), embedder.embed([facts.prompt(e, 'field', 0) for e in people])
  agree = {}
  for spherical in (False, True):
    tree = fit_tree(x_doc, cfg.memory.k, cfg.memory.depth, seed=0, samples=cfg.data.kmeans_samples,
                    spherical=spherical, progress=False)
    level1 = cfg.memory.k ** (cfg.memory.depth - 1)
    agree[spherical] = np.mean(route(tree, x_probe) // level1 == route(tree, x_doc) // level1)
  assert agree[True] >= 0.95 and agree[True] > agree[False] + 0.1, agree


def test_augmentation_trains_every_trainable_template_and_no_heldout_word(tmp_path):
  """--templates 10 writes each fact in all ten trainable phrasings, never a held-out one;
  and the six it adds bring no word of a held-out template that templates 0-3 lack (else
  augmentation would teach the held-out phrasing, not recall in other words)."""
  paths = facts.write_facts(str(tmp_path), 30, seed=2, templates=len(facts.TRAINABLE_TEMPLATES))
  docs = [r['text'] for r in _read(paths['train'])]
  for attribute, templates in facts.TEMPLATES.items():
    for t, template in enumerate(templates):
      per_doc = [len(_sentence(template).findall(doc)) for doc in docs]
      assert per_doc == [0 if t in facts.HELDOUT_TEMPLATES else 1] * len(docs), (attribute, template)

    def words(ts):
      return {w.lower() for t in ts for w in re.findall('[A-Za-z]+', t.replace('{n}', '').replace('{v}', ''))}
    base, held = words(templates[:facts.TRAIN_TEMPLATES]), words(templates[t] for t in facts.HELDOUT_TEMPLATES)
    assert not (held - base) & words(templates[t] for t in facts.TRAINABLE_TEMPLATES[facts.TRAIN_TEMPLATES:])
  with pytest.raises(DataError, match='give 1 to 10 training templates'):
    facts.write_facts(str(tmp_path), 30, templates=11)


def test_zipf_popularity_writes_each_entity_into_its_count_of_fresh_documents(tmp_path):
  popularity = facts.Popularity('zipf', exponent=1.0, max_documents=32)
  counts = popularity.counts(60)
  assert counts[0] == 32 and counts[1] == 16 and counts[-1] == 1 and all(counts[:-1] >= counts[1:])
  assert list(facts.Popularity().counts(5)) == [1] * 5
  paths = facts.write_facts(str(tmp_path), 60, seed=1, popularity=popularity)
  docs = [r['text'] for r in _read(paths['train'])]
  people = facts.entities(60, 1)
  assert len(docs) == counts.sum()
  for person, count in zip(people, counts):
    mine = [doc for doc in docs if person['name'] in doc]
    assert len(mine) == count  # its name (so its facts) in exactly its count of documents
    for doc in mine:  # each copy states every fact in every trained template
      for attribute in facts.ATTRIBUTES:
        for t in range(facts.TRAIN_TEMPLATES):
          assert facts.TEMPLATES[attribute][t].format(n=person['name'], v=person[attribute]) + '.' in doc
    assert len(set(mine)) == count  # fresh sentence and template orders, not one text repeated
  held = _read(paths['heldout'])
  assert len(held) == 60  # held-out paraphrases: one per entity, whatever its popularity


def test_probes_are_shared_out_over_the_popularity_buckets(tmp_path):
  popularity = facts.Popularity('zipf', max_documents=64)
  counts = popularity.counts(200)
  sizes = collections.Counter(facts.bucket(c) for c in counts)
  # round(64 / rank): rank 1 -> 64; 2-4 -> 32, 21, 16; 5-18 -> 13..4; 19-42 -> 3, 2; 43+ -> 1.
  assert sizes == {'64+': 1, '16-63': 3, '4-15': 14, '2-3': 24, '1': 158}
  paths = facts.write_facts(str(tmp_path), 200, seed=0, probes=200, popularity=popularity)
  probes, held = _read(paths['probes']), _read(paths['probes_heldout'])
  assert len(probes) == 200 and [p['documents'] for p in held] == [p['documents'] for p in probes]
  per_bucket = collections.Counter(facts.bucket(p['documents']) for p in probes)
  # Smallest first, each min(its facts, an equal share of what is left): 4, 12 and 56 (whole),
  # then the 128 left split by the two largest.
  assert per_bucket == {'64+': 4, '16-63': 12, '4-15': 56, '2-3': 64, '1': 64}
  name_count = {p['name']: c for p, c in zip(facts.entities(200, 0), counts)}
  for probe in probes:
    name = probe['prompt'].split(' of ', 1)[1].removesuffix(' is')
    assert probe['documents'] == name_count[name]
  assert len({p['prompt'] for p in probes}) == 200  # no pair twice


def test_buckets_and_bad_popularity():
  assert facts.BUCKETS == ('1', '2-3', '4-15', '16-63', '64+')
  assert [facts.bucket(c) for c in (1, 2, 3, 4, 15, 16, 63, 64, 1000)] == [
      '1', '2-3', '2-3', '4-15', '4-15', '16-63', '16-63', '64+', '64+']
  assert facts.Popularity('zipf', 0.5, 100).tag == 'zipf0.5-100' and facts.Popularity().tag == 'uniform'
  with pytest.raises(DataError, match="popularity law 'pareto'; use one of uniform, zipf"):
    facts.Popularity('pareto')
  with pytest.raises(DataError, match='give an exponent > 0'):
    facts.Popularity('zipf', exponent=0)
