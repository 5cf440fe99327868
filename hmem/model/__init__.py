"""The anchor language model."""

from __future__ import annotations

from flax import nnx

from hmem.memory.config import memory_layers
from hmem.model.cache import KVCache
from hmem.model.transformer import Transformer

# Parameters are created unsharded (abstractly or under jit) and placed by the trainer
# from their logical axis names, so flax's eager sharding is not used.
nnx.use_eager_sharding(False)


def build_model(cfg, seed: int = 0) -> Transformer:
  """The anchor for `cfg` (a full config): memory widens `memory_layers(cfg)` if any."""
  return Transformer(cfg.model, nnx.Rngs(seed), memory_layers=memory_layers(cfg), lora_alpha=cfg.memory.lora_alpha)


__all__ = ['KVCache', 'Transformer', 'build_model']
