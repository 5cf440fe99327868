"""The anchor LM: a pre-norm decoder whose FFNs a fetched memory can widen per sequence.

`model(tokens, segment_ids, memory)`: `memory` is None for the dense anchor, or a dict of
per-sequence arrays with a layer axis (e.g. FFN memory: `ffn_gate`/`ffn_up`/`ffn_down`
[B, layers_m, r, d]) covering the contiguous layer range `memory_layers`. The layer stack
is one set of stacked parameters; a memory range splits the scan into segments, so the
scanned body never branches on the layer index. Given a KVCache (hmem.model.cache), the
same call decodes incrementally: prefill a prompt, then one token at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hmem import sharding
from hmem.errors import ConfigError
from hmem.model.attention import Attention, attention_mask
from hmem.model.cache import KVCache
from hmem.model.layers import SwiGLU, linear, make_norm, segment_positions

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dtype_of(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ConfigError(f'{name!r} is not a dtype; use e.g. float32 or bfloat16') from e


class Block(nnx.Module):

  def __init__(self, cfg, lora_alpha: float, rngs: nnx.Rngs):
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, dtype, param_dtype, 'embed', rngs)
    self.attn = Attention(cfg, dtype, param_dtype, lora_alpha, rngs)
    self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, dtype, param_dtype, 'embed', rngs)
    out_std = cfg.init_std / (2 * cfg.layers) ** 0.5
    self.ffn = SwiGLU(cfg.d_model, cfg.ffn, cfg.init_std, out_std, dtype, param_dtype, lora_alpha, rngs)

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, memory=None, cache=None):
    """Returns (output, cache); `cache` as in Attention."""
    attn_BxTxD, cache = self.attn(self.attn_norm(x_BxTxD), positions_BxT, mask_BxTxS, memory, cache)
    x_BxTxD = x_BxTxD + attn_BxTxD
    x_BxTxD = x_BxTxD + self.ffn(self.ffn_norm(x_BxTxD), memory)
    return sharding.constrain(x_BxTxD, ('batch', None, None)), cache


class Transformer(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs, memory_layers: tuple[int, int] | None = None, lora_alpha: float = 2.0):
    """`memory_layers` = (first, end) of the layers a memory widens (None: all);
    `lora_alpha` scales a LoRA memory by alpha / rank."""
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.init_std), ('vocab', 'embed')),
        rngs=rngs)

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(cfg, lora_alpha, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, dtype, param_dtype, 'embed', rngs)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Linear(
          cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
          kernel_init=nnx.with_partitioning(nnx.initializers.truncated_normal(cfg.init_std), ('embed', 'vocab')),
          rngs=rngs)
    self.num_layers = cfg.layers
    self.memory_layers = tuple(memory_layers) if memory_layers else (0, cfg.layers)
    if cfg.remat not in REMAT_POLICIES:
      raise ConfigError(f'model.remat={cfg.remat!r}; choose one of {sorted(REMAT_POLICIES)}')
    self.remat_policy = REMAT_POLICIES[cfg.remat]
    self.remat = cfg.remat != 'none'
    self.scan_layers = cfg.scan_layers

  def __call__(self, tokens_BxT, segment_ids_BxT, memory: dict | None = None, cache: KVCache | None = None):
    """Returns fp32 logits [B, T, vocab]; with a `cache`, (logits, the cache holding these
    T tokens too): the same layers then attend to the cached slots as well."""
    if cache is None:
      positions_BxT, mask_BxTxS = segment_positions(segment_ids_BxT), attention_mask(segment_ids_BxT)
    else:
      positions_BxT, mask_BxTxS = cache.positions(segment_ids_BxT), cache.mask(segment_ids_BxT)
    x_BxTxD = sharding.constrain(self.embed(tokens_BxT), ('batch', None, None))

    graphdef, stack = nnx.split(self.blocks)
    first, end = self.memory_layers if memory is not None else (0, self.num_layers)
    for lo, hi, mem in ((0, first, None), (first, end, memory), (end, self.num_layers, None)):
      if hi > lo:
        segment = jax.tree.map(lambda a: a[lo:hi], stack) if (lo, hi) != (0, self.num_layers) else stack
        x_BxTxD, cache = self._run_layers(graphdef, segment, lo, x_BxTxD, positions_BxT, mask_BxTxS, mem, cache)

    x_BxTxD = self.final_norm(x_BxTxD)
    if self.lm_head is None:
      logits = self.embed.attend(x_BxTxD)
    else:
      logits = linear(self.lm_head, x_BxTxD)
    logits = sharding.constrain(logits.astype(jnp.float32), ('batch', None, 'vocab'))
    return logits if cache is None else (logits, cache.advance(segment_ids_BxT))

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty KV cache of `max_len` slots per row, in the compute dtype."""
    _, K, H = self.blocks.attn.shape
    return KVCache.empty(self.num_layers, batch, max_len, K, H, self.blocks.attn.dtype)

  def _run_layers(self, graphdef, stack, first, x_BxTxD, positions_BxT, mask_BxTxS, memory, cache):
    """Runs the layers first, first + 1, ... held in `stack`; with a cache, each writes the
    new tokens' keys and values and attends to its cached slots (the cache rides in the
    carry, so a step writes only the new slots)."""
    def body(carry, layer):
      x, cache = carry
      state, i = layer
      # Memory arrays are [B, layers_m, ...]; each layer indexes its own. Scanning over
      # them instead would transpose the block and copy every layer's slice (on CPU a
      # decode step with memory then took 1.9x the step without; now 1.1x).
      mem = None if memory is None else {n: jax.lax.dynamic_index_in_dim(a, i - first, 1, False)
                                         for n, a in memory.items()}
      x, cache = nnx.merge(graphdef, state)(x, positions_BxT, mask_BxTxS, mem, None if cache is None else (cache, i))
      return (x, cache), None

    if self.remat:
      body = jax.checkpoint(body, policy=self.remat_policy, prevent_cse=not self.scan_layers)
    n = jax.tree.leaves(stack)[0].shape[0]
    layers = (stack, jnp.arange(first, first + n))
    if self.scan_layers:
      (x_BxTxD, cache), _ = jax.lax.scan(body, (x_BxTxD, cache), layers)
      return x_BxTxD, cache
    for i in range(n):
      (x_BxTxD, cache), _ = body((x_BxTxD, cache), jax.tree.map(lambda a: a[i], layers))
    return x_BxTxD, cache
