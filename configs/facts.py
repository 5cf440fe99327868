"""Facts: a tiny anchor and a hierarchical memory on synthetic biographies (hmem.corpora.facts).

    python benchmarks/knowledge.py --config configs/facts.py --entities 100 200 400 800

k=8, depth 3: 512 leaves, so at N <= 400 a leaf's block holds about one entity's facts;
the memory fetches 32 + 32 + 64 hidden units per layer on the anchor's 256. At N=400:
fetched 97% of probes against 9% (dense) and 10% (FLOP-matched dense), chance 6%; with
the probe's own subtree blocked, 9% (generic block: 8%). configs/sweeps/facts.py varies
these settings one at a time. Measured figures: docs/PERFORMANCE.md ("Facts");
docs/DECISIONS.md ("Facts") gives the reasons.
"""

from hmem.config import default_config

ANCHOR_EPOCHS = 4   # passes over the corpus: the dense anchor's pretraining
EPOCHS = 8          # ... and the extra training (memory, dense baselines) from it


def get_config():
  c = default_config()
  c.model.update(vocab_size=2048, d_model=64, layers=2, heads=2, kv_heads=2, head_dim=32, ffn=256,
                 tie_embeddings=True, dtype='float32')
  # A probe is routed by its name alone, and each name is in one document: tfidf_min_df=1
  # keeps those words (the default 2 drops them, and a fifth of the probes then went to
  # another leaf than their entity's). The cosine tree compares a probe's small overlap
  # with a cluster rather than the cluster means' unequal norms (with L2, half the probes
  # of 1,000 entities left their entity's subtree). No eval split: every entity is probed.
  c.data.update(source='prepared', seq_len=128, embedder='tfidf', tfidf_dim=384, tfidf_min_df=1,
                tree_metric='cosine', tokenizer_sample=20_000, tree_sample=100_000, kmeans_samples=2048,
                eval_fraction=0.0)
  # A leaf's rows see its documents in ~1/512 of the sequences: a memory lr 3x the anchor's.
  c.memory.update(k=8, depth=3, levels=(32, 32, 64), lr=1e-2, min_lr=1e-3, weight_decay=1e-3)
  c.train.update(steps=500, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, log_every=50,
                 eval_every=0, checkpoint_every=500)
  return c
