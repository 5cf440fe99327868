"""The anchor language model."""

from __future__ import annotations

from flax import nnx

from hmem.model.cache import KVCache
from hmem.model.transformer import Transformer

# Parameters are created unsharded (abstractly or under jit) and placed by the trainer
# from their logical axis names, so flax's eager sharding is not used.
nnx.use_eager_sharding(False)


def build_model(cfg, seed: int = 0, memory_layers: tuple[int, int] | None = None) -> Transformer:
  """The anchor for `cfg` (a full config). A memory, when given one, widens the layers
  [first, end) of `memory_layers` (None: all); the caller takes that range from the memory
  config (`hmem.memory.spec.MemorySpec.layers`), so the model knows nothing of the memory."""
  return Transformer(cfg.model, nnx.Rngs(seed), memory_layers=memory_layers, lora_alpha=cfg.memory.lora_alpha)


__all__ = ['KVCache', 'Transformer', 'build_model']
