"""The key/value cache of incremental decoding.

A cache holds every layer's keys and values for the tokens seen so far: row b in slots
[0, index[b]). Each batch row decodes one document. `generate` left-pads prompts of
different lengths (padding has segment id 0) so every row writes to the same slot; the
server's continuous batching starts a new request in one row (`reset_row`) while the others
go on, so each row keeps its own write index. A chunk of new tokens (the prompt at prefill,
one token per step after) attends to the cached slots and to itself under the same rule as
a full forward pass: same segment, not in the future. Slots past a row's index may hold
an earlier request's keys; the causal rule never lets a token see them.
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
  index: jax.Array        # [B] int32: slots written so far in each row

  @classmethod
  def empty(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    """A cache of `max_len` slots per row (see `Transformer.init_cache`)."""
    shape = (layers, batch, max_len, kv_heads, head_dim)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               segment_ids=jnp.zeros((batch, max_len), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
               index=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]

  def positions(self, segment_ids_BxT: jax.Array) -> jax.Array:
    """RoPE positions of a new chunk: each row's count continues; padding repeats it."""
    real_BxT = (segment_ids_BxT != 0).astype(jnp.int32)
    return self.lengths[:, None] + jnp.maximum(jnp.cumsum(real_BxT, axis=1) - 1, 0)

  def mask(self, segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, T, S] bool: row b's chunk token t (in slot index[b] + t) sees slot s iff s <= index[b] + t and
    both lie in the same segment; slots past the chunk are never seen."""
    T = segment_ids_BxT.shape[1]
    segments_BxS = _write_rows(self.segment_ids, segment_ids_BxT, self.index)
    slot_BxT = self.index[:, None] + jnp.arange(T)
    causal_BxTxS = jnp.arange(self.max_len) <= slot_BxT[:, :, None]
    return (segments_BxS[:, None, :] == segment_ids_BxT[:, :, None]) & causal_BxTxS

  def write(self, i, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> KVCache:
    """Stores layer `i`'s new keys and values (only the chunk's slots are written)."""
    at = (i, 0, 0, 0, 0)
    put = lambda stack, new_BxTxKxH: jax.lax.dynamic_update_slice(
        stack, _write_rows(stack[i], new_BxTxKxH, self.index)[None], at)
    return self.replace(keys=put(self.keys, k_BxTxKxH), values=put(self.values, v_BxTxKxH))

  def advance(self, segment_ids_BxT: jax.Array) -> KVCache:
    """Records a chunk whose keys and values every layer has written."""
    return self.replace(
        segment_ids=_write_rows(self.segment_ids, segment_ids_BxT, self.index),
        lengths=self.lengths + jnp.sum(segment_ids_BxT != 0, axis=1, dtype=jnp.int32),
        index=self.index + segment_ids_BxT.shape[1])

  def row(self, b) -> KVCache:
    """Row `b` (a traced index is fine) as a one-row cache, emptied: a new request starts there."""
    take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, b, 1, axis)
    return KVCache(keys=take(self.keys, 1), values=take(self.values, 1),
                   segment_ids=jnp.zeros_like(take(self.segment_ids, 0)), lengths=jnp.zeros((1,), jnp.int32),
                   index=jnp.zeros((1,), jnp.int32))

  def head(self, n: int) -> KVCache:
    """The first `n` rows, as they are (a decode step over fewer rows than the cache holds;
    `put_row(0, part)` writes them back)."""
    return KVCache(keys=self.keys[:, :n], values=self.values[:, :n], segment_ids=self.segment_ids[:n],
                   lengths=self.lengths[:n], index=self.index[:n])

  def put_row(self, b, row: KVCache) -> KVCache:
    """This cache with rows b, b + 1, ... replaced by those of `row` (a one-row cache, or more)."""
    put = lambda a, new, axis: jax.lax.dynamic_update_slice_in_dim(a, new, b, axis)
    return KVCache(keys=put(self.keys, row.keys, 1), values=put(self.values, row.values, 1),
                   segment_ids=put(self.segment_ids, row.segment_ids, 0), lengths=put(self.lengths, row.lengths, 0),
                   index=put(self.index, row.index, 0))


def _write_rows(into_BxSx_, chunk_BxTx_, at_B):
  """`into` with each row b's slots [at_B[b], at_B[b] + T) set to the chunk's row b."""
  write = lambda into, chunk, at: jax.lax.dynamic_update_slice_in_dim(into, chunk, at, 0)
  return jax.vmap(write)(into_BxSx_, chunk_BxTx_, at_B)
