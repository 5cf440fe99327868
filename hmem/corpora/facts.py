"""A controlled fact corpus: synthetic biographies of N made-up people, and probes.

The "synthetic biographies" setting for measuring knowledge storage: every entity has a
name whose two words no other entity uses, and one value per attribute (birth year, birth
city, employer, field), drawn uniformly from a fixed list of 16. Each attribute is stated
by one of several paraphrase templates: templates 4 and 5 are never trained on and make
the held-out paraphrase split; a biography is written in `templates` of the others (the
first four by default; up to ten: knowledge augmentation, more phrasings of each fact).

Popularity: entity i is written into `document_counts(...)[i]` training documents. Under
'uniform' every entity has one; under 'zipf' the i-th entity (i = 0, 1, ...; names and
values are random, so the order is too) has max(1, round(max_documents / (i + 1) **
exponent)): a head of common facts stated hundreds of times, a long tail stated once.
Probes are grouped by the popularity bucket of their entity (`bucket`: 1, 2-3, 4-15,
16-63, 64+ documents).

`write_facts(out_dir, n_entities, seed, ...)` writes (all seeded, byte-deterministic):
  train.jsonl          {"text"}: the training documents, an entity's copies in a row; each
                       is its biography written once in each training template (sentence
                       order shuffled per biography; after the first copy, the templates'
                       order too): the corpus `hmem prepare` reads. An entity's name occurs
                       in its own documents only, so every fact is stated there and nowhere
                       else.
  heldout.jsonl        {"text"}: the same facts in the held-out templates, one document per
                       entity (`hmem eval` perplexity: recall that is not template copying).
  probes.jsonl         `hmem eval` multiple choice, one per (entity, attribute):
                       {"prompt": "The birth city of NAME is", "candidates": [16 cities],
                       "answer": "...", "documents": the entity's training documents}; the
                       prompt is a training template cut at the value (`hmem eval` ignores
                       "documents").
  probes_heldout.jsonl the same questions asked in a held-out template
                       ("NAME is a native of"), a phrasing never trained on.
`probes` caps how many (entity, attribute) pairs get a probe: a seeded sample, shared out
equally over the popularity buckets (a bucket with fewer pairs is probed whole and its
share goes to the others), the same pairs in both probe files. Chance accuracy is 1/16.
"""

from __future__ import annotations

import bisect
import dataclasses
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
# prompt for the value. Index 0 is the probe's phrasing; 4 and 5 are held out; 6.. are the
# augmentation's, which use no word of a held-out template that 0..3 do not (tested).
TEMPLATES = {
    'birth year': ('The birth year of {n} is {v}', '{n} was born in the year {v}', '{n} came into the world in {v}',
                   'The year {n} was born was {v}', '{n} first saw daylight in {v}', '{n} has been alive since {v}',
                   'The year of birth of {n} was {v}', '{n} arrived as an infant in {v}',
                   'Records put the birth of {n} in {v}', '{n} was born during {v}', '{n} entered life in {v}',
                   'The calendar year that {n} began in is {v}'),
    'birth city': ('The birth city of {n} is {v}', '{n} was born in the city of {v}', '{n} grew up in {v}',
                   'The hometown of {n} is {v}', '{n} is a native of {v}', '{n} spent childhood in {v}',
                   'The place of birth of {n} is {v}', '{n} originates in {v}', '{n} was raised in {v}',
                   'The city where {n} was born is {v}', 'The birthplace of {n} is {v}',
                   'The town that {n} started out in is {v}'),
    'employer': ('The employer of {n} is {v}', '{n} works for {v}', '{n} is employed by {v}',
                 'The company of {n} is {v}', '{n} earns a salary from {v}', '{n} holds a job at {v}',
                 'The workplace of {n} is {v}', '{n} was hired by {v}', '{n} is on the staff of {v}',
                 'The firm that pays {n} is {v}', '{n} is on the payroll of {v}', '{n} is an employee of {v}'),
    'field': ('The field of {n} is {v}', '{n} studies {v}', '{n} is an expert in {v}',
              'The specialty of {n} is {v}', '{n} devotes a career to {v}', '{n} does research in {v}',
              'The discipline of {n} is {v}', '{n} specialises in {v}', '{n} is an authority on {v}',
              'The subject of {n} is {v}', '{n} trained in {v}', '{n} lectures on {v}'),
}
HELDOUT_TEMPLATES = (4, 5)
TRAINABLE_TEMPLATES = tuple(t for t in range(len(TEMPLATES[ATTRIBUTES[0]])) if t not in HELDOUT_TEMPLATES)
TRAIN_TEMPLATES = 4   # the default: templates 0..3; `templates` up to len(TRAINABLE_TEMPLATES) adds 6, 7, ...
HELDOUT_PROBE_TEMPLATE = 4
FILES = ('train.jsonl', 'heldout.jsonl', 'probes.jsonl', 'probes_heldout.jsonl')

POPULARITY = ('uniform', 'zipf')
# Lower edges of the popularity buckets (training documents per entity): 1, 2-3, 4-15, 16-63, 64+.
BUCKET_EDGES = (1, 2, 4, 16, 64)


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


