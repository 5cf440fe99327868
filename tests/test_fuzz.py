"""Fuzzing with hypothesis: random invalid config overrides get one `hmem: error:` line,
never a traceback; random, broken and mixed-encoding input files are read with every record
counted (kept or skipped by reason) and every kept document byte-exact."""

import contextlib
import gzip
import io
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hmem.cli import main
from hmem.config import default_config, flat_keys
from hmem.data.inputs import ReadStats, read_documents
from hmem.errors import DataError

KEYS = flat_keys(default_config())
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values as a user might mistype them: numbers of every sign and size, other types, junk text.
values = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.integers(-3, 3).map(str),
    st.tuples(st.integers(-2, 2), st.integers(-2, 2)).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(['', 'true', 'False', 'None', '()', '(1,', '[1, 2]', '{}', "'x'", '1e999', '-0', 'nan', '(-1,)',
                     '(0, 0, 0, 0)', '(1, 2)', "('a', 'b')", '"unterminated', '0x10', '1_000']),
    st.text(max_size=20))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=20), st.sampled_from(KEYS).map(lambda k: k + '.x'),
                 st.sampled_from(KEYS).map(lambda k: k.upper()))


def _run(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = main(argv)
  return rc, err.getvalue()


@FUZZ
@given(overrides=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
# Found by this test: each raised a traceback (a negative size in the model's init, a
# string level in int()) before hmem.config.check_values.
@example(overrides=[('model.layers', '-1')])
@example(overrides=[('model.head_dim', '-3')])
@example(overrides=[('memory.levels', "('a', 'b')")])
def test_config_overrides_are_accepted_or_one_line_errors(repo, overrides):
  """`hmem sizes` resolves the config, checks the memory settings and counts parameters;
  whatever the overrides, it succeeds or prints one line, never a traceback."""
  argv = ['sizes', '--config', str(repo / 'configs/tiny.py')] + [f'--config.{k}={v}' for k, v in overrides]
  rc, err = _run(argv)
  assert rc in (0, 2)
  if rc == 2:
    assert err.startswith('hmem: error: ') and err.count('\n') == 1, err


@pytest.mark.parametrize('override', ['model.heads=0', 'model.d_model=0', 'model.kv_heads=3', 'train.log_every=0',
                                      'memory.levels=(1.5, 2)', 'train.lr=-0.1', 'data.seq_len=-8'])
def test_out_of_range_values_are_errors_not_silent(repo, override):
  """Found by the fuzzing above: these were accepted, giving a model of zero width, a
  division by zero at the first log step, or a fractional memory width."""
  rc, err = _run(['sizes', '--config', str(repo / 'configs/tiny.py'), f'--config.{override}'])
  assert rc == 2 and err.startswith(f'hmem: error: {override.split("=")[0]}=') and err.count('\n') == 1, err


# One JSONL line of each kind; `None` as expected text means the line must be skipped.
_text = st.text(min_size=1).filter(lambda t: t.strip())
_kept = _text.filter(lambda t: not any(0xd800 <= ord(c) <= 0xdfff for c in t))
_lines = st.one_of(
    _kept.map(lambda t: (json.dumps({'text': t}).encode(), t)),
    _kept.map(lambda t: (json.dumps({'text': t, 'n': 1}, ensure_ascii=False).encode('utf-8'), t)),
    _kept.map(lambda t: ('{"text": ' + json.dumps(t)[:-1]).encode()).map(lambda b: (b, None)),  # cut short
    _kept.map(lambda t: (json.dumps({'text': t}, ensure_ascii=False).encode('utf-8')[:-2] + b'\xff"}', None)),
    st.sampled_from(['caf\xe9 cr\xe8me', 'na\xefve \xe0 la']).map(  # Latin-1, not UTF-8
        lambda t: (json.dumps({'text': t}, ensure_ascii=False).encode('latin-1'), None)),
    st.binary(max_size=200).map(lambda b: (b.replace(b'\n', b''), 'any')),
    st.just((b'', None)), st.just((b'[1, 2]', None)), st.just((b'{"text": 3}', None)), st.just((b'{}', None)),
    st.just((json.dumps({'text': 'x' * 2_000_000}).encode(), 'x' * 2_000_000)),  # a huge line
)


@FUZZ
@given(lines=st.lists(_lines, max_size=12), gz=st.booleans())
def test_jsonl_records_are_counted_and_kept_byte_exact(lines, gz, tmp_path):
  data = b''.join(raw + b'\n' for raw, _ in lines)
  path = tmp_path / ('in.jsonl.gz' if gz else 'in.jsonl')
  path.write_bytes(gzip.compress(data) if gz else data)
  stats = ReadStats()
  docs = list(read_documents(str(path), 0, 'text', stats))
  assert stats.read == len(lines) and stats.kept == len(docs) == stats.read - sum(stats.skipped.values())
  kept = {d.index: d.text for d in docs}
  for i, (raw, expected) in enumerate(lines):
    if expected == 'any':  # random bytes: skipped, or kept as exactly the text they encode
      assert i not in kept or kept[i] == json.loads(raw.decode('utf-8'))['text']
    elif expected is None:
      assert i not in kept
    else:
      assert kept[i] == expected and kept[i].encode('utf-8') == expected.encode('utf-8')


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode('utf-8', 'replace')),
                      st.text(max_size=50).map(lambda t: t.encode('utf-16'))))
def test_text_files_are_kept_exactly_or_skipped(data, tmp_path):
  path = tmp_path / 'doc.txt'
  path.write_bytes(data)
  stats = ReadStats()
  docs = list(read_documents(str(path), 0, 'text', stats))
  assert stats.read == 1
  if docs:
    assert docs[0].text.encode('utf-8') == data
  else:
    assert set(stats.skipped) <= {'non_utf8', 'empty', 'invalid_unicode'}


@FUZZ
@given(data=st.binary(min_size=1, max_size=300))
def test_a_corrupt_compressed_file_is_one_data_error(data, tmp_path):
  path = tmp_path / 'in.jsonl.gz'
  path.write_bytes(b'\x1f\x8b' + data)  # a gzip header, then garbage
  try:
    list(read_documents(str(path), 0, 'text', ReadStats()))
  except DataError as e:
    assert 'in.jsonl.gz' in str(e) and '\n' not in str(e)
