"""AdamW for the bank: row-sparse (default) or dense, one update formula for both.

Gradients arrive per sequence (with respect to each sequence's fetched rows), never as a
bank-sized buffer. `row_gradients` sums them per distinct row (`jnp.unique` with a static
size, then a segment sum); the sparse update gathers only those rows and their fp32
moments, updates them, and scatters them back into the donated bank with mode='drop'.

Each row keeps `last_step`, the step it was last updated at. A row untouched for Δ-1
steps is updated as dense AdamW would have updated its moments with zero gradients:
m = b1^Δ m + (1-b1) g, v = b2^Δ v + (1-b2) g², bias-corrected with the global step; and,
with `decay_catchup`, its parameters first receive the Δ-1 missed weight decays,
(1 - lr wd)^(Δ-1). When every row is touched every step (Δ = 1) this is exactly AdamW,
and the dense option is the same formula applied to every row with Δ = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hmem import sharding
from hmem.memory import bank as memory_bank
from hmem.schedules import schedule as lr_schedule

# Gathered rows and per-row gradients keep the bank's feature sharding.
ROW_AXES = (None, None, None, 'bank_embed')


def init(bank: dict) -> dict:
  """Moments per array and `last_step` per row, for every table."""
  opt = {}
  for t, arrays in bank.items():
    rows = next(iter(arrays.values())).shape[0]
    opt[t] = {'mu': jax.tree.map(jnp.zeros_like, arrays), 'nu': jax.tree.map(jnp.zeros_like, arrays),
              'last_step': jnp.zeros((rows,), jnp.int32)}
  return opt


def opt_shardings(bank_shardings: dict, mesh) -> dict:
  out = {}
  for t, arrays in bank_shardings.items():
    rows_spec = next(iter(arrays.values())).spec[0]
    out[t] = {'mu': arrays, 'nu': arrays,
              'last_step': jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows_spec))}
  return out


def row_gradients(cfg, block_grads: dict, generic_grads: dict | None, leaf_B: jax.Array,
                  use_generic_B: jax.Array | None) -> tuple[dict, dict]:
  """Per table: (row ids [U], summed row gradients {name: [U, ...]}) from the per-sequence
  gradients of the fetched blocks (and the generic block's, already summed). Sequences
  switched to the generic block do not touch their path's rows."""
  row_ids, row_grads = {}, {}
  for t, (rows, _) in memory_bank.tables(cfg).items():
    if t == 'generic':
      # One row; touched iff some sequence used it.
      row_ids[t] = jnp.where(jnp.any(use_generic_B), 0, 1)[None]
      row_grads[t] = generic_grads
      continue
    ids_B = memory_bank.level_ids(cfg, leaf_B, t)
    if use_generic_B is not None:
      ids_B = jnp.where(use_generic_B, rows, ids_B)
    row_ids[t], row_grads[t] = _table_row_gradients(block_grads[t], ids_B, rows)
  return row_ids, row_grads


def _table_row_gradients(seq_grads: dict, ids_B: jax.Array, rows: int):
  """Sums per-sequence gradients of one table per distinct row.

  `ids_B` holds each sequence's row, or `rows` (out of range) for a sequence that did not
  use this table. U = min(B, rows + 1) is static; unused slots and the out-of-range id
  carry id `rows`, which every later scatter drops.
  """
  B = ids_B.shape[0]
  U = min(B, rows + 1)
  row_ids, inverse = jnp.unique(ids_B, size=U, fill_value=rows, return_inverse=True)
  inverse = inverse.reshape(B)
  grads = {}
  for name, g in seq_grads.items():
    g = sharding.constrain(g, ROW_AXES)  # feature-sharded, like the bank
    grads[name] = jax.ops.segment_sum(g, inverse, num_segments=U, indices_are_sorted=False)
  return row_ids, grads


def _adamw_rows(w, m, v, g, delta, step, lr, train_cfg, memory_cfg):
  """One AdamW update of gathered rows; `delta` [U] steps since each row's last update."""
  b1, b2, eps, wd = train_cfg.b1, train_cfg.b2, train_cfg.eps, memory_cfg.weight_decay
  expand = lambda x: x.reshape(x.shape + (1,) * (w.ndim - 1))
  d = expand(delta.astype(jnp.float32))
  m = b1 ** d * m + (1 - b1) * g
  v = b2 ** d * v + (1 - b2) * jnp.square(g)
  t = step.astype(jnp.float32)
  m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
  if memory_cfg.decay_catchup:
    w = w * (1 - lr * wd) ** (d - 1)
  w = w - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + wd * w)
  return w, m, v


def update(cfg, bank: dict, opt: dict, row_ids: dict, row_grads: dict, step: jax.Array, finite: jax.Array):
  """Applies one update. `row_ids`/`row_grads` come from `row_gradients`;
  `step` is the 1-based index of this update. A step that is not `finite` writes nothing:
  every id becomes out of range, and the scatters drop them (no `where` over the whole
  bank). Returns (bank, opt)."""
  lr = memory_schedule(cfg)(step - 1)
  new_bank, new_opt = {}, {}
  for t, arrays in bank.items():
    ids_U, grads = row_ids[t], row_grads[t]
    if cfg.memory.optimizer == 'dense':
      # Every row takes a step; rows no sequence fetched get a zero gradient.
      rows = next(iter(arrays.values())).shape[0]
      grads = {n: jnp.zeros_like(a).at[ids_U].add(grads[n], mode='drop') for n, a in arrays.items()}
      ids_U = jnp.arange(rows)
    ids_U = jnp.where(finite, ids_U, next(iter(arrays.values())).shape[0])
    gather = lambda x: sharding.constrain(x.at[ids_U].get(mode='fill', fill_value=0), ROW_AXES)
    scatter = lambda x, rows_U: x.at[ids_U].set(rows_U, mode='drop')
    delta_U = step - opt[t]['last_step'].at[ids_U].get(mode='fill', fill_value=0)
    new_bank[t], mu, nu = {}, {}, {}
    for n, a in arrays.items():
      w, m, v = _adamw_rows(gather(a), gather(opt[t]['mu'][n]), gather(opt[t]['nu'][n]), grads[n],
                            delta_U, step, lr, cfg.train, cfg.memory)
      new_bank[t][n], mu[n], nu[n] = scatter(a, w), scatter(opt[t]['mu'][n], m), scatter(opt[t]['nu'][n], v)
    new_opt[t] = {'mu': mu, 'nu': nu, 'last_step': scatter(opt[t]['last_step'], jnp.broadcast_to(step, ids_U.shape))}
  return new_bank, new_opt


def memory_schedule(cfg) -> optax.Schedule:
  t = cfg.train
  return lr_schedule(cfg.memory.lr, cfg.memory.min_lr, t.warmup_steps, t.schedule_steps or t.steps)
