"""The paper's 160M anchor (163,510,016 parameters): 35 layers, d=512, 12 heads x 32, SwiGLU 2048,
tied embeddings. Add memory with e.g. --config.memory.levels="(256,64,16,0)"."""

from hmem.config import paper_anchor_config


def get_config():
  return paper_anchor_config(layers=35, d_model=512, heads=12, head_dim=32, ffn=2048, tie_embeddings=True)
