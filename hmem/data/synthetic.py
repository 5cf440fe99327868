"""A seeded synthetic corpus with document and cluster structure, for tests and benchmarks.

Each sequence belongs to one leaf cluster. Inside a document, the next token follows a
per-leaf successor table with probability `1 - noise` and is uniform otherwise; documents
end with EOT (token 0). So a model learns the shared structure, and a model that also
knows the leaf (a fetched memory) can predict far better: what the memory tests need.
Every row is a pure function of (seed, split, epoch, step, row).
"""

from __future__ import annotations

import numpy as np

from hmem.data.source import Position
from hmem.errors import ConfigError

EOT = 0
_SPLITS = {'train': 0, 'eval': 1}


class SyntheticSource:

  def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, num_leaves: int,
               mean_doc_len: int, seed: int, split: str = 'train', noise: float = 0.1):
    if vocab_size < 4:
      raise ConfigError(f'synthetic data needs model.vocab_size >= 4, got {vocab_size}')
    self.seq_len, self.batch_size, self.steps_per_epoch = seq_len, batch_size, None
    self.vocab_size, self.num_leaves, self.mean_doc_len = vocab_size, num_leaves, mean_doc_len
    self.noise, self.seed, self.split_id = noise, seed, _SPLITS[split]
    table_rng = np.random.default_rng((seed, 7919))
    # successor[leaf, token] in [1, vocab): EOT only ever appears as a document end.
    self.successor = table_rng.integers(1, vocab_size, size=(num_leaves, vocab_size), dtype=np.int32)

  def _row(self, position: Position, row: int):
    rng = np.random.default_rng((self.seed, self.split_id, position.epoch, position.step, row))
    leaf = int(rng.integers(self.num_leaves))
    T = self.seq_len
    tokens, segments = np.empty(T, np.int32), np.empty(T, np.int32)
    noise = rng.random(T) < self.noise
    random_tokens = rng.integers(1, self.vocab_size, size=T, dtype=np.int32)
    succ = self.successor[leaf]
    t, seg = 0, 1
    while t < T:
      n = min(int(rng.geometric(1.0 / self.mean_doc_len)) + 1, T - t)
      prev = int(random_tokens[t])
      tokens[t] = prev
      for i in range(t + 1, t + n - 1):
        prev = int(random_tokens[i]) if noise[i] else int(succ[prev])
        tokens[i] = prev
      if n > 1:
        tokens[t + n - 1] = EOT
      segments[t:t + n] = seg
      t, seg = t + n, seg + 1
    return tokens, segments, leaf

  def batch(self, position: Position, rows: slice) -> dict[str, np.ndarray]:
    out = [self._row(position, r) for r in range(rows.start, rows.stop)]
    return {
        'tokens': np.stack([o[0] for o in out]),
        'segment_ids': np.stack([o[1] for o in out]),
        'leaf_id': np.array([o[2] for o in out], np.int32),
    }
