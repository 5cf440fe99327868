"""Data sources behind one interface (see source.py)."""

from __future__ import annotations

from hmem.data.source import Position, Source, check_batch
from hmem.errors import ConfigError, DataError
from hmem.files import as_path


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
    if not d.path:
      raise DataError("data.source='prepared' but data.path is empty; run `hmem prepare --input DOCS --out DIR` "
                      'and pass --config.data.path=DIR (configs/160m.py, 410m.py and 1b.py train on prepared data '
                      'only; --config.data.source=synthetic gives random tokens, for smoke tests)')
    from hmem.data.loader import PreparedSource
    source = PreparedSource(d.path, batch_size=cfg.train.batch_size, seq_len=d.seq_len,
                            seed=cfg.train.seed, split=split)
    _check_compatible(cfg, source.manifest)
    return source
  raise ConfigError(f"data.source={d.source!r}; use 'synthetic' or 'prepared'")


def _check_compatible(cfg, manifest: dict) -> None:
  """The model must embed every token id, the memory tree must be the dataset's, and the
  tokens must come from the run's tokenizer (data.tokenizer, or the one beside the
  train.init_from checkpoint) when it has one."""
  _check_tokenizer(cfg, manifest)
  if manifest['vocab_size'] > cfg.model.vocab_size:
    raise DataError(f"{cfg.data.path}: its tokenizer has {manifest['vocab_size']} tokens but model.vocab_size="
                    f"{cfg.model.vocab_size}; set --config.model.vocab_size={manifest['vocab_size']} or more")
  memory_on = any(int(r) > 0 for r in cfg.memory.levels)
  if memory_on and (manifest['k'], manifest['depth']) != (cfg.memory.k, cfg.memory.depth):
    raise DataError(f"{cfg.data.path} was clustered with k={manifest['k']}, depth={manifest['depth']} but "
                    f"memory.k={cfg.memory.k}, memory.depth={cfg.memory.depth}; match them or re-run hmem prepare")


def _check_tokenizer(cfg, manifest: dict) -> None:
  from hmem.data.tokenizer import Tokenizer
  init_from = str(as_path(cfg.train.init_from) / 'tokenizer.json') if cfg.train.init_from else ''
  expected = [(key, path) for key, path in (('data.tokenizer', cfg.data.tokenizer), ('train.init_from', init_from))
              if path and as_path(path).is_file()]
  if not expected:
    return
  used = manifest.get('tokenizer_sha256') or Tokenizer.load(as_path(cfg.data.path) / 'tokenizer.json').identity
  for key, path in expected:
    if Tokenizer.load(path).identity != used:
      raise DataError(f'{cfg.data.path} was tokenized with another tokenizer than {path} ({key}); '
                      f'prepare it again with `hmem prepare --tokenizer {path}`')


__all__ = ['Position', 'Source', 'check_batch', 'make_source']
