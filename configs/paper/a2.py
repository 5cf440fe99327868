"""Pouransari et al. 2025, appendix A, regime A2 (the paper's best): the A1 anchor, then anchor
and memory co-trained for 2^40 more tokens: 2,048-token sequences packed by leaf, 1,024 a
batch (2,048 for the 1.4B anchor), cosine 1e-4 -> 1e-5 after 10k warmup steps, weight decay
1e-3, the anchor's level widths (160m (256,64,16,0), 410m (512,128,32,0), 1b (768,256,16,0)).

The paper names one learning rate and weight decay for the phase, so the anchor gets the
memory's (ours): it is not re-warmed to its pretraining peak.

  hmem prepare --config configs/paper/a2.py:160m --input CORPUS --out data/paper-2048
  hmem train --config configs/paper/a2.py:160m --config.data.path=data/paper-2048 \
      --workdir runs/paper/a2-160m      # starts from runs/paper/a1-160m (train.init_from)

Values and gaps: hmem/paper.py.
"""

import os

from hmem import paper


def get_config(anchor='160m'):
  return paper.regime_config('a2', anchor, os.path.join(os.path.dirname(__file__), os.pardir))
