"""The jitted train and eval steps.

One step: split the global batch into `grad_accum` micro-batches, sum the loss and the
gradients over them (sums, so any split gives the same result), clip by the global norm,
and apply the update only if the loss and the gradient norm are finite; otherwise the
state passes through unchanged and `finite` reports it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hmem import sharding
from hmem.train.loss import next_token_loss
from hmem.train.state import StateSpec, TrainState


def _split_micro(tree, n: int):
  return jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), tree)


def make_loss_and_grads(cfg, graphdef):
  """(params, batch) -> (grads, nll_sum, count), gradients of the summed objective."""
  z_loss, accum = cfg.train.z_loss, cfg.train.grad_accum

  def objective(params, micro):
    model = nnx.merge(graphdef, params)
    logits = model(micro['tokens'], micro['segment_ids'])
    obj, nll, count = next_token_loss(logits, micro['tokens'], micro['segment_ids'], z_loss)
    return obj, (nll, count)

  grad_fn = jax.grad(objective, has_aux=True)

  def loss_and_grads(params, batch):
    if accum == 1:
      grads, (nll, count) = grad_fn(params, batch)
      return grads, nll, count

    def body(carry, micro):
      grads_acc, nll_acc, count_acc = carry
      grads, (nll, count) = grad_fn(params, micro)
      return (jax.tree.map(jnp.add, grads_acc, grads), nll_acc + nll, count_acc + count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, nll, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), _split_micro(batch, accum))
    return grads, nll, count

  return loss_and_grads


def make_train_step(cfg, spec: StateSpec, tx: optax.GradientTransformation, schedule, mesh):
  loss_and_grads = make_loss_and_grads(cfg, spec.graphdef)
  clip = cfg.train.clip_norm

  def train_step(state: TrainState, batch):
    grads, nll, count = loss_and_grads(state.params, batch)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = nll / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    scale = jnp.minimum(1.0, clip / (grad_norm + 1e-6)) if clip > 0 else 1.0
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    updated = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    # Skip a non-finite update: keep every leaf of the old state (the step still counts).
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                             state.replace(step=state.step + 1))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'tokens': count, 'finite': finite}
    return new_state, metrics

  return jax.jit(train_step, in_shardings=(spec.shardings, sharding.data_shardings(mesh)),
                 out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(cfg, spec: StateSpec, mesh):
  """(params, batch) -> (nll_sum, count) on held-out data."""
  graphdef = spec.graphdef

  def eval_step(params, batch):
    logits = nnx.merge(graphdef, params)(batch['tokens'], batch['segment_ids'])
    _, nll, count = next_token_loss(logits, batch['tokens'], batch['segment_ids'])
    return nll, count

  return jax.jit(eval_step, in_shardings=(spec.shardings.params, sharding.data_shardings(mesh)),
                 out_shardings=sharding.replicated(mesh))
