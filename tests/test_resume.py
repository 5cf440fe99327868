"""Resuming a run: damaged metrics, changed configs, damaged checkpoints."""

import json
import os

import pytest

from hmem.train.metrics import MetricsWriter


def _write_rows(workdir, steps):
  with open(workdir / 'metrics.jsonl', 'w') as f:
    for step in steps:
      f.write(json.dumps({'step': step, 'loss': 1.0 / step}) + '\n')


def _steps(workdir):
  return [json.loads(line)['step'] for line in open(workdir / 'metrics.jsonl')]


@pytest.mark.parametrize('cut, kept', [(1, [1, 2]), (7, [1, 2]), (-1, [1, 2, 3])])
def test_a_truncated_last_metrics_line_is_dropped_on_resume(tmp_path, cut, kept):
  """A kill during a write leaves part of a line: `cut` bytes of it (dropped), or all but
  its newline (a whole row: kept, and the next row starts on a line of its own)."""
  _write_rows(tmp_path, [1, 2, 3])
  size = os.path.getsize(tmp_path / 'metrics.jsonl')
  last = len(json.dumps({'step': 3, 'loss': 1.0 / 3})) + 1
  os.truncate(tmp_path / 'metrics.jsonl', size - last + cut if cut > 0 else size + cut)
  writer = MetricsWriter(str(tmp_path), resume_step=3)
  writer.write(4, {'loss': 0.5})
  writer.close()
  assert _steps(tmp_path) == kept + [4]


def test_a_damaged_metrics_line_before_the_last_is_an_error(tmp_path):
  from hmem.errors import CheckpointError
  _write_rows(tmp_path, [1, 2, 3])
  text = (tmp_path / 'metrics.jsonl').read_text().replace('"step": 2', '"st')
  (tmp_path / 'metrics.jsonl').write_text(text)
  with pytest.raises(CheckpointError, match='metrics.jsonl line 2'):
    MetricsWriter(str(tmp_path), resume_step=3)
