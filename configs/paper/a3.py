"""Pouransari et al. 2025, appendix A, regime A3: post-hoc memory, the A1 anchor frozen and the
memory trained 2^40 tokens with A2's memory setup (2,048 x 1,024 sequences, 2,048 for 1b;
cosine 1e-4 -> 1e-5, 10k warmup, weight decay 1e-3).

The paper trained 16 independent jobs, one per level-1 subtree, and merged them; with the
anchor frozen the subtrees share nothing but the generic block and the clipping norm, so
hmem trains one job over the whole corpus (ours).

  hmem train --config configs/paper/a3.py:160m --config.data.path=data/paper-2048 \
      --workdir runs/paper/a3-160m      # starts from runs/paper/a1-160m (train.init_from)

Values and gaps: hmem/paper.py.
"""

import os

from hmem import paper


def get_config(anchor='160m'):
  return paper.regime_config('a3', anchor, os.path.join(os.path.dirname(__file__), os.pardir))
