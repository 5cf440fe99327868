"""The paper's 160M anchor (163,510,016 parameters): 35 layers, d=512, 12 heads x 32, SwiGLU 2048,
tied embeddings, gain-only LayerNorm, QK-norm, RoPE base 100k, vocab 50,432 (GPT-NeoX)."""

from hmem.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=50432, d_model=512, layers=35, heads=12, kv_heads=12, head_dim=32, ffn=2048,
                 norm='layernorm', qk_norm=True, rope_base=100_000.0, tie_embeddings=True)
  c.data.update(seq_len=2048)
  # Baseline anchor recipe (PAPER.md): 1M-token batches, cosine 5e-3 -> 5e-5, 10k warmup.
  c.train.update(batch_size=512, lr=5e-3, min_lr=5e-5, warmup_steps=10_000, weight_decay=0.05,
                 steps=1_048_576, log_every=100, checkpoint_every=2000, eval_every=2000)
  return c
