"""configs/paper/: every regime loads for every anchor and carries the paper's recipe and sizes."""

import pytest

from hmem import paper, sizes
from hmem.config import load_config
from hmem.errors import ConfigError

ANCHORS = {  # anchor parameters, fetch and bank (the paper's size table; exact counts)
    '160m': (163_510_016, 18_063_360, 4_624_220_160),
    '410m': (411_665_408, 49_545_216, 12_683_575_296),
    '1b': (1_439_893_504, 153_354_240, 21_139_292_160),
}


def load(repo, name, arg):
  return load_config(str(repo / 'configs' / 'paper' / f'{name}.py:{arg}'))


@pytest.mark.parametrize('anchor', list(ANCHORS))
@pytest.mark.parametrize('regime', paper.REGIMES)
def test_every_regime_loads_with_the_papers_recipe(repo, regime, anchor):
  c = load(repo, regime, anchor)
  t, m, d = c.train, c.memory, c.data
  assert d.source == 'prepared' and d.path == ''  # real data, given at train time
  assert d.embedder == 'minilm' and (d.kmeans_samples, d.kmeans_steps, d.balance) == (6400, 20, 1.5)
  assert (m.k, m.depth, m.type, t.b1, t.b2, t.clip_norm, t.warmup_steps) == (16, 4, 'ffn', 0.9, 0.95, 1.0, 10_000)
  tokens = t.steps * t.batch_size * d.seq_len
  counts = sizes.memory_param_counts(c)
  params, fetch, bank = ANCHORS[anchor]
  if regime == 'a1':  # the architecture is the same in every regime: counted once
    assert sizes.anchor_param_counts(c)['anchor_params'] == params
    assert (d.seq_len, t.batch_size * d.seq_len, tokens) == (8192, 2**20, 2**40)
    assert (t.lr, t.min_lr, t.weight_decay) == (5e-3, 5e-5, 0.05)
    assert m.levels == (0, 0, 0, 0) and counts['bank_params'] == 0
    assert not t.init_from and not t.freeze_anchor
    return
  assert d.seq_len == 2048 and t.batch_size == (2048 if anchor == '1b' else 1024)
  assert m.levels == paper.LEVELS[anchor]
  assert (counts['fetch_params'], counts['bank_params']) == (fetch, bank)
  peak, end, wd = (1e-3, 1e-5, 0.1) if regime == 'a4' else (1e-4, 1e-5, 1e-3)
  assert (m.lr, m.min_lr, m.weight_decay) == (peak, end, wd)
  # One optimizer setup: the anchor is never re-warmed to its pretraining peak (5e-3).
  assert (t.lr, t.min_lr, t.weight_decay) == (peak, end, wd)
  assert tokens == (2**41 if regime == 'a4' else 2**40)
  assert t.freeze_anchor == (regime == 'a3')
  assert t.init_from == ('' if regime == 'a4' else f'runs/paper/a1-{anchor}')


def test_a2_160m_in_full(repo):
  c = load(repo, 'a2', '160m')
  assert (c.train.batch_size, c.data.seq_len, c.train.steps) == (1024, 2048, 2**19)
  assert (c.memory.lr, c.memory.min_lr, c.memory.weight_decay) == (1e-4, 1e-5, 1e-3)
  assert c.memory.levels == (256, 64, 16, 0)


def test_the_deep_160m_bank_is_exact(repo):
  """(256, 64, 16, 4): the paper's 18.7B bank, exact (the fetch sweep below checks it rounded)."""
  c = load_config(str(repo / 'configs' / '160m.py'), ['memory.levels=(256, 64, 16, 4)'])
  assert sizes.memory_param_counts(c) == {'fetch_params': 18_278_400, 'bank_params': 18_717_081_600}


# The paper's fetch sizes (millions) at a fixed bank; row 7's is its size table's 18.3
# (Table 7 prints 18.1 for the same levels).
FETCH_M = (1.1, 8.5, 18.1, 47.1, 102.7, 289.0, 18.3, 30.0, 75.5, 238.4)


@pytest.mark.parametrize('row', range(1, 11))
def test_fetch_sweep_rows_reproduce_the_papers_sizes(repo, row):
  c = load(repo, 'fetch_sweep', row)
  counts = sizes.memory_param_counts(c)
  assert c.memory.levels == paper.FETCH_SWEEP[row - 1][0] and c.train.freeze_anchor
  assert round(counts['fetch_params'] / 1e6, 1) == FETCH_M[row - 1]
  bank_b, tokens = (4.6, 2**40) if row <= 6 else (18.7, 2**41)
  assert round(counts['bank_params'] / 1e9, 1) == bank_b
  assert c.train.steps * c.train.batch_size * c.data.seq_len == tokens


def test_bad_arguments_name_the_choices(repo):
  with pytest.raises(ConfigError, match='anchors 160m, 410m, 1b'):
    load(repo, 'a2', '7b')
  with pytest.raises(ConfigError, match='row 1..10'):
    load(repo, 'fetch_sweep', 11)
  with pytest.raises(ConfigError, match='takes no argument'):
    load_config(str(repo / 'configs' / 'tiny.py:x'))
