"""`hmem quickstart` at CI scale: the wiki sample, a tiny model, a few steps. Every stage runs
and leaves its artifact, the last line is the JSON summary, and a rerun reuses every stage."""

import json
import math
import os

import numpy as np
import pytest
from conftest import REPO, WIKI

from hmem.cli import main
from hmem.config import load_config
from hmem.data.prepare import held_out
from hmem.errors import DataError
from hmem.quickstart.run import MODES, SPLITS, _eval_files, quickstart

TINY = ('model.vocab_size=512', 'model.d_model=64', 'model.head_dim=16', 'model.ffn=128', 'memory.levels=(8, 4)',
        'data.seq_len=64', 'data.tokenizer_sample=400', 'data.tree_sample=400', 'data.kmeans_samples=256',
        'data.kmeans_steps=5', 'data.tfidf_dim=32', 'data.eval_fraction=0.1', 'train.steps=4',
        'train.checkpoint_every=4', 'train.eval_every=0', 'train.log_every=4', 'train.warmup_steps=2')


def _corpus(path, texts, bad_lines: dict[int, str]) -> dict[int, str]:
  """A JSONL corpus with the text under "body" and `bad_lines` (line -> content) among the
  records; returns the kept documents by line, as prepare reads them."""
  lines, kept = [], {}
  for text in texts:
    while len(lines) in bad_lines:
      lines.append(bad_lines[len(lines)])
    kept[len(lines)] = text
    lines.append(json.dumps({'body': text, 'text': 'not this field'}))
  path.write_text('\n'.join(lines) + '\n')
  return kept


def _wiki(n=None):
  with open(WIKI) as f:
    return [json.loads(line)['text'] for line in f][:n]


BAD_LINES = {3: '', 7: '{"body": "unterminated', 8: '{"text": "no body"}', 12: '{"body": "a\\ud800b"}'}


def test_eval_documents_are_read_as_prepare_reads_them(tmp_path):
  """A blank line, malformed JSON, a record without data.text_field and a lone surrogate are
  skipped as prepare skips them; the held-out documents are prepare's by line number."""
  kept = _corpus(tmp_path / 'corpus.jsonl', _wiki(60), BAD_LINES)
  paths = _eval_files(str(tmp_path / 'corpus.jsonl'), str(tmp_path), 'body', 0.2, 10, seed=0)
  read = {split: [json.loads(line)['text'] for line in open(path)] for split, path in paths.items()}
  lines = np.array(sorted(kept))
  is_held_out = held_out(0, lines, 0.2)
  assert read['heldout'] == [kept[i] for i in lines[is_held_out]] and read['heldout']
  assert len(read['train']) == 10 and set(read['train']) <= {kept[i] for i in lines[~is_held_out]}


def test_a_corpus_with_nothing_usable_stops_before_any_work(tmp_path):
  (tmp_path / 'bad.jsonl').write_text('\n{"text": "unterminated\n{"title": "x"}\n')
  cfg = load_config(str(REPO / 'configs' / 'quickstart.py'))
  with pytest.raises(DataError, match=r'bad\.jsonl: no usable document \(1 blank_line, 1 malformed_json, '
                                      r"1 missing_field\); .* in 'text' \(data.text_field\)"):
    quickstart(cfg, str(tmp_path / 'work'), corpus=str(tmp_path / 'bad.jsonl'), progress=False)
  assert sorted(os.listdir(tmp_path / 'work')) == []


def test_a_probe_file_without_questions_stops_before_any_work(tmp_path):
  kept = _corpus(tmp_path / 'corpus.jsonl', _wiki(60), {})
  (tmp_path / 'probes.jsonl').write_text(json.dumps({'text': kept[0]}) + '\n')
  cfg = load_config(str(REPO / 'configs' / 'quickstart.py'))
  cfg.data.text_field = 'body'
  with pytest.raises(DataError, match=r'probes .*probes\.jsonl: no multiple-choice record \(1 text records\)'):
    quickstart(cfg, str(tmp_path / 'work'), corpus=str(tmp_path / 'corpus.jsonl'),
               probes=str(tmp_path / 'probes.jsonl'), progress=False)
  assert not (tmp_path / 'work' / 'data').exists()


