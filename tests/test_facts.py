"""The synthetic-biography fact corpus (hmem.data.facts)."""

import json
import os
import re

from hmem.data import facts
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
  assert len({p['name'] for p in people}) == 300
  probes = _read(paths['probes'])
  assert len(probes) == 300 * len(facts.ATTRIBUTES)
  holders = {}  # full name -> the documents it occurs in
  for i, doc in enumerate(docs):
    for name in set(re.findall(rf'\b(?:{"|".join(facts.FIRST_NAMES)}) [A-Z][a-z]+\b', doc)):
      holders.setdefault(name, []).append(i)
  for probe in probes:
    name = probe['prompt'].split(' of ', 1)[1].removesuffix(' is')
    assert len(holders[name]) == 1, name  # the name (so the fact) is in one document only
    assert f'{probe["prompt"]} {probe["answer"]}.' in docs[holders[name][0]]  # stated there, probe's phrasing
    assert probe['answer'] in probe['candidates'] and len(probe['candidates']) == 16
  assert sorted(holders) == sorted(p['name'] for p in people)
  records = read_records(paths['probes'])  # hmem eval's reader accepts every probe
  assert len(records.prompts) == len(probes) and not records.skipped


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
