"""A controlled fact corpus: synthetic biographies of N made-up people, and probes.

The "synthetic biographies" setting for measuring knowledge storage: every entity has a
name whose two words no other entity uses, and one value per attribute (birth year, birth
city, employer, field), drawn uniformly from a fixed list of 16. Each attribute is stated by one of several paraphrase
templates; the first TRAIN_TEMPLATES are written into the training corpus, the rest are
never trained on and make the held-out paraphrase split.

`write_facts(out_dir, n_entities, seed)` writes (all seeded, byte-deterministic):
  train.jsonl          {"text"}: one document per entity, its biography written once in
                       each training template (sentence order shuffled per biography):
                       the corpus `hmem prepare` reads. An entity's name occurs in its own
                       document only, so every fact is stated there and nowhere else.
  heldout.jsonl        {"text"}: the same facts in the held-out templates, one document per
                       entity (`hmem eval` perplexity: recall that is not template copying).
  probes.jsonl         `hmem eval` multiple choice, one per (entity, attribute):
                       {"prompt": "The birth city of NAME is", "candidates": [16 cities],
                       "answer": "..."}; the prompt is a training template cut at the value.
  probes_heldout.jsonl the same questions asked in a held-out template
                       ("NAME is a native of"), a phrasing never trained on.
`probes` caps how many (entity, attribute) pairs get a probe (a seeded sample; the same
pairs in both probe files); chance accuracy is 1/16.
"""

from __future__ import annotations

import json
import os

import numpy as np

from hmem.errors import DataError
from hmem.files import atomic_write

# Names are made of syllables: first names of two or three of FIRST_SYLLABLES, surnames of
# SYLLABLES (disjoint sets, so no word is both). Both parts are unique per entity and words
# no real text or attribute value uses: a probe holds no word another entity's document has,
# so a name routes to its own entity's document (a first name shared by N/32 entities made
# the level-1 centroids of its holders pull a quarter of the probes into other subtrees).
FIRST_SYLLABLES = ('an', 'be', 'co', 'di', 'el', 'fa', 'gi', 'ha', 'jo', 'ku', 'ly', 'mo', 'no', 'pu', 'ra',
                   'se', 'ti', 'vo', 'wi', 'xe', 'zu')
SYLLABLES = ('ka', 'lo', 'mi', 'ren', 'tas', 'vel', 'dor', 'bri', 'sun', 'mar', 'pel', 'ith', 'gor', 'zan',
             'qua', 'fen', 'hol', 'wes', 'nus', 'tor', 'bek')

VALUES = {
    'birth year': tuple(str(y) for y in range(1950, 1998, 3)),
    'birth city': ('Lisbon', 'Oslo', 'Cairo', 'Lima', 'Dublin', 'Kyoto', 'Vienna', 'Nairobi', 'Quito', 'Seoul',
                   'Perth', 'Bergen', 'Porto', 'Tunis', 'Krakow', 'Denver'),
    'employer': ('Alder Labs', 'Birchway', 'Cobalt Works', 'Dunmore Bank', 'Elmstead', 'Fjordline', 'Granite Tech',
                 'Harbor Foods', 'Ironleaf', 'Juniper Air', 'Kestrel Motors', 'Lumen Media', 'Marrow Bio',
                 'Northgate', 'Orchid Health', 'Pinecrest'),
    'field': ('chemistry', 'geology', 'linguistics', 'astronomy', 'economics', 'botany', 'robotics', 'zoology',
              'optics', 'statistics', 'architecture', 'medicine', 'music', 'history', 'law', 'ecology'),
}
ATTRIBUTES = tuple(VALUES)

# Per attribute, paraphrases of one sentence; '{v}' ends each, so the text before it is a
# prompt for the value. Index 0 is the probe's phrasing.
TEMPLATES = {
    'birth year': ('The birth year of {n} is {v}', '{n} was born in the year {v}', '{n} came into the world in {v}',
                   'The year {n} was born was {v}', '{n} first saw daylight in {v}', '{n} has been alive since {v}'),
    'birth city': ('The birth city of {n} is {v}', '{n} was born in the city of {v}', '{n} grew up in {v}',
                   'The hometown of {n} is {v}', '{n} is a native of {v}', '{n} spent childhood in {v}'),
    'employer': ('The employer of {n} is {v}', '{n} works for {v}', '{n} is employed by {v}',
                 'The company of {n} is {v}', '{n} earns a salary from {v}', '{n} holds a job at {v}'),
    'field': ('The field of {n} is {v}', '{n} studies {v}', '{n} is an expert in {v}',
              'The specialty of {n} is {v}', '{n} devotes a career to {v}', '{n} does research in {v}'),
}
TRAIN_TEMPLATES = 4   # templates 0..3 are trained on, 4..5 held out
HELDOUT_PROBE_TEMPLATE = 4
FILES = ('train.jsonl', 'heldout.jsonl', 'probes.jsonl', 'probes_heldout.jsonl')


