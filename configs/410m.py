"""The paper's 410M anchor (411,665,408 parameters): 24 layers, d=1024, 16 heads x 64, SwiGLU 2816,
untied embeddings (the count matches only untied). Paper memory: levels (512,128,32,0)."""

from hmem.config import paper_anchor_config


def get_config():
  return paper_anchor_config(layers=24, d_model=1024, heads=16, head_dim=64, ffn=2816, tie_embeddings=False)
