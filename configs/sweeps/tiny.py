"""A sweep small enough for a 2-core CPU (a few minutes): 4 tiny anchors x 2 token budgets,
each without and with a k=4, depth-2 memory, on synthetic data.

    hmem sweep run configs/sweeps/tiny.py --max-parallel 2
    hmem sweep collect configs/sweeps/tiny.py
"""

import itertools

from hmem.config import default_config

BATCH, SEQ = 8, 64
BUDGETS = (2 ** 14, 2 ** 15)  # training tokens
WIDTHS = (24, 32, 48, 64)       # anchor d_model; 4 heads of d/4, SwiGLU 4d


def get_config():
  c = default_config()
  c.model.update(vocab_size=256, d_model=32, layers=2, heads=4, kv_heads=4, head_dim=8, ffn=128, dtype='float32')
  c.data.update(source='synthetic', seq_len=SEQ, synthetic_mean_doc_len=24, synthetic_leaves=16)
  c.memory.update(k=4, depth=2, levels=(0, 0), lr=3e-3, min_lr=3e-4)
  # Evaluate and checkpoint at the end of every budget (multiples of the smallest).
  steps = BUDGETS[0] // (BATCH * SEQ)
  c.train.update(batch_size=BATCH, lr=1e-2, min_lr=1e-3, warmup_steps=4, log_every=steps // 4,
                 eval_every=steps, eval_steps=2, checkpoint_every=steps)
  return c


def sweep():
  for d, levels, tokens in itertools.product(WIDTHS, ((0, 0), (16, 8)), BUDGETS):
    yield {'model.d_model': d, 'model.head_dim': d // 4, 'model.ffn': 4 * d, 'memory.levels': levels,
           'train.steps': tokens // (BATCH * SEQ)}
