"""Sweeps: expansion and naming, the launchers, collection with power-law fits and plots,
and the tiny sweep end to end."""

import contextlib
import csv
import io
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from hmem import resources, sizes
from hmem.cli import main
from hmem.config import load_config
from hmem.errors import ConfigError
from hmem.sweep import collect, spec


def _cli(*argv) -> tuple[int, list[str]]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = main(list(argv))
  return code, out.getvalue().splitlines()


def test_expand_names_runs_and_scales_steps(repo, tmp_path):
  sweep_file = str(repo / 'configs/sweeps/tiny.py')
  runs = spec.expand(sweep_file, str(tmp_path))
  assert len(runs) == 16 and len({r.name for r in runs}) == 16
  run = runs[4]
  assert run.name == 'd_model_32.head_dim_8.ffn_128.levels_0-0.steps_32'
  assert run.workdir == str(tmp_path / run.name)
  cfg = spec.run_config(sweep_file, run)
  assert (cfg.model.d_model, tuple(cfg.memory.levels), cfg.train.steps) == (32, (0, 0), 32)

  scaled = spec.expand(sweep_file, str(tmp_path), steps_scale=0.25, common=('--config.train.seed=3',))
  cfg = spec.run_config(sweep_file, scaled[5])
  assert scaled[5].name == runs[5].name + '.steps-x0.25'
  # 64 steps -> 16; evaluation and checkpoint every 32 -> 8, so both still land on the last step.
  assert (cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every, cfg.train.seed) == (16, 8, 8, 3)


def test_bad_sweep_files_are_user_errors(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from hmem.config import default_config\nget_config = default_config\n'
                 "def sweep():\n  yield {'model.layrs': 2}\n")
  with pytest.raises(ConfigError, match="unknown config key 'model.layrs'"):
    spec.expand(str(bad))
  bad.write_text('from hmem.config import default_config\nget_config = default_config\n'
                 "def sweep():\n  yield {'model.layers': 2}\n  yield {'model.layers': 2}\n")
  with pytest.raises(ConfigError, match='same overrides'):
    spec.expand(str(bad))
  bad.write_text('x = 1\n')
  with pytest.raises(ConfigError, match='defines no get_config'):
    spec.expand(str(bad))


def test_paper_table7_dry_run_lists_the_grid(repo, tmp_path):
  code, lines = _cli('sweep', 'run', str(repo / 'configs/sweeps/paper_table7.py'), '--dry-run', '--root', str(tmp_path))
  assert code == 0
  summary = json.loads(lines[-1])
  assert summary == {'runs': 10, 'finished': 0, 'to_run': 10, 'root': str(tmp_path), 'launcher': 'local'}
  runs = spec.expand(str(repo / 'configs/sweeps/paper_table7.py'), str(tmp_path))
  banks = {}
  for run in runs:
    cfg = spec.run_config(str(repo / 'configs/sweeps/paper_table7.py'), run)
    assert cfg.train.freeze_anchor and cfg.memory.k == 16 and len(cfg.memory.levels) == 4
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    banks.setdefault(round(sizes.memory_param_counts(cfg)['bank_params'] / 1e9, 1), set()).add(tokens)
  assert banks == {4.6: {2 ** 40}, 18.7: {2 ** 41}}
  assert [line.split()[0] for line in lines[:-1]] == [r.workdir for r in runs]
  assert '--config.memory.levels=(4096,320,17,2)' in lines[-2]


def test_power_law_fit_recovers_its_parameters():
  x = np.geomspace(1e15, 1e18, 6)
  y = 1.7 + 3.0 * (x / 1e16) ** -0.3
  fit = collect.fit_power_law(x, y)
  x0 = fit['x0']
  np.testing.assert_allclose([fit['E'], fit['alpha'], fit['A'] * (x0 / 1e16) ** fit['alpha']], [1.7, 0.3, 3.0],
                             rtol=1e-3)
  assert len(fit['residuals']) == 6 and fit['rmse'] < 1e-6
  assert 'error' in collect.fit_power_law(x[:3], y[:3])


