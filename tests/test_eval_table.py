"""`hmem eval --tasks T --modes M`: the harness under every mode, printed tasks x modes with
standard errors, JSON last and CSV; each cell is what lm-eval gives for the registered `hmem`
model in that mode; hmem's offline tasks run from the package; bad input is one clear error
before any model loads."""

import csv
import json

import lm_eval
import pytest
from conftest import WIKI, rolling_task

from hmem.cli import main
from hmem.errors import UserError
from hmem.infer import table
from hmem.tasks import DIR

MODES = ('fetched', 'generic', 'none', 'blocked')


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  """A directory of local task YAML: a rolling task over three wiki documents."""
  root = tmp_path_factory.mktemp('table_tasks')
  with open(WIKI) as f:
    texts = [json.loads(line)['text'] for line in f][30:33]
  rolling_task(root, 'table_docs', texts)
  return root


def test_eval_tasks_prints_tasks_by_modes_as_lm_eval_scores_each_mode(memory_run, task_dir, tmp_path, capsys):
  run = str(memory_run[3])
  out_csv = tmp_path / 'table.csv'
  assert main(['eval', '--workdir', run, '--tasks', 'hmem_capital,table_docs', '--modes', ','.join(MODES),
               '--include-path', str(task_dir), '--limit', '6', '--batch-size', '4', '--csv', str(out_csv),
               '--no-progress']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  got = json.loads(lines[-1])
  assert got['tasks'] == ['hmem_capital', 'table_docs'] and got['modes'] == list(MODES)
  assert got['samples'] == {'hmem_capital': 6, 'table_docs': 3}
  # The table: a header of the modes, one row per task and metric, acc with its standard error.
  assert lines[0].split()[-4:] == list(MODES)
  acc = next(line for line in lines if line.startswith('hmem_capital (6)') and ' acc ' in line)
  assert acc.count('±') == 4
  assert lines[-2].startswith('seconds per mode: fetched ')
  # Each mode's cells are lm-eval's own run of the registered model in that mode.
  manager = table.task_manager(['hmem_capital'], [str(task_dir)])
  for mode in MODES:
    args = f'workdir={run},' + ('memory=fetched,block_best=true' if mode == 'blocked' else f'memory={mode}')
    want = lm_eval.simple_evaluate(model='hmem', model_args=args, tasks=['hmem_capital', 'table_docs'], limit=6,
                                   batch_size=4, task_manager=manager, log_samples=False)['results']
    assert got['results']['hmem_capital']['acc'][mode] == pytest.approx(want['hmem_capital']['acc,none'], abs=1e-12)
    assert got['stderr']['hmem_capital']['acc'][mode] == pytest.approx(want['hmem_capital']['acc_stderr,none'])
    assert got['results']['table_docs']['word_perplexity'][mode] == pytest.approx(
        want['table_docs']['word_perplexity,none'], rel=1e-5)  # rows caught up in batches of other shapes
  # Memory modes differ, and the CSV holds the JSON's cells.
  assert len(set(got['results']['table_docs']['word_perplexity'].values())) == 4
  with open(out_csv) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 * 4  # (acc, acc_norm, word_perplexity) x modes
  for r in rows:
    assert float(r['value']) == got['results'][r['task']][r['metric']][r['mode']]
    assert (r['stderr'] == '') == (r['metric'] == 'word_perplexity')


def test_the_offline_tasks_ship_and_run(memory_run, capsys):
  """hmem_knowledge (the atomic-number and capital probes) and hmem_wiki_heldout run by name,
  from the files in the package; their records hold what they claim."""
  records = {name: [json.loads(line) for line in open(DIR / 'data' / f'{name}.jsonl')]
             for name in ('atomic_number', 'capital', 'wiki_heldout')}
  assert len(records['atomic_number']) == 118 and len(records['capital']) > 200 and len(records['wiki_heldout']) > 300
  number = {r['element']: r['choices'][r['answer']] for r in records['atomic_number']}
  capital = {r['country']: r['choices'][r['answer']] for r in records['capital']}
  assert (number['hydrogen'], number['carbon'], number['gold'], number['oganesson']) == ('1', '6', '79', '118')
  assert (capital['France'], capital['Japan'], capital['Kenya']) == ('Paris', 'Tokyo', 'Nairobi')
  for r in records['atomic_number'] + records['capital']:
    assert len(set(r['choices'])) == 4
  assert main(['eval', '--workdir', str(memory_run[3]), '--tasks', 'hmem_knowledge,hmem_wiki_heldout', '--modes',
               'fetched,none', '--limit', '3', '--json', '--no-progress']) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1  # --json: the JSON object alone
  got = json.loads(out[0])
  assert set(got['results']) == {'hmem_knowledge', 'hmem_atomic_number', 'hmem_capital', 'hmem_wiki_heldout'}
  assert set(got['results']['hmem_wiki_heldout']) == {'word_perplexity', 'byte_perplexity', 'bits_per_byte'}
  assert all(set(m) == {'fetched', 'none'} for metrics in got['results'].values() for m in metrics.values())


def test_bad_table_requests_are_one_clear_error(memory_run, imported_run, tmp_path, capsys):
  run = str(memory_run[3])
  for args, message in (
      (['--tasks', 'hmem_capital', '--windows', 'lm-eval'], '--windows apply to --data; leave them out with --tasks'),
      (['--data', str(WIKI), '--modes', 'none'], '--modes apply to --tasks; leave them out with --data'),
      (['--tasks', f'{tmp_path}/no.yaml'], f"task file '{tmp_path}/no.yaml' not found"),
      (['--tasks', 'hmem_capital', '--modes', 'fetched,dense'], "memory mode 'dense'; choose among"),
      (['--tasks', 'hmem_capital', '--modes', 'none', '--block', '1:0'], '--block routes the `blocked` mode'),
      (['--tasks', 'hmem_capital', '--include-path', str(tmp_path / 'none')], 'is not a directory')):
    assert main(['eval', '--workdir', run, *args, '--no-progress']) == 2, args
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, (args, err)
  assert main(['eval', '--workdir', str(imported_run), '--step', '0', '--tasks', 'hmem_capital', '--modes',
               'fetched', '--no-progress']) == 2
  assert 'mode fetched: this run has no memory; use --modes none' in capsys.readouterr().err


def test_an_unknown_task_is_named_with_the_closest_ones():
  """Names not among hmem's tasks are looked up in lm-eval's own (an lm-eval task resolves)."""
  manager = table.task_manager(['hmem_capitol', 'arc_easy'])
  assert table.resolve_tasks(manager, ['arc_easy', 'hmem_capital']) == ['arc_easy', 'hmem_capital']
  with pytest.raises(UserError, match=r'unknown task\(s\): hmem_capitol \(did you mean hmem_capital'):
    table.resolve_tasks(manager, ['hmem_capitol', 'arc_easy'])
