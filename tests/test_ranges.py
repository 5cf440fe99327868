"""Inputs cut into ranges (hmem/data/ranges.py) and read a range at a time (inputs.read_range):
whatever the cut, the same documents, keys and skip counts as reading each file whole. ~2 s."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from hmem.data.filters import parse_filter
from hmem.data.inputs import ReadStats, read_documents, read_range
from hmem.data.ranges import count_lines, counted, first_keys, plan_ranges
from hmem.errors import DataError


def read_cut(files, range_bytes, text_field='text', keep=None):
  """(ranges, documents, stats) of `files` read range by range, as prepare's passes read them."""
  cut = plan_ranges([str(f) for f in files], range_bytes, keep.columns if keep else ())
  firsts = first_keys(cut, {r.id: count_lines(r) for r in counted(cut)})
  stats = ReadStats()
  docs = [doc for r in cut for doc in read_range(r._replace(first=firsts[r.id]), text_field, stats, keep)]
  return cut, docs, stats


def read_whole(files, text_field='text'):
  stats = ReadStats()
  return [doc for i, f in enumerate(files) for doc in read_documents(str(f), i, text_field, stats)], stats


@pytest.mark.parametrize('trailing_newline', [True, False])
def test_byte_ranges_give_every_line_once_whatever_the_cut(tmp_path, trailing_newline):
  """Cuts at every byte: inside multi-byte characters (2, 3 and 4 bytes), inside a record
  longer than many ranges, at blank lines and bad records; a last line with or without a
  newline."""
  records = [json.dumps({'text': t}, ensure_ascii=False).encode() for t in
             ['plain ascii', 'café naïve façade', '中文的文本', 'emoji 😀 and 🎉', 'long ' * 120, 'ünïcödé']]
  lines = [records[0], b'', records[1], b'{"text": "unterminated', records[2], b'\xff\xfe', records[3],
           records[4], b'[1, 2]', records[5], b'{"body": "no text"}']
  data = b'\n'.join(lines) + (b'\n' if trailing_newline else b'')
  path = tmp_path / 'corpus.jsonl'
  path.write_bytes(data)
  whole, whole_stats = read_whole([path])
  assert [d.index for d in whole] == [0, 2, 4, 6, 7, 9] and whole_stats.read == 11
  starts = set()
  for size in (1, 2, 3, 5, 8, 13, 21, 34, 97, 500, len(data) - 1, len(data), 1 << 20):
    cut, docs, stats = read_cut([path], size)
    assert [(r.start, r.stop) for r in cut] == [(a, min(a + size, len(data))) for a in range(0, len(data), size)]
    assert docs == whole and stats == whole_stats, f'range size {size}'
    if size > 1:  # (size 1 cuts everywhere)
      starts |= {r.start for r in cut}
  # The cuts fell inside characters of 2, 3 and 4 bytes, and inside the long record.
  for text in ('ç', '中', '😀'):
    at = data.index(text.encode())
    assert starts & set(range(at + 1, at + len(text.encode())))
  long_start = data.index(records[4])
  assert len(starts & set(range(long_start + 1, long_start + len(records[4])))) > 10


def test_line_counts_and_first_keys(tmp_path):
  path = tmp_path / 'a.jsonl'
  path.write_bytes(b'a\n\nbb\nccc\n\nd')  # lines start at bytes 0, 2, 3, 6, 10, 11
  cut = plan_ranges([str(path)], 4)  # [0, 4) [4, 8) [8, 12)
  assert [r.first for r in cut] == [0, -1, -1] and counted(cut) == cut[:2]
  assert [count_lines(r) for r in cut] == [3, 1, 2]
  assert first_keys(cut, {0: 3, 1: 1}) == {0: 0, 1: 3, 2: 4}
  empty = tmp_path / 'empty.jsonl'
  empty.write_bytes(b'')
  assert plan_ranges([str(empty)], 4)[0][3:] == ('bytes', 0, 0, 0) and read_cut([empty], 4)[1] == []


def test_parquet_ranges_are_runs_of_row_groups_keyed_by_row(tmp_path):
  texts = [f'row {i} ' * (i % 7 + 1) if i % 9 else None for i in range(100)]
  path = tmp_path / 'rows.parquet'
  pq.write_table(pa.table({'id': np.arange(100), 'text': texts}), path, row_group_size=16)  # 7 groups
  whole, whole_stats = read_whole([path])
  cut, docs, stats = read_cut([path], 1)  # every group its own range
  assert [(r.unit, r.start, r.stop, r.first) for r in cut] == [('row_groups', g, g + 1, 16 * g) for g in range(7)]
  assert docs == whole and stats == whole_stats and whole_stats.skipped == {'missing_field': 12}
  group_bytes = pq.read_metadata(path).row_group(0).total_byte_size
  cut, docs, _ = read_cut([path], 2 * group_bytes)  # two groups a range (the last may be shorter)
  assert [(r.start, r.stop) for r in cut][:2] == [(0, 2), (2, 4)] and docs == whole
  assert len(read_cut([path], 1 << 30)[0]) == 1


def test_compressed_and_text_files_are_one_range_read_as_a_stream(tmp_path):
  body = b''.join(json.dumps({'text': f'document {i}'}).encode() + b'\n' for i in range(50))
  (tmp_path / 'a.jsonl.gz').write_bytes(gzip.compress(body))
  (tmp_path / 'b.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(body))
  (tmp_path / 'c.txt').write_text('one document')
  files = sorted(tmp_path.iterdir())
  cut, docs, stats = read_cut(files, 16)
  assert [(r.unit, r.first) for r in cut] == [('file', 0)] * 3
  assert (docs, stats) == read_whole(files) and len(docs) == 101


def test_a_filter_drops_records_by_their_fields_alike_in_jsonl_and_parquet(tmp_path):
  rng = np.random.default_rng(0)
  language = rng.choice(['en', 'de', 'fr'], 200).tolist()
  score = rng.random(200).round(3).tolist()
  texts = [f'text {i}' if i % 10 else '' for i in range(200)]
  with open(tmp_path / 'web.jsonl', 'w') as f:
    for t, l, s in zip(texts, language, score):
      f.write(json.dumps({'text': t, 'language': l, 'score': s}) + '\n')
  pq.write_table(pa.table({'text': texts, 'language': language, 'score': score}), tmp_path / 'web.parquet',
                 row_group_size=50)
  keep = parse_filter("language == 'en' and score >= 0.5")
  want = [i for i in range(200) if language[i] == 'en' and score[i] >= 0.5]
  for name in ('web.jsonl', 'web.parquet'):
    _, docs, stats = read_cut([tmp_path / name], 700, keep=keep)
    assert [d.index for d in docs] == [i for i in want if i % 10], name
    assert stats.skipped == {'filtered': 200 - len(want), 'empty': sum(1 for i in want if not i % 10)}, name
  with pytest.raises(DataError, match=r"data.filter reads \['lang'\], which .*web.parquet lacks"):
    plan_ranges([str(tmp_path / 'web.parquet')], 700, {'lang'})
