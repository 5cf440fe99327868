"""The pinned CPU benchmark model (benchmarks/step.py): the same model MaxText was timed on.

d=512, 8 layers, 8 heads x 64, SwiGLU 2048, untied vocab 32768, seq 512, global batch 8,
fp32 compute, AdamW, scanned layers, no remat. The global batch runs as 4 micro-batches of 2
(same sums, same update): on XLA:CPU a micro-batch of 2 keeps the [tokens, vocab] logits and
the per-layer activations small enough to stay cache- and TLB-friendly, ~1.3-1.6x faster per
step than one pass over all 8 sequences.
"""

from hmem.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=32768, d_model=512, layers=8, heads=8, kv_heads=8, head_dim=64, ffn=2048,
                 tie_embeddings=False, dtype='float32', param_dtype='float32', scan_layers=True, remat='none')
  c.data.update(source='synthetic', seq_len=512)
  c.train.update(batch_size=8, grad_accum=4, steps=100, warmup_steps=10, log_every=1)
  return c
