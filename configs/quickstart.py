"""The quickstart: a small anchor on 10k Wikipedia lead sections, then hierarchical memory.

`hmem quickstart` prepares the corpus (BPE, TF-IDF embeddings, a k=4, depth-2 tree),
pretrains the dense anchor, then co-trains anchor and memory from it (the paper's regime),
and compares held-out losses with the fetched memory, the generic block and no memory.
Minutes on a 2-core CPU.
"""

from hmem.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=8192, d_model=256, layers=4, heads=4, kv_heads=4, head_dim=64, ffn=1024,
                 tie_embeddings=True, dtype='float32')
  c.data.update(source='prepared', seq_len=256, embedder='tfidf', tfidf_dim=128, tokenizer_sample=10_000,
                tree_sample=10_000, kmeans_samples=2048, eval_fraction=0.03)
  # Fetch : anchor ~ 1 : 14 (96 hidden units per layer on top of 1024).
  c.memory.update(k=4, depth=2, levels=(64, 32), lr=3e-3, min_lr=3e-4, weight_decay=1e-3)
  c.train.update(steps=200, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=20, log_every=20,
                 eval_every=100, eval_steps=4, checkpoint_every=100)
  return c
