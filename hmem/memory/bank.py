"""The memory bank: fp32 parameter tables outside the NNX model, and the per-sequence fetch.

A bank is a dict of tables. Table `level{l}` has one row per tree node of level l
(k**l rows) and contributes `memory.levels[l-1]` hidden units (FFN), rank (LoRA) or slots
(KV) per memory layer; table `generic` has one row as wide as a whole fetch. Every table
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
from hmem.memory import config as mcfg

# Arrays that start at zero, so that a fresh memory is an exact no-op.
ZERO_INIT = ('ffn_down', 'kv_values')
# Bank arrays are sharded on rows (the optional `memory` mesh axis) and features.
LOGICAL_AXES = ('bank_rows', None, None, 'bank_embed')


def block_shapes(cfg, width: int) -> dict[str, tuple[int, ...]]:
  """Named arrays of one row of width `width`: [layers_m, width, features]."""
  first, end = mcfg.memory_layers(cfg)
  Lm, m = end - first, cfg.model
  d, F, NH, KH = m.d_model, m.ffn, m.heads * m.head_dim, m.kv_heads * m.head_dim
  kind = cfg.memory.type
  if kind == 'ffn':
    return {name: (Lm, width, d) for name in ('ffn_gate', 'ffn_up', 'ffn_down')}
  if kind == 'kv':
    return {'kv_keys': (Lm, width, KH), 'kv_values': (Lm, width, KH)}
  dims = {'q': (d, NH), 'k': (d, KH), 'v': (d, KH), 'o': (NH, d), 'gate': (d, F), 'up': (d, F), 'down': (F, d)}
  shapes = {}
  for target in mcfg.LORA_TARGETS[cfg.memory.lora_targets]:
    d_in, d_out = dims[target]
    shapes[f'lora_{target}_a'] = (Lm, width, d_in)
    shapes[f'lora_{target}_b'] = (Lm, width, d_out)
  return shapes


def is_zero_init(name: str) -> bool:
  return name in ZERO_INIT or name.endswith('_b')


def tables(cfg) -> dict[str, tuple[int, int]]:
  """{table: (rows, width)} in fetch order: levels root to leaf, then the generic block."""
  out = {f'level{level}': (cfg.memory.k ** level, width) for level, width in mcfg.active_levels(cfg)}
  if out and mcfg.generic_prob(cfg) > 0:
    out['generic'] = (1, sum(w for _, w in out.values()))
  return out


def bank_shapes(cfg) -> dict[str, dict[str, tuple[int, ...]]]:
  return {t: {n: (rows, *s) for n, s in block_shapes(cfg, width).items()} for t, (rows, width) in tables(cfg).items()}


def bank_shardings(cfg, mesh):
  rules = cfg.mesh.rules
  return jax.tree.map(lambda shape: sharding.named_sharding(mesh, LOGICAL_AXES, rules, shape), bank_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def init_bank(cfg, key: jax.Array) -> dict:
  """Gate/up, LoRA A and KV keys truncated normal; down, LoRA B and KV values zero."""
  bank = {}
  for t, arrays in bank_shapes(cfg).items():
    bank[t] = {}
    for name, shape in arrays.items():
      if is_zero_init(name):
        bank[t][name] = jnp.zeros(shape, jnp.float32)
      else:
        k = jax.random.fold_in(key, zlib.crc32(f'{t}/{name}'.encode()))  # stable across processes
        std = cfg.memory.init_std
        bank[t][name] = std * jax.random.truncated_normal(k, -2.0, 2.0, shape, jnp.float32)
  return bank


def level_ids(cfg, leaf_B: jax.Array, table: str) -> jax.Array:
  """Node ids of `table`'s level on each sequence's root-to-leaf path."""
  level = int(table.removeprefix('level'))
  return leaf_B // cfg.memory.k ** (cfg.memory.depth - level)


def gather_levels(cfg, bank: dict, leaf_B: jax.Array) -> dict:
  """Per level table, each sequence's row: {table: {name: [B, layers_m, width, features]}}.

  The bank is feature-sharded: every device gathers all B rows of its feature slice (ids
  are replicated, tiny), then one all-to-all hands each device its own sequences' rows.
  """
  leaf_B = sharding.constrain(leaf_B, (None,))
  out = {}
  for t in bank:
    if t == 'generic':
      continue
    ids_B = level_ids(cfg, leaf_B, t)
    out[t] = {}
    for name, table in bank[t].items():
      rows = sharding.constrain(table[ids_B], (None, None, None, 'bank_embed'))
      out[t][name] = sharding.constrain(rows, ('batch', None, None, None))
  return out


def assemble(blocks: dict, generic: dict | None, use_generic_B: jax.Array | None, dtype) -> dict:
  """The model's `memory`: per name, the path's rows concatenated along the width axis,
  replaced by the generic block for sequences with `use_generic_B`; in `dtype`."""
  names = next(iter(blocks.values())).keys()
  memory = {}
  for name in names:
    block = jnp.concatenate([blocks[t][name] for t in blocks], axis=2)
    if generic is not None and use_generic_B is not None:
      block = jnp.where(use_generic_B[:, None, None, None], generic[name], block)
    memory[name] = block.astype(dtype)
  return memory


def generic_mask(cfg, key: jax.Array, batch: int) -> jax.Array | None:
  """Which training sequences use the generic block this step (None when it is off)."""
  p = mcfg.generic_prob(cfg)
  if p <= 0:
    return None
  return jax.random.bernoulli(key, p, (batch,))

