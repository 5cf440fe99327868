"""The key/value cache of incremental decoding.

A cache holds every layer's keys and values for the tokens seen so far, in slots
[0, index). Each batch row decodes one document; prompts of different lengths are
left-padded (padding has segment id 0), so every row writes its next token to the same
slot and one scalar `index` serves the whole batch. A chunk of new tokens (the prompt at
prefill, one token per step after) attends to the cached slots and to itself under the
same rule as a full forward pass: same segment, not in the future.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
  keys: jax.Array         # [layers, B, S, kv_heads, head_dim]
  values: jax.Array       # [layers, B, S, kv_heads, head_dim]
  segment_ids: jax.Array  # [B, S]: each slot's segment id; 0 = padding or not written yet
  lengths: jax.Array      # [B] int32: real (non-padding) tokens cached, the next RoPE position
  index: jax.Array        # int32 scalar: slots written so far

  @classmethod
  def empty(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    """A cache of `max_len` slots per row (see `Transformer.init_cache`)."""
    shape = (layers, batch, max_len, kv_heads, head_dim)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               segment_ids=jnp.zeros((batch, max_len), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]

  def positions(self, segment_ids_BxT: jax.Array) -> jax.Array:
    """RoPE positions of a new chunk: each row's count continues; padding repeats it."""
    real_BxT = (segment_ids_BxT != 0).astype(jnp.int32)
    return self.lengths[:, None] + jnp.maximum(jnp.cumsum(real_BxT, axis=1) - 1, 0)

  def mask(self, segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, T, S] bool: chunk token t (in slot index + t) sees slot s iff s <= index + t and
    both lie in the same segment; slots past the chunk are never seen."""
    T = segment_ids_BxT.shape[1]
    segments_BxS = jax.lax.dynamic_update_slice(self.segment_ids, segment_ids_BxT, (0, self.index))
    slot_T = self.index + jnp.arange(T)
    causal_TxS = jnp.arange(self.max_len)[None, :] <= slot_T[:, None]
    return (segments_BxS[:, None, :] == segment_ids_BxT[:, :, None]) & causal_TxS

  def write(self, i, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> KVCache:
    """Stores layer `i`'s new keys and values (only the chunk's slots are written)."""
    at = (i, 0, self.index, 0, 0)
    return self.replace(keys=jax.lax.dynamic_update_slice(self.keys, k_BxTxKxH[None], at),
                        values=jax.lax.dynamic_update_slice(self.values, v_BxTxKxH[None], at))

  def advance(self, segment_ids_BxT: jax.Array) -> KVCache:
    """Records a chunk whose keys and values every layer has written."""
    return self.replace(
        segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, segment_ids_BxT, (0, self.index)),
        lengths=self.lengths + jnp.sum(segment_ids_BxT != 0, axis=1, dtype=jnp.int32),
        index=self.index + segment_ids_BxT.shape[1])
