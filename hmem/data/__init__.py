"""Data sources behind one interface (see source.py)."""

from __future__ import annotations

from hmem.data.source import Position, Source, check_batch
from hmem.errors import ConfigError


def make_source(cfg, split: str = 'train') -> Source:
  """The source named by `cfg.data.source` for the `train` or held-out `eval` split."""
  d = cfg.data
  if d.source == 'synthetic':
    from hmem.data.synthetic import SyntheticSource
    return SyntheticSource(
        vocab_size=cfg.model.vocab_size, seq_len=d.seq_len, batch_size=cfg.train.batch_size,
        num_leaves=d.synthetic_leaves, mean_doc_len=d.synthetic_mean_doc_len,
        seed=cfg.train.seed, split=split)
  if d.source == 'prepared':
    from hmem.data.loader import PreparedSource
    return PreparedSource(d.path, batch_size=cfg.train.batch_size, seq_len=d.seq_len,
                          seed=cfg.train.seed, split=split)
  raise ConfigError(f"data.source={d.source!r}; use 'synthetic' or 'prepared'")


__all__ = ['Position', 'Source', 'check_batch', 'make_source']
