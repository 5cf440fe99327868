"""Grouped-query self-attention with per-document masking from segment ids.

`attention_mask` is the one definition of who may attend to whom (same segment, not in the
future) in a full pass, and `KVCache.mask` the same rule for a chunk decoded after cached
slots; every kernel behind the `model.attention` switch consumes such a mask, so all of
them honour packed documents, with or without a cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hmem.errors import ConfigError
from hmem.model.layers import apply_rope, dense_init, linear, lora_delta, make_norm, rope_scaling


def attention_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, T, S] bool: query t sees key s iff s <= t and both lie in the same segment."""
  T = segment_ids_BxT.shape[-1]
  causal_TxS = jnp.tril(jnp.ones((T, T), bool))
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return same_BxTxS & causal_TxS


def xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  """Plain einsum attention; softmax in fp32. N query heads share K key/value heads."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  logits = jnp.einsum('btkgh,bskh->bkgts', q_BxTxKxGxH, k_BxSxKxH,
                      preferred_element_type=jnp.float32) * (H ** -0.5)
  # A finite fill keeps fully masked rows (never produced by `attention_mask`) NaN-free.
  logits = jnp.where(mask_BxTxS[:, None, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxH.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v_BxSxKxH)
  return out.reshape(B, T, N, H)


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  """jax.nn.dot_product_attention: picks a fused kernel where the platform has one."""
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None])


ATTENTION_KERNELS = {'xla': xla_attention, 'dot_product': dot_product_attention}


def memory_attention(q_BxTxNxH, keys_BxRxKxH, values_BxRxKxH):
  """KV memory: every query attends to the sequence's r fetched slots, with no mask and no
  position encoding, in a softmax of its own. Its output is added to self-attention, so
  zero values (the init) make the memory an exact no-op."""
  B, T, N, H = q_BxTxNxH.shape
  K = keys_BxRxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  logits = jnp.einsum('btkgh,brkh->btkgr', q_BxTxKxGxH, keys_BxRxKxH,
                      preferred_element_type=jnp.float32) * (H ** -0.5)
  probs = jax.nn.softmax(logits, axis=-1).astype(values_BxRxKxH.dtype)
  return jnp.einsum('btkgr,brkh->btkgh', probs, values_BxRxKxH).reshape(B, T, N, H)


class Attention(nnx.Module):

  def __init__(self, cfg, dtype, param_dtype, lora_alpha: float, rngs: nnx.Rngs):
    if cfg.attention not in ATTENTION_KERNELS:
      raise ConfigError(f'model.attention={cfg.attention!r}; choose one of {sorted(ATTENTION_KERNELS)}')
    if cfg.heads % cfg.kv_heads:
      raise ConfigError(f'model.heads={cfg.heads} must be a multiple of model.kv_heads={cfg.kv_heads}')
    d, N, K, H = cfg.d_model, cfg.heads, cfg.kv_heads, cfg.head_dim
    out_std = cfg.init_std / (2 * cfg.layers) ** 0.5
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qkv = dict(kw, use_bias=cfg.qkv_bias)
    init = lambda axis: dict(kernel_init=dense_init(cfg.init_std, ('embed', axis)),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axis,)))
    self.q = nnx.Linear(d, N * H, **init('heads'), **qkv)
    self.k = nnx.Linear(d, K * H, **init('kv_heads'), **qkv)
    self.v = nnx.Linear(d, K * H, **init('kv_heads'), **qkv)
    self.o = nnx.Linear(N * H, d, kernel_init=dense_init(out_std, ('heads', 'embed')), **kw)
    if cfg.qk_norm:
      self.q_norm = make_norm(cfg.norm, N * H, cfg.norm_eps, dtype, param_dtype, 'heads', rngs)
      self.k_norm = make_norm(cfg.norm, K * H, cfg.norm_eps, dtype, param_dtype, 'kv_heads', rngs)
    else:
      self.q_norm = self.k_norm = None
    self.shape = (N, K, H)
    self.rope_base = cfg.rope_base
    self.rope_scaling = rope_scaling(cfg)
    self.kernel = ATTENTION_KERNELS[cfg.attention]
    self.dtype = dtype
    self.lora_alpha = lora_alpha

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, memory: dict | None = None, cache=None):
    """Returns (output, cache).

    `memory` may carry LoRA factors for q/k/v/o or KV memory slots (see hmem.memory).
    `cache`: None (keys are the T tokens themselves: S = T), or (KVCache, this layer's
    index): the new keys and values are written to their slots first, then the layer's
    slots are read back and attended to (written before read, so XLA updates the cache in
    place), and the updated KVCache is returned.
    """
    N, K, H = self.shape
    B, T, _ = x_BxTxD.shape
    lora = lambda x, target: lora_delta(x, memory, target, self.lora_alpha, self.dtype)
    q = linear(self.q, x_BxTxD) + lora(x_BxTxD, 'q')
    k = linear(self.k, x_BxTxD) + lora(x_BxTxD, 'k')
    v = linear(self.v, x_BxTxD) + lora(x_BxTxD, 'v')
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q_BxTxNxH = apply_rope(q.reshape(B, T, N, H), positions_BxT, self.rope_base, self.rope_scaling)
    k_BxTxKxH = apply_rope(k.reshape(B, T, K, H), positions_BxT, self.rope_base, self.rope_scaling)
    v_BxTxKxH = v.reshape(B, T, K, H)
    if cache is None:
      k_BxSxKxH, v_BxSxKxH = k_BxTxKxH, v_BxTxKxH
    else:
      kv, layer = cache
      cache = kv.write(layer, k_BxTxKxH, v_BxTxKxH)
      k_BxSxKxH, v_BxSxKxH = cache.keys[layer], cache.values[layer]
    out_BxTxNxH = self.kernel(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS)
    if memory is not None and 'kv_keys' in memory:
      R = memory['kv_keys'].shape[1]
      slots = lambda name: memory[name].astype(self.dtype).reshape(B, R, K, H)
      out_BxTxNxH = out_BxTxNxH + memory_attention(q.reshape(B, T, N, H), slots('kv_keys'), slots('kv_values'))
    out_BxTxF = out_BxTxNxH.reshape(B, T, N * H)
    return linear(self.o, out_BxTxF) + lora(out_BxTxF, 'o'), cache
