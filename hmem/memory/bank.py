"""The memory bank: fp32 parameter tables outside the NNX model, and the per-sequence fetch.

A bank is a dict of tables (`MemorySpec.tables`). Table `level{l}` has one row per tree
node of level l (k**l rows) and contributes `memory.levels[l-1]` hidden units (FFN), rank
(LoRA) or slots (KV) per memory layer; table `generic` has one row as wide as a whole fetch. Every table
holds the same named arrays, [rows, layers_m, width, features]; a fetch concatenates the
rows of a sequence's root-to-leaf path along the width axis, so the model sees one block
per sequence whatever the hierarchy.

Level-l node ids number the nodes so children are contiguous: the level-l ancestor of
leaf i is i // k**(depth - l).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from hmem import sharding
from hmem.memory.spec import MemorySpec

# Arrays that start at zero, so that a fresh memory is an exact no-op.
ZERO_INIT = ('ffn_down', 'kv_values')
# Bank arrays are sharded on rows (the optional `memory` mesh axis) and features.
LOGICAL_AXES = ('bank_rows', None, None, 'bank_embed')


def is_zero_init(name: str) -> bool:
  return name in ZERO_INIT or name.endswith('_b')


def bank_shardings(spec: MemorySpec, mesh, rules):
  return jax.tree.map(lambda shape: sharding.named_sharding(mesh, LOGICAL_AXES, rules, shape), spec.bank_shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def init_bank(spec: MemorySpec, key: jax.Array) -> dict:
  """Gate/up, LoRA A and KV keys truncated normal; down, LoRA B and KV values zero."""
  bank = {}
  for t, arrays in spec.bank_shapes.items():
    bank[t] = {}
    for name, shape in arrays.items():
      if is_zero_init(name):
        bank[t][name] = jnp.zeros(shape, jnp.float32)
      else:
        k = jax.random.fold_in(key, zlib.crc32(f'{t}/{name}'.encode()))  # stable across processes
        bank[t][name] = spec.init_std * jax.random.truncated_normal(k, -2.0, 2.0, shape, jnp.float32)
  return bank


def gather_levels(spec: MemorySpec, bank: dict, leaf_B: jax.Array, dtype=None) -> dict:
  """Per level table, each sequence's row: {table: {name: [B, layers_m, width, features]}},
  in `dtype` (None: the bank's fp32).

  The bank is feature-sharded: every device gathers all B rows of its feature slice (ids
  are replicated, tiny) and casts them to `dtype`, then one all-to-all hands each device its
  own sequences' rows. Cast before the all-to-all, the rows move in the compute dtype (bf16:
  half the bytes of fp32), and the model sees the same values as when cast after it; their
  gradients move back in that dtype too (`optimizer.row_gradients` sums them in fp32).
  """
  leaf_B = sharding.constrain(leaf_B, (None,))
  out = {}
  for t in bank:
    if t == 'generic':
      continue
    ids_B = spec.level_ids(leaf_B, t)
    out[t] = {}
    for name, table in bank[t].items():
      rows = table[ids_B] if dtype is None else table[ids_B].astype(dtype)
      rows = sharding.constrain(rows, (None, None, None, 'bank_embed'))
      out[t][name] = sharding.constrain(rows, ('batch', None, None, None))
  return out


def assemble(blocks: dict, generic: dict | None, use_generic_B: jax.Array | None, dtype) -> dict:
  """The model's `memory`: per name, the path's rows concatenated along the width axis,
  replaced by the generic block for sequences with `use_generic_B`; in `dtype`. The generic
  block stays fp32 up to the cast, so that its gradient is summed over the batch in fp32."""
  names = next(iter(blocks.values())).keys()
  memory = {}
  for name in names:
    block = jnp.concatenate([blocks[t][name] for t in blocks], axis=2)
    if generic is not None and use_generic_B is not None:
      block = jnp.where(use_generic_B[:, None, None, None], generic[name], block)
    memory[name] = block.astype(dtype)
  return memory


def generic_mask(spec: MemorySpec, key: jax.Array, batch: int) -> jax.Array | None:
  """Which training sequences use the generic block this step (None when it is off)."""
  if spec.generic_prob <= 0:
    return None
  return jax.random.bernoulli(key, spec.generic_prob, (batch,))

