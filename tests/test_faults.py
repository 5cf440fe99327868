"""Fault injection (benchmarks/faults.py, 3 trials of `hmem train` processes): SIGKILL while
an async checkpoint write is in flight, SIGKILL at a random moment, and SIGTERM (saves and
exits 0 where it stopped); each run, resumed, ends bitwise equal to an uninterrupted one
(anchor, bank, both optimizer states) with every metrics row exactly once."""

import importlib.util

import pytest

from hmem.train.trainer import train


@pytest.fixture(scope='module')
def faults(repo):
  spec = importlib.util.spec_from_file_location('faults_benchmark', repo / 'benchmarks' / 'faults.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_killed_runs_resume_bitwise_equal(faults, make_config, tmp_path):
  def resume(workdir):  # in-process: quicker than a fresh process
    assert train(make_config(*faults.OVERRIDES), workdir, progress=False)['step'] == faults.STEPS

  reference_dir = str(tmp_path / 'reference')
  resume(reference_dir)
  results = faults.run(trials=2, sigterms=1, seed=0, root=str(tmp_path), resume=resume, reference_dir=reference_dir)
  assert [r['kind'] for r in results] == ['kill-save', 'kill-random', 'sigterm']
  assert all(r['killed_before_end'] for r in results)
  summary = faults.summarize(results)
  assert {k: summary[k] for k in ('trials', 'kills_during_save', 'bitwise_equal', 'metrics_ok', 'sigterm_trials',
                                  'sigterm_ok')} == {
      'trials': 2, 'kills_during_save': 1, 'bitwise_equal': 2, 'metrics_ok': 2, 'sigterm_trials': 1, 'sigterm_ok': 1}
