"""Pouransari et al. 2025, appendix A, regime A4: anchor and memory co-trained from scratch for
2^41 tokens, cosine 1e-3 -> 1e-5, weight decay 0.1 (worse than A2 in the paper).

The paper gives no batch or warmup for A4; we use A2's (2,048-token sequences, 1,024 a
batch, 2,048 for 1b; 10k warmup steps) and one optimizer setup for anchor and memory (ours).

  hmem train --config configs/paper/a4.py:160m --config.data.path=data/paper-2048 \
      --workdir runs/paper/a4-160m

Values and gaps: hmem/paper.py.
"""

import os

from hmem import paper


def get_config(anchor='160m'):
  return paper.regime_config('a4', anchor, os.path.join(os.path.dirname(__file__), os.pardir))
