"""The tasks' records as lm-eval datasets: each task's YAML names its loader here
(`custom_dataset: !function records.NAME`; lm-eval loads this file by its path), so the
records come from data/ beside it, with no dataset hub or cache."""

import json
import pathlib

import datasets

_DATA = pathlib.Path(__file__).resolve().parent / 'data'


def _load(name: str) -> datasets.DatasetDict:
  with open(_DATA / f'{name}.jsonl', encoding='utf-8') as f:
    return datasets.DatasetDict({'test': datasets.Dataset.from_list([json.loads(line) for line in f])})


def atomic_number(**metadata) -> datasets.DatasetDict:
  del metadata  # lm-eval passes the task's metadata to a custom dataset
  return _load('atomic_number')


def capital(**metadata) -> datasets.DatasetDict:
  del metadata
  return _load('capital')


def wiki_heldout(**metadata) -> datasets.DatasetDict:
  del metadata
  return _load('wiki_heldout')
