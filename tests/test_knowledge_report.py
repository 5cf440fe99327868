"""The knowledge benchmark's arithmetic (benchmarks/knowledge_report.py) and run layout
(benchmarks/knowledge.py), on made-up per-seed results: no training (a few seconds)."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

from hmem.corpora import facts

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def report():
  return _load('knowledge_report')


BUCKETS = {'1': {'entities': 90, 'documents': 90, 'probes': 40},
           '64+': {'entities': 10, 'documents': 1000, 'probes': 40}}


def _seed(seed, tail_fetched, head_fetched=1.0):
  """A per-seed result as knowledge.run_seed returns it: the tail answered by memory only,
  the head by every model."""
  def modes(fetched, anchor, blocked):
    return {'fetched': fetched, 'generic': anchor, 'none': anchor, 'blocked': blocked, 'dense': anchor,
            'dense_wide': anchor}
  acc = {'1': modes(tail_fetched, 0.0625, 0.0625), '64+': modes(head_fetched, 0.9, 0.9)}
  return {'seed': seed, 'entities': 100, 'sequences': 500, 'steps_anchor': 10, 'steps_extra': 20,
          'acc': {'probes': acc, 'probes_heldout': acc}, 'ppl_heldout': {'fetched': 10.0 + seed, 'dense': 20.0},
          'buckets': BUCKETS, 'params': {'anchor': 1000, 'bank': 10_000, 'dense': 1000, 'dense_wide': 1500}}


def test_pooled_weights_buckets_by_their_facts_not_their_probes(report):
  acc = {'1': {'fetched': 0.5}, '64+': {'fetched': 1.0}}
  # Equal probes per bucket, but 90 entities against 10: 0.9 * 0.5 + 0.1 * 1.0.
  assert report.pooled(acc, BUCKETS)['fetched'] == pytest.approx(0.55)
  assert report.pooled(acc, BUCKETS, ('64+',))['fetched'] == 1.0
  assert report.pooled(acc, BUCKETS, ('2-3',)) == {}  # an absent bucket


def test_facts_known_corrects_for_guessing_and_bits_count_four_per_fact(report):
  assert report.facts_known(1 / 16, 400) == pytest.approx(0.0)
  assert report.facts_known(1.0, 400) == pytest.approx(400.0)
  cap = report.capacity({'dense': 1 / 16, 'fetched': 1.0, 'none': 1 / 16 + 15 / 16 / 4}, 400,
                        {'anchor': 1000, 'bank': 10_000, 'dense': 1000})
  assert cap['dense']['bits_per_param'] == pytest.approx(0.0)
  assert cap['anchor+bank']['bits_per_param'] == pytest.approx(400 * 4 / 11_000)
  # The bank: what fetched knows beyond the same anchor without memory (a quarter of it).
  assert cap['bank']['facts_known'] == pytest.approx(300.0)
  assert cap['bank']['bits_per_param'] == pytest.approx(300 * 4 / 10_000)
  assert 'dense_wide' not in cap  # not trained, not reported


def test_checks_meet_and_miss_the_issue_targets(report):
  by = {'1': {'fetched': 0.6, 'dense': 0.1, 'dense_wide': 0.2, 'generic': 0.1, 'blocked': 0.1},
        '2-3': {'fetched': 0.8, 'dense': 0.1, 'dense_wide': 0.1, 'generic': 0.1, 'blocked': 0.1},
        '64+': {'fetched': 1.0, 'dense': 1.0, 'dense_wide': 1.0, 'generic': 0.7, 'blocked': 0.95}}
  buckets = {'1': {'entities': 10}, '2-3': {'entities': 10}, '64+': {'entities': 1}}
  got = report.checks(by, buckets)
  assert got['tail_fetched'] == {'value': pytest.approx(0.7), 'target': 0.5, 'met': True}
  assert got['tail_fetched_over_dense']['value'] == pytest.approx(7.0) and got['tail_fetched_over_dense']['met']
  assert got['tail_fetched_over_dense_wide']['value'] == pytest.approx(0.7 / 0.15)
  assert got['head_generic_over_fetched'] == {'value': pytest.approx(0.7), 'target': 0.8, 'met': False}
  # Tail loses 0.6 of fetched when blocked, the head 0.05: 12x.
  assert got['blocked_loss_tail_over_head']['value'] == pytest.approx(12.0)
  # The generic block instead: the tail loses 0.6, the head 0.3.
  assert got['generic_loss_tail_over_head'] == {'value': pytest.approx(2.0), 'target': 5.0, 'met': False}
  by['64+']['blocked'] = 1.0  # the head loses nothing: met whenever the tail loses anything
  assert report.checks(by, buckets)['blocked_loss_tail_over_head']['value'] == math.inf
  assert set(report.checks({'1': by['1']}, buckets)) == {'tail_fetched', 'tail_fetched_over_dense',
                                                         'tail_fetched_over_dense_wide'}  # no head


def test_summarize_means_and_spreads_every_cell_over_seeds(report):
  per_seed = [_seed(0, 0.6), _seed(1, 0.8)]
  s = report.summarize(per_seed)
  assert s['seeds'] == [0, 1] and s['bucket_sizes'] == BUCKETS
  assert s['by_popularity']['1']['fetched'] == pytest.approx(0.7)
  assert s['by_popularity_std']['1']['fetched'] == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.6, 0.8
  assert s['by_popularity_std']['64+']['dense'] == 0.0
  assert s['acc_probes_fetched'] == pytest.approx(0.9 * 0.7 + 0.1 * 1.0)  # weighted by facts, then averaged
  assert s['ppl_heldout_fetched'] == pytest.approx(10.5) and s['std']['ppl_heldout_dense'] == 0.0
  assert s['checks']['tail_fetched']['met'] and s['capacity']['bank']['params'] == 10_000
  assert s['heldout_over_trained_fetched']['1'] == pytest.approx(1.0)
  json.dumps(s)  # the benchmark prints it as JSON
  one = report.summarize(per_seed[:1])
  assert one['by_popularity_std']['1']['fetched'] is None and 'None' not in report.bucket_table(one)


def test_tables_and_plots_draw_from_a_summary(report, tmp_path):
  s = report.summarize([_seed(0, 0.6), _seed(1, 0.8)])
  table = report.bucket_table(s)
  assert '64+ (10, 40)' in table and '0.700 ±0.141' in table
  assert 'NOT met' not in report.checks_table(s)
  assert report.heldout_line(s) == 'fetched, held-out / trained phrasing: all 1.00, 1 1.00, 64+ 1.00'
  report.plot_popularity(s, str(tmp_path / 'pop.png'))
  report.plot_vs_n([s], str(tmp_path / 'n.png'))
  assert (tmp_path / 'pop.png').stat().st_size > 0 and (tmp_path / 'n.png').stat().st_size > 0


def test_run_directories_and_bucket_files(report, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'knowledge_report', report)  # what knowledge.py imports beside it
  knowledge = _load('knowledge')
  zipf, uniform = facts.Popularity('zipf', 1.0, 256), facts.Popularity()
  # The default run keeps the directory configs/sweeps/facts.py reads.
  assert knowledge.run_dir('r', 400, uniform, 4, 0) == 'r/n400'
  assert knowledge.run_dir('r', 400, zipf, 8, 2) == 'r/n400_zipf1-256_t8_seed2'
  paths = facts.write_facts(str(tmp_path), 100, probes=60, popularity=facts.Popularity('zipf', max_documents=16))
  split = knowledge.split_by_bucket(paths['probes'], str(tmp_path / 'probes'))
  assert list(split) == ['1', '2-3', '4-15', '16-63']
  seen = 0
  for b, path in split.items():
    with open(path) as f:
      records = [json.loads(line) for line in f]
    assert records and all(facts.bucket(r['documents']) == b for r in records)
    seen += len(records)
  assert seen == 60
