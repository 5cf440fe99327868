"""The quickstart: a small anchor on 10k Wikipedia lead sections, then hierarchical memory.

`hmem quickstart` prepares the corpus (BPE, TF-IDF embeddings, a k=8, depth-2 tree: 64
leaves of ~150 documents), pretrains the dense anchor for train.steps, then trains from it,
for train.steps more on the same batches, anchor + memory (the paper's co-training regime)
and a dense baseline; and compares them on training and held-out documents. ~7 minutes
on 2 idle CPU cores. docs/DECISIONS.md gives the reason and the evidence for each value.
"""

from hmem.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=8192, d_model=128, layers=4, heads=4, kv_heads=4, head_dim=32, ffn=512,
                 tie_embeddings=True, dtype='float32')
  c.data.update(source='prepared', seq_len=256, embedder='tfidf', tfidf_dim=128, tokenizer_sample=10_000,
                tree_sample=10_000, kmeans_samples=2048, eval_fraction=0.03)
  # Fetch 128 + 128 hidden units per layer on the anchor's 512; a leaf's rows serve ~1/64 of
  # the documents, each fetched in ~1/64 of the steps, hence the bank's higher lr.
  c.memory.update(k=8, depth=2, levels=(128, 128), lr=3e-3, min_lr=3e-4, weight_decay=1e-3)
  c.train.update(steps=300, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=20, log_every=20,
                 eval_every=0, checkpoint_every=100)
  return c
