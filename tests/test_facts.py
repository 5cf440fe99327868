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
  records = read_records(paths['probes'])  # hmem eval's reader accepts every probe
  assert len(records.prompts) == len(probes) and not records.skipped


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
      trained = t < facts.TRAIN_TEMPLATES
      assert bool(_sentence(template).search(train_text)) == trained, (attribute, template)
      assert bool(_sentence(template).search(heldout_text)) != trained, (attribute, template)
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
