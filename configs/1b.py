"""The paper's 1.4B anchor (1,439,893,504 parameters): 24 layers, d=2048, 16 heads x 128, SwiGLU 5632,
untied embeddings (the count matches only untied). Paper memory: levels (768,256,16,0)."""

from hmem.config import paper_anchor_config


def get_config():
  return paper_anchor_config(layers=24, d_model=2048, heads=16, head_dim=128, ffn=5632, tie_embeddings=False)
