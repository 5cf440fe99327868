"""A tiny anchor on synthetic data: seconds per run on a CPU, for tests and smoke checks."""

from hmem.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=256, d_model=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
                 dtype='float32', tie_embeddings=True)
  c.data.update(source='synthetic', seq_len=64, synthetic_mean_doc_len=24, synthetic_leaves=16)
  c.memory.update(k=4, depth=2, levels=(0, 0))
  c.train.update(steps=20, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, log_every=5,
                 checkpoint_every=10, eval_every=10, eval_steps=2)
  return c
