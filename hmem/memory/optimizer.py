"""AdamW for the bank, updating only the rows a step touched, so that its cost does not
grow with the bank.

Gradients arrive per sequence (with respect to each sequence's fetched rows, in the compute
dtype those rows were fetched in), never as a bank-sized buffer. `row_gradients` moves them
to the bank's feature shards in that dtype and sums them per distinct row in fp32
(`jnp.unique` with a static size, then a segment sum); `update` gathers only those rows and their fp32 moments,
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
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hmem import sharding
from hmem.memory.spec import MemorySpec
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


def row_gradients(spec: MemorySpec, block_grads: dict, generic_grads: dict | None, leaf_B: jax.Array,
                  use_generic_B: jax.Array | None) -> tuple[dict, dict]:
  """Per table: (row ids [U], summed fp32 row gradients {name: [U, ...]}) from the
  per-sequence gradients of the fetched blocks (and the generic block's, already summed).
  Sequences switched to the generic block do not touch their path's rows."""
  row_ids, row_grads = {}, {}
  for t, (rows, _) in spec.tables.items():
    if t == 'generic':
      # One row; touched iff some sequence used it.
      row_ids[t] = jnp.where(jnp.any(use_generic_B), 0, 1)[None]
      row_grads[t] = generic_grads
      continue
    ids_B = spec.level_ids(leaf_B, t)
    if use_generic_B is not None:
      ids_B = jnp.where(use_generic_B, rows, ids_B)
    row_ids[t], row_grads[t] = _table_row_gradients(block_grads[t], ids_B, rows)
  return row_ids, row_grads


def _table_row_gradients(seq_grads: dict, ids_B: jax.Array, rows: int):
  """Sums per-sequence gradients of one table per distinct row.

  `ids_B` holds each sequence's row, or `rows` (out of range) for a sequence that did not
  use this table. U = min(B, rows + 1) is static; unused slots and the out-of-range id
  carry id `rows`, which every later scatter drops. The gradients move to the bank's
  feature shards in the dtype they arrive in (the compute dtype, in which they were
  computed: a bf16 gradient loses nothing on the way) and are summed in fp32.
  """
  B = ids_B.shape[0]
  U = min(B, rows + 1)
  row_ids, inverse = jnp.unique(ids_B, size=U, fill_value=rows, return_inverse=True)
  inverse = inverse.reshape(B)
  grads = {}
  for name, g in seq_grads.items():
    g = sharding.constrain(g, ROW_AXES).astype(jnp.float32)  # feature-sharded, like the bank
    grads[name] = jax.ops.segment_sum(g, inverse, num_segments=U, indices_are_sorted=False)
  return row_ids, grads


def memory_schedule(spec: MemorySpec) -> optax.Schedule:
  return lr_schedule(spec.lr, spec.min_lr, spec.warmup_steps, spec.schedule_steps)


@functools.lru_cache(maxsize=4)
def _log_decay_table(lr: float, min_lr: float, warmup_steps: int, total: int, wd: float):
  """([total + 1] float32 L(s) for s <= total, log(1 - lr wd) of every later step)."""
  with jax.ensure_compile_time_eval():
    lr_S = np.asarray(jax.vmap(lr_schedule(lr, min_lr, warmup_steps, total))(jnp.arange(total + 1)), np.float64)
  log_keep_S = np.log1p(-wd * lr_S)  # step j + 1 uses lr_S[j]; from `total` on, the lr is min_lr
  return np.concatenate([[0.0], np.cumsum(log_keep_S[:total])]).astype(np.float32), float(log_keep_S[total])


def _decay_args(spec: MemorySpec):
  return spec.lr, spec.min_lr, spec.warmup_steps, spec.schedule_steps, spec.weight_decay


def log_decay_table(spec: MemorySpec) -> np.ndarray:
  """[schedule steps + 1] float32 L(s) = Σ_{j<=s} log(1 - lr_j wd): the log of what the weight
  decay of steps 1..s keeps, summed once on the host in float64 (4 bytes a step). `update`
  takes it as an argument, so that a compiled step does not carry it as a constant."""
  return _log_decay_table(*_decay_args(spec))[0]


def _log_decay(spec: MemorySpec, table_S: jax.Array):
  """s -> L(s), from `log_decay_table(spec)`; past the schedule the lr is constant and L linear."""
  total = spec.schedule_steps
  tail = _log_decay_table(*_decay_args(spec))[1]
  return lambda s: jnp.where(s <= total, table_S[jnp.minimum(s, total)],
                             table_S[total] + (s - total).astype(jnp.float32) * tail)


# The drift's dependence on ε is tabulated per row at nodes of w = ln(ε/√v) this far apart
# (cubic Hermite between nodes: error < 5e-6 of the drift), from this far before the first
# step's transition to this far past the last's (where the logistic is within 1e-6 of 0 or 1).
EPS_NODE_SPACING = math.log(2) / 2
EPS_GRID_MARGIN = 14.0


def _eps_grid(spec: MemorySpec) -> tuple[float, int]:
  """(w of the first node, number of nodes): term k of the drift changes from its √v >> ε
  form to its ε-dominated one around w = -ln e_k, and ln e_k lies within
  [ln √((1-b2)/b2), -W ln(b2) / 2] for every row and missed step k <= W."""
  b2 = spec.b2
  lo = 0.5 * spec.drift_window * math.log(b2) - EPS_GRID_MARGIN
  hi = -0.5 * math.log((1 - b2) / b2) + EPS_GRID_MARGIN
  return lo, math.ceil((hi - lo) / EPS_NODE_SPACING) + 1


class Missed(NamedTuple):
  """What dense AdamW with zero gradients did to rows on the steps they missed: each weight
  ends at decay w - Φ(ln(ε/√v)) m / (√v + ε'), with the row's moments of its last update.
  Φ is a cubic per node interval (`phi`: [U, nodes - 1, 4] coefficients, None for 'lazy');
  ε' = ε e_1 is the first missed step's ε in the form below (docs/DESIGN.md)."""
  decay: jax.Array  # [U]
  eps: jax.Array | None  # [U]
  phi: jax.Array | None  # [U, nodes - 1, 4]


def _missed_steps(spec: MemorySpec, log_decay, last_U: jax.Array, step: jax.Array) -> Missed:
  """Rows last updated at `last_U` as dense AdamW moved them on steps last+1 .. step-1.

  Missed step j = s + k (s = last) moves a weight by -c_k m / (√v + ε e_k), with
  c_k = lr_j (b1/√b2)^k √(1-b2^j) / (1-b1^j) times the weight decay of the later missed
  steps, and e_k = √(1-b2^j) / b2^(k/2). With z = ε/√v:
  m / (√v + ε e_k) = m / (√v + ε e_1) (1 - (1 - e_1/e_k) σ(ln z + ln e_k)), so the sum over k is
  Φ(ln z) m / (√v + ε e_1) with Φ(w) = Σ c_k - Σ c_k (1 - e_1/e_k) σ(w + ln e_k): smooth in w,
  per row, tabulated here; each weight then evaluates it at its own √v."""
  b1, b2, eps = spec.b1, spec.b2, spec.eps
  now = log_decay(step - 1)
  decay_U = jnp.exp(now - log_decay(last_U))
  if spec.optimizer != 'exact':
    return Missed(decay_U, None, None)
  window = spec.drift_window
  k_W = np.arange(1, window + 1)
  j_UxW = last_U[:, None] + k_W  # the missed steps, up to `window` after the last update
  lr_UxW = jax.vmap(memory_schedule(spec))(j_UxW.reshape(-1) - 1).reshape(j_UxW.shape)
  j = j_UxW.astype(jnp.float32)
  log1m_b2j_UxW = jnp.log(-jnp.expm1(j * math.log(b2)))  # ln(1 - b2^j)
  bias_UxW = jnp.exp(0.5 * log1m_b2j_UxW) / (1 - b1 ** j)
  rho_W = jnp.asarray((b1 / np.sqrt(b2)) ** k_W, jnp.float32)
  terms_UxW = lr_UxW * rho_W * bias_UxW * jnp.exp(now - log_decay(j_UxW))
  c_UxW = jnp.where(j_UxW < step, terms_UxW, 0.0)
  log_e_UxW = 0.5 * log1m_b2j_UxW - 0.5 * math.log(b2) * k_W  # ln e_k
  a_UxW = -c_UxW * jnp.expm1(log_e_UxW[:, :1] - log_e_UxW)  # c_k (1 - e_1/e_k)
  lo, nodes = _eps_grid(spec)
  x_UxGxW = jnp.asarray(lo + EPS_NODE_SPACING * np.arange(nodes), jnp.float32)[:, None] + log_e_UxW[:, None, :]
  sig_UxGxW = jax.nn.sigmoid(x_UxGxW)
  phi_UxG = jnp.sum(c_UxW, axis=1)[:, None] - jnp.einsum('uw,ugw->ug', a_UxW, sig_UxGxW)
  # dΦ/dw per node spacing: the slopes of the cubic Hermite pieces.
  slope_UxG = -EPS_NODE_SPACING * jnp.einsum('uw,ugw->ug', a_UxW, sig_UxGxW * (1 - sig_UxGxW))
  p0, p1, d0, d1 = phi_UxG[:, :-1], phi_UxG[:, 1:], slope_UxG[:, :-1], slope_UxG[:, 1:]
  phi = jnp.stack([p0, d0, 3 * (p1 - p0) - 2 * d0 - d1, 2 * (p0 - p1) + d0 + d1], axis=-1)
  eps_U = eps * jnp.exp(log_e_UxW[:, 0])
  return Missed(decay_U, eps_U, phi)


def _expand(x, w):
  return x.reshape(x.shape + (1,) * (w.ndim - 1))


def _apply_missed(spec: MemorySpec, w, m, v, missed: Missed):
  """Rows `w` [U, ...] moved as dense AdamW moved them on the steps they `missed`."""
  w = _expand(missed.decay, w) * w
  if missed.phi is None:
    return w
  # Each weight's position on the Φ grid; a row never updated has m = v = 0 and no drift.
  lo, nodes = _eps_grid(spec)
  positive = v > 0
  log_z = math.log(spec.eps) - 0.5 * jnp.log(jnp.where(positive, v, 1.0))
  x = jnp.clip((log_z - lo) / EPS_NODE_SPACING, 0.0, nodes - 1)
  node = jnp.minimum(jnp.floor(x), nodes - 2)
  t = (x - node)[..., None]
  phi = missed.phi.reshape(missed.phi.shape[:2] + (1,) * (w.ndim - 2) + (4,))
  p = jnp.take_along_axis(phi, node.astype(jnp.int32)[..., None], axis=1)
  phi_w = p[..., 0] + t[..., 0] * (p[..., 1] + t[..., 0] * (p[..., 2] + t[..., 0] * p[..., 3]))
  return w - jnp.where(positive, phi_w * m / (jnp.sqrt(v) + _expand(missed.eps, w)), 0.0)


def caught_up(spec: MemorySpec, arrays: dict, mu: dict, nu: dict, last_U, step) -> dict:
  """Rows of one table as dense AdamW holds them after `step` updates: each row (weights
  {name: [U, ...]}, its moments, `last_U` its last update) moved on the steps
  last+1 .. step it missed. What export and every reader of a checkpoint's bank serve, so
  that no row is stale; works on any range of rows."""
  last_U = jnp.asarray(last_U, jnp.int32)
  log_decay = _log_decay(spec, jnp.asarray(log_decay_table(spec)))
  missed = _missed_steps(spec, log_decay, last_U, jnp.asarray(step, jnp.int32) + 1)
  return {n: _apply_missed(spec, jnp.asarray(w, jnp.float32), jnp.asarray(mu[n], jnp.float32),
                           jnp.asarray(nu[n], jnp.float32), missed) for n, w in arrays.items()}


def _adamw_rows(spec: MemorySpec, w, m, v, g, last_U, missed, step, lr):
  """Catches gathered rows up on the steps they `missed` since `last_U`, then takes this
  step's AdamW update."""
  b1, b2, eps, wd = spec.b1, spec.b2, spec.eps, spec.weight_decay
  w = _apply_missed(spec, w, m, v, missed)
  d = _expand((step - last_U).astype(jnp.float32), w)
  m = b1 ** d * m + (1 - b1) * g
  v = b2 ** d * v + (1 - b2) * jnp.square(g)
  t = step.astype(jnp.float32)
  m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
  w = w - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + wd * w)
  return w, m, v