@dataclasses.dataclass(frozen=True)
class Popularity:
  """How many training documents each entity gets (the module docstring's law)."""
  law: str = 'uniform'
  exponent: float = 1.0
  max_documents: int = 256

  def __post_init__(self):
    if self.law not in POPULARITY:
      raise DataError(f'popularity law {self.law!r}; use one of {", ".join(POPULARITY)}')
    if not self.exponent > 0 or self.max_documents < 1:
      raise DataError(f'zipf exponent {self.exponent} and max_documents {self.max_documents}; give an exponent > 0 '
                      'and at least one document')

  def counts(self, n_entities: int) -> np.ndarray:
    """[n_entities] training documents per entity."""
    if self.law == 'uniform':
      return np.ones(n_entities, np.int64)
    rank_N = np.arange(1, n_entities + 1)
    return np.maximum(1, np.round(self.max_documents / rank_N ** self.exponent)).astype(np.int64)

  @property
  def tag(self) -> str:
    """A short name of the law, for run directories: 'uniform', 'zipf1-256'."""
    return self.law if self.law == 'uniform' else f'zipf{self.exponent:g}-{self.max_documents}'


def bucket(documents: int) -> str:
  """The popularity bucket of an entity with this many training documents: '1', '2-3', ..., '64+'."""
  return BUCKETS[bisect.bisect_right(BUCKET_EDGES, documents) - 1]


BUCKETS = tuple(f'{lo}' if hi == lo + 1 else f'{lo}-{hi - 1}' if hi else f'{lo}+'
                for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:] + (None,)))


def write_facts(out_dir: str, n_entities: int, seed: int = 0, probes: int = 0, popularity: Popularity = Popularity(),
                templates: int = TRAIN_TEMPLATES) -> dict[str, str]:
  """Writes the four files of the module docstring into out_dir; returns {stem: path}.
  `probes` > 0 caps the number of probed (entity, attribute) pairs; `templates` is the
  number of training templates each biography is written in."""
  if n_entities < 1:
    raise DataError(f'n_entities={n_entities}; give at least one entity')
  if not 1 <= templates <= len(TRAINABLE_TEMPLATES):
    raise DataError(f'templates={templates}; give 1 to {len(TRAINABLE_TEMPLATES)} training templates per fact')
  people, counts_N = entities(n_entities, seed), popularity.counts(n_entities)
  trained = TRAINABLE_TEMPLATES[:templates]
  rng = np.random.default_rng([seed, 2])
  # The first copy keeps the templates in order, so a uniform corpus is the same bytes as
  # before popularity existed (and the figures measured on it stay valid).
  train = [' '.join(biography(e, t, rng) for t in (trained if copy == 0 else rng.permutation(trained)))
           for e, count in zip(people, counts_N) for copy in range(count)]
  heldout = [' '.join(biography(e, t, rng) for t in HELDOUT_TEMPLATES) for e in people]
  records = {stem: [] for stem in ('probes', 'probes_heldout')}
  for p in _probed_pairs(counts_N, probes, rng):
    i, attribute = p // len(ATTRIBUTES), ATTRIBUTES[p % len(ATTRIBUTES)]
    for stem, template in (('probes', 0), ('probes_heldout', HELDOUT_PROBE_TEMPLATE)):
      records[stem].append({'prompt': prompt(people[i], attribute, template), 'candidates': list(VALUES[attribute]),
                            'answer': people[i][attribute], 'documents': int(counts_N[i])})
  records.update(train=[{'text': t} for t in train], heldout=[{'text': t} for t in heldout])
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for name in FILES:
    stem = name.removesuffix('.jsonl')
    paths[stem] = os.path.join(out_dir, name)
    write_if_changed(paths[stem], records[stem])
  return paths


def _probed_pairs(counts_N: np.ndarray, probes: int, rng: np.random.Generator) -> np.ndarray:
  """Sorted (entity * len(ATTRIBUTES) + attribute) pairs to probe: all, or `probes` of
  them shared out equally over the popularity buckets, smallest bucket first (one whole
  when it holds fewer than its share; the rest split the remainder)."""
  pairs = len(counts_N) * len(ATTRIBUTES)
  if not probes or probes >= pairs:
    return np.arange(pairs)
  bucket_P = np.repeat(np.searchsorted(BUCKET_EDGES, counts_N, side='right'), len(ATTRIBUTES))
  groups = sorted((np.flatnonzero(bucket_P == b) for b in np.unique(bucket_P)), key=len)
  chosen, left = [], probes
  for j, group in enumerate(groups):
    share = min(len(group), left // (len(groups) - j))
    chosen.append(group if share == len(group) else rng.choice(group, share, replace=False))
    left -= share
  return np.sort(np.concatenate(chosen))


def write_if_changed(path: str, records: list[dict]) -> None:
  """Writes records as JSONL, atomically; a file that already holds these bytes is left
  untouched, so a dataset prepared or an evaluation cached from it stays valid (both key
  on the modification time)."""
  content = ''.join(json.dumps(r) + '\n' for r in records).encode()
  if os.path.exists(path) and _read_bytes(path) == content:
    return
  with atomic_write(path, 'wb') as f:
    f.write(content)


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()
