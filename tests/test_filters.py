"""data.filter (hmem/data/filters.py): what a filter keeps, and what it refuses to parse. < 1 s."""

import pickle

import pytest

from hmem.data.filters import parse_filter
from hmem.errors import ConfigError

RECORDS = [
    {'language': 'en', 'score': 0.9, 'dump': 'CC-1'},
    {'language': 'en', 'score': 0.2, 'dump': 'CC-2'},
    {'language': 'de', 'score': 0.7, 'dump': 'CC-1'},
    {'language': None, 'score': 0.8},         # null and missing fields
    {'language': 'en', 'score': 'high'},      # a string where a number is compared
    {'score': -3},
]


def kept(text):
  keep = parse_filter(text)
  return [i for i, record in enumerate(RECORDS) if keep.keeps(record)]


@pytest.mark.parametrize('text, expected', [
    ("language == 'en'", [0, 1, 4]),
    ("language != 'en'", [2]),                         # null and missing never compare
    ("language == 'en' and score >= 0.5", [0]),        # 'high' >= 0.5 is no match, not an error
    ("language == 'de' or score < 0.5", [1, 2, 5]),
    ("not language == 'en'", [2, 3, 5]),
    ("0.5 <= score < 0.85", [2, 3]),
    ("dump in ('CC-1', 'CC-3')", [0, 2]),
    ("dump not in ['CC-1']", [1]),
    ("score == -3", [5]),
    ("(language == 'en' or language == 'de') and not score > 0.8", [1, 2, 4]),  # 'high' > 0.8 is false
])
def test_a_filter_keeps_the_records_it_holds_for(text, expected):
  assert kept(text) == expected
  assert parse_filter(text).columns <= {'language', 'score', 'dump'}


def test_an_empty_filter_is_none_and_a_filter_pickles_as_its_text():
  assert parse_filter('') is None and parse_filter('  ') is None
  keep = pickle.loads(pickle.dumps(parse_filter("language == 'en' and score > 0.5")))
  assert keep.columns == {'language', 'score'} and [keep.keeps(r) for r in RECORDS[:2]] == [True, False]


@pytest.mark.parametrize('text, message', [
    ("language = 'en'", 'is not an expression'),
    ("__import__('os').system('true') == 0", 'is not allowed'),
    ('meta.language == 1', 'is not allowed'),
    ('score + 1 > 2', 'is not allowed'),
    ('language is None', 'is not allowed'),
    ("language", 'is not allowed'),
    ('1 == 1', 'compares no field'),
])
def test_a_filter_outside_the_grammar_is_refused_by_name(text, message):
  with pytest.raises(ConfigError, match=message):
    parse_filter(text)
