"""Pouransari et al. 2025, the sweep of fetch size at a fixed bank size (its Table 7): the 160M
anchor frozen (regime A3), one row of level widths per run. ROW is 1..10, the paper's order:

   1 (0,16,4,1)  2 (98,42,18,0)  3 (256,64,16,0)  4 (768,96,12,0)  5 (1792,112,7,0)
   6 (5376,0,0,0)                             -- 4.6B banks, 2^40 tokens
   7 (256,64,16,4)  8 (328,156,74,0)  9 (1216,164,22,3)  10 (4096,320,17,2)
                                              -- 18.7B banks, 2^41 tokens

  hmem train --config configs/paper/fetch_sweep.py:4 --config.data.path=data/paper-2048 \
      --workdir runs/paper/fetch-4

Values and gaps: hmem/paper.py.
"""

import os

from hmem import paper
from hmem.errors import ConfigError


def get_config(row='3'):
  if not (str(row).isdigit() and 1 <= int(row) <= len(paper.FETCH_SWEEP)):
    raise ConfigError(f'fetch_sweep.py:{row}: pick a row 1..{len(paper.FETCH_SWEEP)}')
  levels, tokens = paper.FETCH_SWEEP[int(row) - 1]
  return paper.regime_config('a3', '160m', os.path.join(os.path.dirname(__file__), os.pardir),
                             levels=levels, tokens=tokens)
