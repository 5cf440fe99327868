"""The paper's 1.4B anchor (1,439,893,504 parameters): 24 layers, d=2048, 16 heads x 128, SwiGLU 5632,
untied embeddings (the count matches only untied), otherwise as the 160M."""

from hmem.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=50432, d_model=2048, layers=24, heads=16, kv_heads=16, head_dim=128, ffn=5632,
                 norm='layernorm', qk_norm=True, rope_base=100_000.0, tie_embeddings=False)
  c.data.update(seq_len=2048)
  c.train.update(batch_size=512, lr=5e-3, min_lr=5e-5, warmup_steps=10_000, weight_decay=0.05,
                 steps=1_048_576, log_every=100, checkpoint_every=2000, eval_every=2000)
  return c
