"""The anchor's optax AdamW with warmup + cosine schedule and a decay mask sparing norms.

Global-norm clipping is done by the train step, not here, because the norm spans the
anchor gradients and the per-row-summed memory gradients together.
"""

from __future__ import annotations

import jax
import optax

from hmem.schedules import schedule


def decay_mask(params):
  """Weight decay on matrices only: norms' gains (and any vector) are spared."""
  def keep(path, x):
    names = [getattr(p, 'key', '') for p in path]
    return x.ndim >= 2 and not any('norm' in str(n) for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def anchor_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = schedule(train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_steps,
                   train_cfg.schedule_steps or train_cfg.steps)
  tx = optax.adamw(sched, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                   weight_decay=train_cfg.weight_decay, mask=decay_mask)
  return tx, sched
