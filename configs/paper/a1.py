"""Pouransari et al. 2025, appendix A, regime A1: anchor pretraining, 2^40 tokens in 2^20-token
batches (128 x 8,192), AdamW cosine 5e-3 -> 5e-5 after 10k warmup steps, weight decay 0.05.

The paper reaches its 8,192-token context with dataset decomposition (a variable-length
curriculum); hmem packs documents into 8,192-token sequences with attention masked per
document instead (ours). Prepare the data with this config (its seq_len):

  hmem prepare --config configs/paper/a1.py:160m --input CORPUS --out data/paper-8192
  hmem train --config configs/paper/a1.py:160m --config.data.path=data/paper-8192 \
      --workdir runs/paper/a1-160m

Anchors: 160m, 410m, 1b (configs/<anchor>.py). Values and gaps: hmem/paper.py.
"""

import os

from hmem import paper


def get_config(anchor='160m'):
  return paper.regime_config('a1', anchor, os.path.join(os.path.dirname(__file__), os.pardir))