def _words(syllables: tuple[str, ...], n: int) -> list[str]:
  """Capitalised words of two syllables (no syllable twice in a row), then of three when
  two give fewer than n."""
  pairs = [(a, b) for a in syllables for b in syllables if a != b]
  words = [''.join(p) for p in pairs]
  if len(words) < n:
    words += [''.join((a, b, c)) for a, b in pairs for c in syllables if c != b]
  return [w.capitalize() for w in words]


def names(n_entities: int, seed: int) -> list[str]:
  """n "First Surname" names, seeded; no first name or surname is used twice."""
  firsts, surnames = _words(FIRST_SYLLABLES, n_entities), _words(SYLLABLES, n_entities)
  capacity = min(len(firsts), len(surnames))
  if n_entities > capacity:
    raise DataError(f'{n_entities} entities asked; the name lists give at most {capacity}')
  rng = np.random.default_rng([seed, 0])
  first_N, last_N = (rng.choice(len(words), n_entities, replace=False) for words in (firsts, surnames))
  return [f'{firsts[i]} {surnames[j]}' for i, j in zip(first_N, last_N)]


def entities(n_entities: int, seed: int) -> list[dict]:
  """[{name, <attribute>: value, ...}], seeded."""
  rng = np.random.default_rng([seed, 1])
  picks_NxA = rng.integers(0, 16, (n_entities, len(ATTRIBUTES)))
  return [{'name': name, **{a: VALUES[a][picks_NxA[i, j]] for j, a in enumerate(ATTRIBUTES)}}
          for i, name in enumerate(names(n_entities, seed))]


def biography(entity: dict, template: int, rng: np.random.Generator) -> str:
  """The entity's facts in one template, sentences in a random order."""
  order = rng.permutation(len(ATTRIBUTES))
  return ' '.join(TEMPLATES[ATTRIBUTES[j]][template].format(n=entity['name'], v=entity[ATTRIBUTES[j]]) + '.'
                  for j in order)


def prompt(entity: dict, attribute: str, template: int) -> str:
  """The template's sentence about the attribute, cut before the value."""
  return TEMPLATES[attribute][template].split('{v}')[0].rstrip().format(n=entity['name'])


def write_facts(out_dir: str, n_entities: int, seed: int = 0, probes: int = 0) -> dict[str, str]:
  """Writes the four files of the module docstring into out_dir; returns {stem: path}.
  `probes` > 0 caps the number of probed (entity, attribute) pairs."""
  if n_entities < 1:
    raise DataError(f'n_entities={n_entities}; give at least one entity')
  people = entities(n_entities, seed)
  rng = np.random.default_rng([seed, 2])
  n_templates = len(TEMPLATES[ATTRIBUTES[0]])
  train = [' '.join(biography(e, t, rng) for t in range(TRAIN_TEMPLATES)) for e in people]
  heldout = [' '.join(biography(e, t, rng) for t in range(TRAIN_TEMPLATES, n_templates)) for e in people]
  pairs = n_entities * len(ATTRIBUTES)
  chosen = np.arange(pairs) if not probes or probes >= pairs else np.sort(rng.choice(pairs, probes, replace=False))
  records = {stem: [] for stem in ('probes', 'probes_heldout')}
  for p in chosen:
    e, attribute = people[p // len(ATTRIBUTES)], ATTRIBUTES[p % len(ATTRIBUTES)]
    for stem, template in (('probes', 0), ('probes_heldout', HELDOUT_PROBE_TEMPLATE)):
      records[stem].append({'prompt': prompt(e, attribute, template), 'candidates': list(VALUES[attribute]),
                            'answer': e[attribute]})
  records.update(train=[{'text': t} for t in train], heldout=[{'text': t} for t in heldout])
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for name in FILES:
    stem = name.removesuffix('.jsonl')
    paths[stem] = os.path.join(out_dir, name)
    content = ''.join(json.dumps(r) + '\n' for r in records[stem]).encode()
    if os.path.exists(paths[stem]) and _read_bytes(paths[stem]) == content:
      continue  # left untouched, so a dataset prepared from it stays valid (prepare keys on mtime)
    with atomic_write(paths[stem], 'wb') as f:
      f.write(content)
  return paths


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()
