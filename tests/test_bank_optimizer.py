"""The `exact` bank AdamW against optax.adamw applied densely, at every gradient size.

Per-row gradients are divided by the tokens of the global batch, so a deep-level row
fetched by one sequence of a paper-sized batch sees gradients near 1e-6: close enough to
AdamW's ε that the catch-up must track ε element by element. The reference runs every step
of the schedule (in one `lax.scan`, zero gradients for rows not fetched); the row-sparse
optimizer is called only on the steps that fetch something, so a 2^19-step schedule costs
a few hundred updates.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hmem.memory import optimizer as mopt
from hmem.memory.spec import memory_spec

ROWS = 8
# Short: the schedule of test_memory's optimizer tests. Long: the A2 regime's memory
# optimizer (hmem/paper.py): 2^19 steps, 10k warmup, cosine 1e-4 -> 1e-5, weight decay 1e-3.
SCHEDULES = {
    'short': ('train.steps=300', 'train.warmup_steps=20', 'memory.lr=1e-2', 'memory.min_lr=1e-3',
              'memory.weight_decay=0.1'),
    'a2': ('train.steps=524288', 'train.warmup_steps=10000', 'memory.lr=1e-4', 'memory.min_lr=1e-5',
           'memory.weight_decay=1e-3'),
}
SCALES = (1.0, 1e-3, 1e-6, 1e-8)


def _fetches(schedule: str, steps: int):
  """(1-based steps that fetch rows [E], touched [E, ROWS]). Rows are fetched at rates from
  every other step down to almost never; rows 4.. are last fetched hundreds of steps before
  the end, and the last step fetches rows 0..3 only."""
  rng = np.random.default_rng(0)
  rate_R = np.array([0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0])
  if schedule == 'short':
    steps_E = np.arange(1, steps + 1)
  else:
    # 40 bursts of 8 consecutive steps across the schedule (warmup included): within a burst
    # rows miss a few steps, between bursts ~13k (far past the drift window).
    starts = np.linspace(1, steps - 600, 40).astype(int)
    steps_E = np.concatenate([(starts[:, None] + np.arange(8)).ravel(), [steps - 3, steps - 2, steps - 1, steps]])
    rate_R = np.array([0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
  touched_ExR = rng.random((len(steps_E), ROWS)) < rate_R
  touched_ExR[:5, 6] = True  # row 6: fetched early, then (almost) never
  touched_ExR[len(steps_E) // 3, 7] = True  # row 7: once
  touched_ExR[steps_E > steps - 300, 4:] = False
  touched_ExR[-1] = np.arange(ROWS) < 4
  return steps_E, touched_ExR


def _grads(touched_ExR, seed=1):
  g = np.asarray(jax.random.normal(jax.random.key(seed), touched_ExR.shape + (1, 2, 3)))
  return np.where(touched_ExR[:, :, None, None, None], g, 0).astype(np.float32)


@functools.cache
def _dense(schedule: str, b2: float):
  """optax.adamw over every step of `schedule`, in float64 (fp32 AdamW itself drops a weight
  decay below half an ulp: lr wd = 1e-8 at A2's end), for every scale in SCALES at once:
  (start bank [R, ...], final banks [scales, R, ...], mu, nu)."""
  cfg = _config(schedule, b2)
  t = cfg.train
  steps_E, touched_ExR = _fetches(schedule, t.steps)
  event_S = np.full(t.steps + 1, len(steps_E), np.int32)  # fetch index of each step, or E (none)
  event_S[steps_E] = np.arange(len(steps_E))
  g_ExR = _grads(touched_ExR)
  g_ExR = np.concatenate([g_ExR, np.zeros_like(g_ExR[:1])]).astype(np.float64)
  start = _start()
  with jax.enable_x64(True):
    tx = optax.adamw(mopt.memory_schedule(memory_spec(cfg)), b1=t.b1, b2=t.b2, eps=t.eps,
                     weight_decay=cfg.memory.weight_decay)

    def run(scale):
      def body(carry, event):
        w, opt = carry
        updates, opt = tx.update(jnp.asarray(g_ExR)[event] * scale, opt, w)
        return (optax.apply_updates(w, updates), opt), None
      w0 = jnp.asarray(start, jnp.float64)
      (w, opt), _ = jax.lax.scan(body, (w0, tx.init(w0)), jnp.asarray(event_S[1:]))
      return w, opt[0].mu, opt[0].nu

    return tuple(np.asarray(x) for x in jax.jit(jax.vmap(run))(jnp.asarray(SCALES, jnp.float64)))


def _start():
  return np.asarray(jax.random.normal(jax.random.key(0), (ROWS, 1, 2, 3)))


def _sparse(cfg, schedule):
  """`update` on the fetching steps only, for every scale in SCALES at once; then every row
  `caught_up` to the last step: (bank [scales, R, ...], last_step [R], mu, nu)."""
  steps_E, touched_ExR = _fetches(schedule, cfg.train.steps)
  scale_N = np.asarray(SCALES, np.float32)[:, None, None, None, None]
  g_ExNxR = _grads(touched_ExR)[:, None] * scale_N
  spec = memory_spec(cfg)
  update = jax.jit(jax.vmap(
      lambda b, o, ids, g, s, table: mopt.update(spec, b, o, {'level1': ids}, {'level1': {'w': g}}, s, True, table),
      in_axes=(0, 0, None, 0, None, None)))
  table = jnp.asarray(mopt.log_decay_table(spec))
  bank = {'level1': {'w': jnp.asarray(np.broadcast_to(_start(), (len(SCALES),) + _start().shape))}}
  opt = jax.vmap(mopt.init)(bank)
  for step, touched, g in zip(steps_E, touched_ExR, g_ExNxR):
    bank, opt = update(bank, opt, jnp.where(touched, jnp.arange(ROWS), ROWS), jnp.asarray(g), jnp.int32(step),
                         table)
  o = opt['level1']
  last_R = np.asarray(o['last_step'][0])
  catch_up = lambda w, m, v: mopt.caught_up(spec, {'w': w}, {'w': m}, {'w': v}, last_R, cfg.train.steps)['w']
  ours = jax.jit(jax.vmap(catch_up))(bank['level1']['w'], o['mu']['w'], o['nu']['w'])
  return np.asarray(ours), last_R, np.asarray(o['mu']['w']), np.asarray(o['nu']['w'])


def _config(schedule, b2):
  from conftest import tiny_config
  return tiny_config(*SCHEDULES[schedule], 'memory.levels=(8,4)', f'train.b2={b2}', 'memory.optimizer=exact')


@pytest.mark.parametrize('b2', [0.95, 0.999])
@pytest.mark.parametrize('schedule', list(SCHEDULES))
def test_exact_bank_adamw_is_dense_optax_adamw_at_every_gradient_scale(schedule, b2):
  """Rows fetched on some steps only, gradients scaled by 1 down to 1e-8 (= ε); `update` on
  the fetching steps, then `caught_up` to the last step (rows 4.. were last fetched hundreds
  of steps before it, one row only once, one early). At every scale the bank ends within
  1e-4 of dense optax.adamw (relative to the largest distance optax moved an entry), and the
  moments, decayed over the steps each row missed, equal optax's (to 1e-5)."""
  cfg = _config(schedule, b2)
  t = cfg.train
  start, w_dense, mu_dense, nu_dense = _start(), *_dense(schedule, b2)
  ours, last_R, mu, nu = _sparse(cfg, schedule)
  assert (t.steps - last_R[4:] >= 300).all() and (last_R[:4] == t.steps).all()
  errors = {s: float(np.max(np.abs(ours[i] - w_dense[i])) / np.max(np.abs(w_dense[i] - start)))
            for i, s in enumerate(SCALES)}
  print(f'{schedule} b2={b2}: relative error vs optax.adamw by gradient scale {errors}')
  assert max(errors.values()) <= 1e-4, errors
  missed_R = (t.steps - last_R)[:, None, None, None]
  for ours_m, dense_m in ((mu * t.b1 ** missed_R, mu_dense), (nu * t.b2 ** missed_R, nu_dense)):
    for i in range(len(SCALES)):  # fp32 against float64: to 1e-5 of the largest entry
      np.testing.assert_allclose(ours_m[i], dense_m[i], rtol=0, atol=1e-5 * np.max(np.abs(dense_m[i])))