def _probes(path, texts, n=12):
  """Cloze questions on training texts: the first 6 words, then the 7th word among 4."""
  words = [t.split() for t in texts if len(t.split()) > 8][:n + 3]
  with open(path, 'w') as f:
    for i in range(n):
      candidates = [words[i + j][6] for j in range(4)]
      f.write(json.dumps({'prompt': ' '.join(words[i][:6]), 'candidates': candidates, 'answer': candidates[0]})
              + '\n')


def _run(workdir, capsys) -> dict:
  """The quickstart on the wiki sample with bad lines among the records, the text under
  another field (data.text_field), and 12 probe questions."""
  corpus = workdir / 'corpus_with_bad_lines.jsonl'
  if not corpus.exists():
    _corpus(corpus, _wiki(), BAD_LINES)
    _probes(workdir / 'probes.jsonl', _wiki())
  argv = ['quickstart', '--config', str(REPO / 'configs' / 'quickstart.py'), '--workdir', str(workdir),
          '--corpus', str(corpus), '--train-docs', '40', '--no-progress', '--config.data.text_field=body',
          '--probes', str(workdir / 'probes.jsonl'), *(f'--config.{o}' for o in TINY)]
  assert main(argv) == 0
  out = capsys.readouterr().out
  return json.loads(out.strip().splitlines()[-1]), out


def test_quickstart_end_to_end_and_rerun(tmp_path, capsys):
  figures, out = _run(tmp_path, capsys)
  for split in SPLITS:
    for mode in MODES:
      value = figures[f'ppl_{split}_{mode}']
      assert math.isfinite(value) and 1 < value < 512 * 2, (split, mode, value)
  for mode in MODES:  # a whole number of the 12 questions
    right = figures[f'acc_probes_{mode}'] * 12
    assert 0 <= right <= 12 and right == pytest.approx(round(right)), mode
  assert figures['documents_train'] == 40 and figures['documents_probes'] == 12
  assert 0 < figures['documents_heldout'] < 100  # ~10% of the 400 documents
  assert figures['minutes'] > 0
  for name in ('anchor', 'memory', 'dense'):
    assert os.path.isdir(tmp_path / name / 'checkpoints'), name
  assert (tmp_path / 'bundle' / 'manifest.json').is_file()
  assert (tmp_path / 'quickstart.png').stat().st_size > 1000
  assert 'training docs (40)' in out and 'blocked' in out
  assert 'probe accuracy (12)' in out
  # The dense baseline saw the memory run's batches: equal tokens, no memory.
  dense = json.loads((tmp_path / 'dense' / 'config.json').read_text())
  memory = json.loads((tmp_path / 'memory' / 'config.json').read_text())
  assert dense['train'] == memory['train'] and dense['data'] == memory['data']
  assert set(dense['memory']['levels']) == {0} and memory['memory']['levels'] == [8, 4]

  mtimes = {p: os.path.getmtime(tmp_path / p) for p in ('bundle/manifest.json', 'eval_memory_train.json',
                                                          'eval_dense_heldout.json')}
  again, _ = _run(tmp_path, capsys)
  assert {k: v for k, v in again.items() if 'minutes' not in k} == \
      {k: v for k, v in figures.items() if 'minutes' not in k}
  assert {p: os.path.getmtime(tmp_path / p) for p in mtimes} == mtimes  # nothing exported or scored again
  # A changed probe file is scored again; nothing else is.
  probes_scored = os.path.getmtime(tmp_path / 'eval_memory_probes.json')
  os.utime(tmp_path / 'probes.jsonl', ns=(1, 1))
  third, _ = _run(tmp_path, capsys)
  assert os.path.getmtime(tmp_path / 'eval_memory_probes.json') > probes_scored
  assert {p: os.path.getmtime(tmp_path / p) for p in mtimes} == mtimes
  assert {k: v for k, v in third.items() if 'minutes' not in k} == \
      {k: v for k, v in figures.items() if 'minutes' not in k}
