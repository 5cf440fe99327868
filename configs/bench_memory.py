"""The memory benchmark model (benchmarks/memory.py): steps of a fraction of a second on a
CPU. FFN memory in every layer, k=4, depth 3, levels (64, 32, 32): 128 extra hidden units
per layer (+12.5% FFN width)."""

from hmem.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=8192, d_model=256, layers=4, heads=4, kv_heads=4, head_dim=64, ffn=1024,
                 tie_embeddings=False, dtype='float32')
  c.data.update(source='synthetic', seq_len=256, synthetic_leaves=64)
  c.memory.update(k=4, depth=3, levels=(64, 32, 32))
  c.train.update(batch_size=8, steps=1000, warmup_steps=10)
  return c
