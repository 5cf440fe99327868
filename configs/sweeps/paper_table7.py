"""The paper's sweep of fetch size at a fixed bank size (its Table 7): the 160M anchor,
pretrained and frozen, with a k=16, depth-4 memory in every layer; four levels of widths
(hidden units per layer) give each bank, a 4.6B or an 18.7B one, with fetches from 1.1M
to 289M parameters. Memories train 2^40 tokens (4.6B banks) or 2^41 tokens (18.7B).

    hmem sweep run configs/sweeps/paper_table7.py --dry-run
    hmem sweep run configs/sweeps/paper_table7.py --launcher slurm \\
        --config.data.path=DATA --config.train.init_from=ANCHOR_RUN
"""

import importlib.util
import os

BANKS = {  # bank size -> (memory.levels, training tokens)
    '4.6B': ([(0, 16, 4, 1), (98, 42, 18, 0), (256, 64, 16, 0), (768, 96, 12, 0), (1792, 112, 7, 0),
              (5376, 0, 0, 0)], 2 ** 40),
    '18.7B': ([(256, 64, 16, 4), (328, 156, 74, 0), (1216, 164, 22, 3), (4096, 320, 17, 2)], 2 ** 41),
}


def get_config():
  spec = importlib.util.spec_from_file_location('paper_160m', os.path.join(os.path.dirname(__file__), '..', '160m.py'))
  anchor = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(anchor)
  c = anchor.get_config()
  c.data.source = 'prepared'
  c.memory.update(k=16, depth=4, levels=(0, 0, 0, 0))
  c.train.freeze_anchor = True
  return c


def sweep():
  tokens_per_step = get_config().train.batch_size * get_config().data.seq_len
  for levels_list, tokens in BANKS.values():
    for levels in levels_list:
      yield {'memory.levels': levels, 'train.steps': tokens // tokens_per_step}
