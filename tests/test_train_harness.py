"""`train.harness`: lm-evaluation-harness on the live parameters and bank during training.
The losses and final parameters are those of the same run without it; its rows reach
metrics.jsonl, TensorBoard and W&B; its numbers are `lm_eval --model hmem` on the checkpoint
of the same step (so the live bank rows are caught up as a checkpoint's reader serves them);
a task that does not exist stops the run before any state is built."""

import json

import numpy as np
import pytest
from conftest import MEMORY_RUN, WIKI, assert_trees_close, saved_items, tiny_config

import hmem.infer.live  # noqa: F401  (registers train.harness's hook, as the hmem CLI does)
from hmem.errors import ConfigError
from hmem.train.trainer import train

MODES = ('fetched', 'generic', 'none', 'blocked')


def _config(data, *overrides):
  return tiny_config(*MEMORY_RUN, f'data.path={data}', 'train.steps=4', 'train.log_every=1',
                     'train.checkpoint_every=2', *overrides)


@pytest.fixture(scope='module')
def runs(memory_run, tmp_path_factory):
  """The same 4 steps without and with the harness (every 2 steps: hmem_capital and a
  rolling task from a YAML file, 4 documents each, every mode)."""
  root = tmp_path_factory.mktemp('harness_runs')
  with open(WIKI) as f:
    texts = [json.loads(line)['text'] for line in f][:4]
  (root / 'docs.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  task = root / 'tasks' / 'roll.yaml'
  task.parent.mkdir()
  task.write_text(json.dumps({'task': 'roll_docs', 'dataset_path': 'json', 'test_split': 'test',
                              'dataset_kwargs': {'data_files': {'test': str(root / 'docs.jsonl')}},
                              'output_type': 'loglikelihood_rolling', 'doc_to_text': '', 'doc_to_target': '{{text}}',
                              'metric_list': [{'metric': 'word_perplexity'}]}))
  harness = ('train.harness.every=2', f'train.harness.tasks=hmem_capital,{task}', 'train.harness.limit=4',
             'train.harness.batch_size=4', 'train.trackers=tensorboard,jsonl,wandb', 'train.wandb.mode=offline')
  out = {}
  for name, overrides in (('plain', ()), ('harness', harness)):
    cfg = _config(memory_run[1], *overrides)
    train(cfg, str(root / name), progress=False)
    out[name] = cfg, root / name
  return out


def _rows(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl')]


def test_the_harness_logs_its_metrics_and_leaves_the_trajectory_alone(runs, monkeypatch):
  from test_train import _key, _wandb_records
  from test_workdir_remote import _events
  plain, harness = _rows(runs['plain'][1]), _rows(runs['harness'][1])
  assert [r['loss'] for r in harness] == [r['loss'] for r in plain] and len(plain) == 4  # bitwise
  assert_trees_close(saved_items(runs['harness'][1], items=('params', 'bank')),
                     saved_items(runs['plain'][1], items=('params', 'bank')), rtol=0, atol=0)
  keys = {f'harness/{task}/{metric}/{mode}' for task, metric in (('hmem_capital', 'acc'), ('hmem_capital', 'acc_norm'),
                                                                 ('roll_docs', 'word_perplexity')) for mode in MODES}
  for row in harness:
    logged = {k for k in row if k.startswith('harness/')}
    assert logged == (keys | {'harness/seconds'} if row['step'] % 2 == 0 else set()), row['step']
    if logged:
      assert row['harness/seconds'] > 0 and all(np.isfinite(row[k]) for k in keys)
  # The modes differ (routing and blocking reach the scores) and TensorBoard and W&B hold the rows.
  assert len({harness[-1][f'harness/roll_docs/word_perplexity/{m}'] for m in MODES}) > 1
  events = {(tag, step): value for tag, step, value in _events(runs['harness'][1] / 'tensorboard')}
  records = _wandb_records(next((runs['harness'][1] / 'wandb').glob('offline-run-*')))
  history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
             if r.WhichOneof('record_type') == 'history']
  for row in harness:
    for key in (k for k in row if k.startswith('harness/')):
      assert events[key, row['step']] == pytest.approx(row[key])
      assert any(h['_step'] == row['step'] and h.get(key) == pytest.approx(row[key]) for h in history)


def test_live_numbers_are_the_checkpoints(runs):
  """At step 2 the harness's row equals the harness run on checkpoint 2 (anchor restored,
  bank rows read from the checkpoint and caught up to step 2)."""
  from hmem.infer import table
  from hmem.infer.source import open_source
  cfg, workdir = runs['harness']
  row = next(r for r in _rows(workdir) if r['step'] == 2)
  h = cfg.train.harness
  manager = table.task_manager(h.tasks.split(','))
  result = table.run_modes(open_source(workdir=str(workdir), step=2), table.resolve_tasks(manager, h.tasks.split(',')),
                           MODES, manager=manager, limit=h.limit, batch_size=h.batch_size)
  cells = table.rows(result)
  assert len(cells) == 12
  for task, metric, mode, value, _ in cells:
    assert row[f'harness/{task}/{metric}/{mode}'] == pytest.approx(value, rel=1e-5), (task, metric, mode)


def test_a_bad_harness_config_stops_before_training(memory_run, tmp_path):
  for overrides, message in (
      (('train.harness.every=2', f'train.harness.tasks=hmem_capital,{tmp_path}/no.yaml'),
       f"train.harness: task file '{tmp_path}/no.yaml' not found"),
      (('train.harness.tasks=hmem_capital',), 'train.harness needs both tasks and every'),
      (('train.harness.every=2', 'train.harness.tasks=hmem_capital', 'train.harness.modes=fetched,dense'),
       "memory mode 'dense'; choose among fetched, generic, none, blocked")):
    with pytest.raises(ConfigError, match=message):
      train(_config(memory_run[1], *overrides), str(tmp_path / 'run'), progress=False)
    assert not (tmp_path / 'run' / 'checkpoints').exists()
