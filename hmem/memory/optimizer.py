"""AdamW for the bank, updating only the rows a step touched, so that its cost does not
grow with the bank.

Gradients arrive per sequence (with respect to each sequence's fetched rows), never as a
bank-sized buffer. `row_gradients` sums them per distinct row (`jnp.unique` with a static
size, then a segment sum); `update` gathers only those rows and their fp32 moments,
updates them, and scatters them back into the donated bank with mode='drop'.

Each row keeps `last_step`, the step it was last updated at. Before its update, a row
that missed steps is caught up on what dense AdamW would have done to it on those steps
with zero gradients: its moments decay by b1^Δ, b2^Δ; its parameters decay by
P = Π (1 - lr_j wd) over the missed steps j (with each step's own lr); and, with
`memory.optimizer='exact'`, they also move by -S m/(√v + ε') along the direction of its
last moments, S summing each missed step's lr, bias corrections, (b1/√b2)^k decay of
m/√v and later weight decays (derivation, window and error bounds: docs/DECISIONS.md).
`lazy` leaves that drift out; `dense` updates every row every step (so nothing is missed
but after a skipped non-finite step). Bias corrections use the global step. When every
row is touched every step, all three are the same AdamW (P = 1, S = 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hmem import sharding
from hmem.memory import bank as memory_bank
from hmem.memory import config as mcfg
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


def memory_schedule(cfg) -> optax.Schedule:
  t = cfg.train
  return lr_schedule(cfg.memory.lr, cfg.memory.min_lr, t.warmup_steps, t.schedule_steps or t.steps)


@functools.lru_cache(maxsize=4)
def _log_decay_table(lr: float, min_lr: float, warmup_steps: int, total: int, wd: float):
  """([total + 1] float32 L(s) for s <= total, log(1 - lr wd) of every later step)."""
  with jax.ensure_compile_time_eval():
    lr_S = np.asarray(jax.vmap(lr_schedule(lr, min_lr, warmup_steps, total))(jnp.arange(total + 1)), np.float64)
  log_keep_S = np.log1p(-wd * lr_S)  # step j + 1 uses lr_S[j]; from `total` on, the lr is min_lr
  return np.concatenate([[0.0], np.cumsum(log_keep_S[:total])]).astype(np.float32), float(log_keep_S[total])


def _log_decay(cfg):
  """s -> L(s) = Σ_{j<=s} log(1 - lr_j wd): the log of what the weight decay of steps 1..s
  keeps. A table as long as the lr schedule (4 bytes a step), summed once on the host in
  float64; past the schedule the lr is constant and L linear."""
  t, m = cfg.train, cfg.memory
  total = t.schedule_steps or t.steps
  table, tail = _log_decay_table(m.lr, m.min_lr, t.warmup_steps, total, m.weight_decay)
  table_S = jnp.asarray(table)  # under jit, an argument of the program, not a constant in it
  return lambda s: jnp.where(s <= total, table_S[jnp.minimum(s, total)],
                             table[total] + (s - total).astype(jnp.float32) * tail)


def _missed_steps(cfg, log_decay, last_U: jax.Array, step: jax.Array):
  """What dense AdamW with zero gradients did on steps last+1 .. step-1 to each row last
  updated at `last_U`: (decay P [U], and for 'exact' drift S [U] and ε' [U], else None),
  the row ending at P w - S m/(√v + ε') with its moments of step `last`."""
  b1, b2, eps = cfg.train.b1, cfg.train.b2, cfg.train.eps
  now = log_decay(step - 1)
  decay_U = jnp.exp(now - log_decay(last_U))
  if cfg.memory.optimizer != 'exact':
    return decay_U, None, None
  window = mcfg.drift_window(cfg)
  k_W = np.arange(1, window + 1)
  j_UxW = last_U[:, None] + k_W  # the missed steps, up to `window` after the last update
  lr_UxW = jax.vmap(memory_schedule(cfg))(j_UxW.reshape(-1) - 1).reshape(j_UxW.shape)
  j = j_UxW.astype(jnp.float32)
  bias_UxW = jnp.sqrt(1 - b2 ** j) / (1 - b1 ** j)
  rho_W = jnp.asarray((b1 / np.sqrt(b2)) ** k_W, jnp.float32)
  terms_UxW = lr_UxW * rho_W * bias_UxW * jnp.exp(now - log_decay(j_UxW))
  drift_U = jnp.sum(jnp.where(j_UxW < step, terms_UxW, 0.0), axis=1)
  # The first missed step's ε, exact for it; later steps' is larger (docs/DECISIONS.md).
  eps_U = eps * jnp.sqrt((1 - b2 ** (last_U + 1).astype(jnp.float32)) / b2)
  return decay_U, drift_U, eps_U


def _expand(x, w):
  return x.reshape(x.shape + (1,) * (w.ndim - 1))


def _apply_missed(w, m, v, missed):
  """Rows `w` [U, ...] moved as dense AdamW moved them on the steps they `missed`."""
  decay_U, drift_U, eps_U = missed
  w = _expand(decay_U, w) * w
  if drift_U is not None:
    # A row never updated has m = v = 0 and no drift.
    w = w - _expand(drift_U, w) * jnp.where(v > 0, m / (jnp.sqrt(v) + _expand(eps_U, w)), 0.0)
  return w


def caught_up(cfg, arrays: dict, mu: dict, nu: dict, last_U, step) -> dict:
  """Rows of one table as dense AdamW holds them after `step` updates: each row (weights
  {name: [U, ...]}, its moments, `last_U` its last update) moved on the steps
  last+1 .. step it missed. What export and every reader of a checkpoint's bank serve, so
  that no row is stale; works on any range of rows."""
  last_U = jnp.asarray(last_U, jnp.int32)
  missed = _missed_steps(cfg, _log_decay(cfg), last_U, jnp.asarray(step, jnp.int32) + 1)
  return {n: _apply_missed(jnp.asarray(w, jnp.float32), jnp.asarray(mu[n], jnp.float32),
                           jnp.asarray(nu[n], jnp.float32), missed) for n, w in arrays.items()}


def _adamw_rows(w, m, v, g, last_U, missed, step, lr, train_cfg, wd):
  """Catches gathered rows up on the steps they `missed` since `last_U`, then takes this
  step's AdamW update."""
  b1, b2, eps = train_cfg.b1, train_cfg.b2, train_cfg.eps
  w = _apply_missed(w, m, v, missed)
  d = _expand((step - last_U).astype(jnp.float32), w)
  m = b1 ** d * m + (1 - b1) * g
  v = b2 ** d * v + (1 - b2) * jnp.square(g)
  t = step.astype(jnp.float32)
  m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
  w = w - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + wd * w)
  return w, m, v


def update(cfg, bank: dict, opt: dict, row_ids: dict, row_grads: dict, step: jax.Array, finite: jax.Array):
  """Applies one update. `row_ids`/`row_grads` come from `row_gradients`;
  `step` is the 1-based index of this update. A step that is not `finite` writes nothing:
  every id becomes out of range, and the scatters drop them (no `where` over the whole
  bank). Returns (bank, opt)."""
  lr = memory_schedule(cfg)(step - 1)
  log_decay = _log_decay(cfg)
  new_bank, new_opt = {}, {}
  for t, arrays in bank.items():
    ids_U, grads = row_ids[t], row_grads[t]
    rows = next(iter(arrays.values())).shape[0]
    if cfg.memory.optimizer == 'dense':
      # Every row takes a step; rows no sequence fetched get a zero gradient.
      grads = {n: jnp.zeros_like(a).at[ids_U].add(grads[n], mode='drop') for n, a in arrays.items()}
      ids_U = jnp.arange(rows)
    ids_U = jnp.where(finite, ids_U, rows)
    gather = lambda x: sharding.constrain(x.at[ids_U].get(mode='fill', fill_value=0), ROW_AXES)
    scatter = lambda x, rows_U: x.at[ids_U].set(rows_U, mode='drop')
    last_U = opt[t]['last_step'].at[ids_U].get(mode='fill', fill_value=0)
    missed = _missed_steps(cfg, log_decay, last_U, step)
    new_bank[t], mu, nu = {}, {}, {}
    for n, a in arrays.items():
      w, m, v = _adamw_rows(gather(a), gather(opt[t]['mu'][n]), gather(opt[t]['nu'][n]), grads[n],
                            last_U, missed, step, lr, cfg.train, cfg.memory.weight_decay)
      new_bank[t][n], mu[n], nu[n] = scatter(a, w), scatter(opt[t]['mu'][n], m), scatter(opt[t]['nu'][n], v)
    new_opt[t] = {'mu': mu, 'nu': nu, 'last_step': scatter(opt[t]['last_step'], jnp.broadcast_to(step, ids_U.shape))}
  return new_bank, new_opt