def test_slurm_launcher_submits_one_job_per_unfinished_run(repo, tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  sbatch = bin_dir / 'sbatch'
  sbatch.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/submitted\necho 4242\n')
  sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  sweep_file = str(repo / 'configs/sweeps/paper_table7.py')
  runs = spec.expand(sweep_file, str(tmp_path / 'root'), common=('--config.data.path=/data/dclm',))
  os.makedirs(os.path.join(runs[0].workdir, 'checkpoints', str(spec.run_config(sweep_file, runs[0]).train.steps)))
  code, lines = _cli('sweep', 'run', sweep_file, '--launcher', 'slurm', '--root', str(tmp_path / 'root'),
                     '--sbatch-arg=--nodes=2', '--config.data.path=/data/dclm')
  assert code == 0 and json.loads(lines[-1])['jobs'] == {r.name: '4242' for r in runs[1:]}
  submitted = (tmp_path / 'submitted').read_text().splitlines()
  assert len(submitted) == 9  # the finished run is skipped
  logs = os.path.abspath(runs[1].workdir)
  assert submitted[0].split() == ['--parsable', f'--job-name=hmem-{runs[1].name}', f'--output={logs}/slurm-%j.log',
                                  f'--export=ALL,HMEM_LOGS={logs}/logs', '--nodes=2',
                                  resources.launcher_file('slurm.sbatch'), '--config', sweep_file,
                                  '--workdir', runs[1].workdir,
                                  *runs[1].args()]
  assert runs[1].args()[-1] == '--config.data.path=/data/dclm'


@pytest.mark.slow
def test_tiny_sweep_runs_collects_fits_and_plots(repo, tmp_path):
  sweep_file, root = str(repo / 'configs/sweeps/tiny.py'), str(tmp_path / 'tiny')
  args = ['--root', root, '--steps-scale', '0.125']
  out = subprocess.run([sys.executable, '-m', 'hmem.cli', 'sweep', 'run', sweep_file, '--max-parallel', '2',
                        '--no-progress', *args], capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.splitlines()[-1])['failed'] == []

  runs = spec.expand(sweep_file, root, 0.125)
  stale = runs[-2]  # as if interrupted: its final checkpoint is gone
  os.rename(os.path.join(stale.workdir, 'checkpoints', '4'), os.path.join(tmp_path, 'moved'))
  code, lines = _cli('sweep', 'collect', sweep_file, *args)
  assert code == 0
  summary = json.loads(lines[-1])
  assert summary['incomplete'] == {stale.name: 'unfinished'} and summary['finished'] == 15

  with open(os.path.join(root, 'sweep.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['name'] for r in rows] == [r.name for r in runs]
  for row, run in zip(rows, runs):
    cfg = spec.run_config(sweep_file, run)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    assert float(row['flops']) == pytest.approx(sizes.flops_per_token(cfg) * tokens)
    assert int(row['step']) == int(row['eval_step']) == cfg.train.steps
    assert (row['eval_loss_generic'] != '') == (row['levels'] != 'none')
    final = [json.loads(line) for line in open(os.path.join(run.workdir, 'metrics.jsonl'))][-1]
    assert float(row['eval_loss']) == final['eval_loss'] and float(row['loss']) == final['loss']
  assert rows[-2]['state'] == 'unfinished'

  by_name = {r['name']: r for r in rows}
  for levels, group in summary['fits'].items():
    assert len(group['runs']) == (7 if levels == '(16, 8)' else 8)
    assert len(group['params_runs']) == 4 and group['params_tokens'] == 8 * 8 * 64
    assert stale.name not in group['runs'] + group['params_runs']
    # The FLOPs fit takes the compute frontier: each run there beats every cheaper one.
    done = sorted(group['runs'], key=lambda n: float(by_name[n]['flops']))
    assert group['frontier_runs'] == [n for i, n in enumerate(done) if all(
        float(by_name[n]['eval_loss']) < float(by_name[m]['eval_loss']) for m in done[:i])]
    for name, xkey, names in (('loss_vs_flops', 'flops', group['frontier_runs']),
                              ('loss_vs_params', 'active_params', group['params_runs'])):
      fit = group[name]
      if len(names) < 4:
        assert 'needs at least 4' in fit['error']
        continue
      assert 'error' not in fit and fit['n'] == len(fit['residuals']) == len(names)
      x = [float(by_name[n][xkey]) for n in names]
      y = [float(by_name[n]['eval_loss']) for n in names]
      predicted = fit['E'] + fit['A'] * (np.array(x) / fit['x0']) ** -fit['alpha']
      np.testing.assert_allclose(np.array(y) - predicted, fit['residuals'], atol=1e-9)
  assert all('error' not in g['loss_vs_flops'] for g in summary['fits'].values())
  for path in summary['plots']:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # A sweep file's evaluate() adds its metrics to the finished runs' rows (the same runs,
  # collected through a file that reuses tiny's grid).
  scored = tmp_path / 'scored.py'
  scored.write_text(
      'import importlib.util, json, os\n'
      f'spec = importlib.util.spec_from_file_location("tiny", {sweep_file!r})\n'
      'tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n'
      'get_config, sweep = tiny.get_config, tiny.sweep\n'
      'def evaluate(cfg, workdir):\n'
      '  with open(os.path.join(workdir, "metrics.jsonl")) as f:\n'
      '    evals = sum("eval_loss" in json.loads(line) for line in f)\n'
      '  return {"evaluations": evals, "width": cfg.model.d_model}\n')
  code, lines = _cli('sweep', 'collect', str(scored), *args)
  assert code == 0 and json.loads(lines[-1])['metrics'] == ['evaluations', 'width']
  with open(os.path.join(root, 'sweep.csv')) as f:
    scored_rows = list(csv.DictReader(f))
  for row, run in zip(scored_rows, runs):
    cfg = spec.run_config(sweep_file, run)
    if run is stale:
      assert row['evaluations'] == row['width'] == ''  # not finished: not evaluated
      continue
    assert int(row['evaluations']) == cfg.train.steps // cfg.train.eval_every
    assert int(row['width']) == cfg.model.d_model  # evaluate() got the run's own config
  assert f'evaluations {int(scored_rows[0]["evaluations"])}' in lines[0]
  with open(os.path.join(root, 'evaluate.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  scored.write_text(scored.read_text().replace('return {', 'return {"loss": 1, '))
  with pytest.raises(ConfigError, match=r"returned \['loss'\], names the collected rows already use"):
    collect.collect(str(scored), runs, root)

  # Re-running skips the finished runs and resumes the unfinished one.
  code, lines = _cli('sweep', 'run', sweep_file, '--dry-run', *args)
  assert json.loads(lines[-1])['to_run'] == 1


def test_facts_sweep_needs_the_benchmark_run_and_counts_steps_in_epochs(repo, tmp_path, monkeypatch):
  sweep_file = str(repo / 'configs/sweeps/facts.py')
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match='run `python benchmarks/knowledge.py --entities 400'):
    spec.expand(sweep_file)
  data = tmp_path / 'runs/knowledge/n400/data'
  data.mkdir(parents=True)
  (data / 'manifest.json').write_text(json.dumps({'sequences': 100}))
  runs = {r.name: spec.run_config(sweep_file, r) for r in spec.expand(sweep_file)}
  recipe = load_config(str(repo / 'configs/facts.py'))
  assert len(runs) == 12 and runs['base'].memory == recipe.memory and runs['base'].model == recipe.model
  assert runs['lr_0.03'].memory.lr == 3 * recipe.memory.lr
  batch = runs['base'].train.batch_size
  assert runs['base'].train.steps == -(-8 * 100 // batch)  # the recipe's 8 epochs
  assert sorted(c.train.steps for n, c in runs.items() if n.startswith('steps_')) == [-(-4 * 100 // batch),
                                                                                        -(-16 * 100 // batch)]
  assert runs['base'].train.init_from == os.path.join('runs/knowledge/n400', 'anchor')
