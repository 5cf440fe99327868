"""`hmem quickstart` at CI scale: the wiki sample, a tiny model, a few steps. Every stage runs
and leaves its artifact, the last line is the JSON summary, and a rerun reuses every stage."""

import json
import math
import os

from conftest import REPO, WIKI

from hmem.cli import main
from hmem.quickstart import MODES, SPLITS

TINY = ('model.vocab_size=512', 'model.d_model=64', 'model.head_dim=16', 'model.ffn=128', 'memory.levels=(8, 4)',
        'data.seq_len=64', 'data.tokenizer_sample=400', 'data.tree_sample=400', 'data.kmeans_samples=256',
        'data.kmeans_steps=5', 'data.tfidf_dim=32', 'data.eval_fraction=0.1', 'train.steps=4',
        'train.checkpoint_every=4', 'train.eval_every=0', 'train.log_every=4', 'train.warmup_steps=2')


def _run(workdir, capsys) -> dict:
  argv = ['quickstart', '--config', str(REPO / 'configs' / 'quickstart.py'), '--workdir', str(workdir),
          '--corpus', str(WIKI), '--train-docs', '40', '--no-progress', *(f'--config.{o}' for o in TINY)]
  assert main(argv) == 0
  out = capsys.readouterr().out
  return json.loads(out.strip().splitlines()[-1]), out


def test_quickstart_end_to_end_and_rerun(tmp_path, capsys):
  figures, out = _run(tmp_path, capsys)
  for split in SPLITS:
    for mode in MODES:
      value = figures[f'ppl_{split}_{mode}']
      assert math.isfinite(value) and 1 < value < 512 * 2, (split, mode, value)
  assert figures['documents_train'] == 40
  assert 0 < figures['documents_heldout'] < 100  # ~10% of the 400 documents
  assert figures['minutes'] > 0
  for name in ('anchor', 'memory', 'dense'):
    assert os.path.isdir(tmp_path / name / 'checkpoints'), name
  assert (tmp_path / 'bundle' / 'manifest.json').is_file()
  assert (tmp_path / 'quickstart.png').stat().st_size > 1000
  assert 'training docs (40)' in out and 'blocked' in out
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