def update(spec: MemorySpec, bank: dict, opt: dict, row_ids: dict, row_grads: dict, step: jax.Array, finite: jax.Array,
           log_decay_S: jax.Array):
  """Applies one update. `row_ids`/`row_grads` come from `row_gradients`;
  `step` is the 1-based index of this update; `log_decay_S` is `log_decay_table(spec)`. A
  step that is not `finite` writes nothing: every id becomes out of range, and the scatters
  drop them (no `where` over the whole bank). Returns (bank, opt)."""
  lr = memory_schedule(spec)(step - 1)
  log_decay = _log_decay(spec, log_decay_S)
  new_bank, new_opt = {}, {}
  for t, arrays in bank.items():
    ids_U, grads = row_ids[t], row_grads[t]
    rows = next(iter(arrays.values())).shape[0]
    if spec.optimizer == 'dense':
      # Every row takes a step; rows no sequence fetched get a zero gradient.
      grads = {n: jnp.zeros_like(a).at[ids_U].add(grads[n], mode='drop') for n, a in arrays.items()}
      ids_U = jnp.arange(rows)
    ids_U = jnp.where(finite, ids_U, rows)
    gather = lambda x: sharding.constrain(x.at[ids_U].get(mode='fill', fill_value=0), ROW_AXES)
    scatter = lambda x, rows_U: x.at[ids_U].set(rows_U, mode='drop')
    last_U = opt[t]['last_step'].at[ids_U].get(mode='fill', fill_value=0)
    missed = _missed_steps(spec, log_decay, last_U, step)
    new_bank[t], mu, nu = {}, {}, {}
    for n, a in arrays.items():
      w, m, v = _adamw_rows(spec, gather(a), gather(opt[t]['mu'][n]), gather(opt[t]['nu'][n]), grads[n],
                            last_U, missed, step, lr)
      new_bank[t][n], mu[n], nu[n] = scatter(a, w), scatter(opt[t]['mu'][n], m), scatter(opt[t]['nu'][n], v)
    new_opt[t] = {'mu': mu, 'nu': nu, 'last_step': scatter(opt[t]['last_step'], jnp.broadcast_to(step, ids_U.shape))}
  return new_bank, new_opt

