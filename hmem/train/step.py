"""The jitted train and eval steps.

One step: fetch each sequence's memory rows (if the memory is on), split the global batch
into `grad_accum` micro-batches, sum the loss and the gradients over them (sums, so any
split gives the same result), clip by the global norm of the anchor gradients and the
per-row-summed memory gradients together, update the anchor with optax and the bank with
its own AdamW (hmem.memory.optimizer), and apply the update only if the loss and the
gradient norm are finite; otherwise the state passes through unchanged and `finite`
reports it.

Memory gradients are taken with respect to the fetched blocks, per sequence, in the compute
dtype the blocks are fetched in (hmem.memory.bank.gather_levels); micro-batches concatenate
them, so no bank-sized buffer ever exists.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hmem import sharding
from hmem.memory import bank as memory_bank
from hmem.memory import optimizer as memory_optimizer
from hmem.model.transformer import dtype_of
from hmem.train.loss import next_token_loss
from hmem.train.optimizer import anchor_optimizer
from hmem.train.state import StateSpec, TrainState, init_state, state_spec


def _split_micro(tree, n: int):
  """[B, ...] -> [n, B/n, ...] with micro-batch j = rows j, j+n, j+2n, ...: each device's
  contiguous block of rows contributes equally to every micro-batch, so none moves."""
  return jax.tree.map(lambda a: a.reshape(a.shape[0] // n, n, *a.shape[1:]).swapaxes(0, 1), tree)


def _merge_micro(tree):
  """Inverse of `_split_micro`."""
  return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:]), tree)


def make_loss_and_grads(cfg, graphdef, unroll: bool = False):
  """(shared, frozen_params, blocks, batch) -> (shared_grads, block_grads, nll_sum, count).

  `shared` holds what every sequence uses (anchor params unless frozen, the generic
  block): its gradients are summed. `blocks` are per-sequence fetched rows: their
  gradients stay per sequence. `unroll` unrolls the loop over micro-batches.
  """
  z_loss, accum = cfg.train.z_loss, cfg.train.grad_accum
  dtype = dtype_of(cfg.model.dtype)

  def objective(shared, frozen_params, blocks, micro):
    params = shared['params'] if 'params' in shared else frozen_params
    memory = None
    if blocks:
      memory = memory_bank.assemble(blocks, shared.get('generic'), micro.get('use_generic'), dtype)
    logits = nnx.merge(graphdef, params)(micro['tokens'], micro['segment_ids'], memory)
    obj, nll, count = next_token_loss(logits, micro['tokens'], micro['segment_ids'], z_loss)
    return obj, (nll, count)

  grad_fn = jax.grad(objective, argnums=(0, 2), has_aux=True)

  def loss_and_grads(shared, frozen_params, blocks, batch):
    if accum == 1:
      (shared_grads, block_grads), (nll, count) = grad_fn(shared, frozen_params, blocks, batch)
      return shared_grads, block_grads, nll, count

    def body(carry, xs):
      grads_acc, nll_acc, count_acc = carry
      micro, micro_blocks = xs
      (grads, block_grads), (nll, count) = grad_fn(shared, frozen_params, micro_blocks, micro)
      return (jax.tree.map(jnp.add, grads_acc, grads), nll_acc + nll, count_acc + count), block_grads

    zeros = jax.tree.map(jnp.zeros_like, shared)
    (shared_grads, nll, count), block_grads = jax.lax.scan(
        body, (zeros, 0.0, 0.0), (_split_micro(batch, accum), _split_micro(blocks, accum)), unroll=unroll)
    return shared_grads, _merge_micro(block_grads), nll, count

  return loss_and_grads


def make_train_step(cfg, spec: StateSpec, tx: optax.GradientTransformation, schedule, mesh, unroll: bool = False):
  """The jitted train step; `unroll` unrolls its loop over micro-batches (for XLA's cost
  analysis, which counts a loop's body once: `hmem plan --target`)."""
  loss_and_grads = make_loss_and_grads(cfg, spec.graphdef, unroll)
  clip, frozen, memory = cfg.train.clip_norm, cfg.train.freeze_anchor, spec.memory
  dtype = dtype_of(cfg.model.dtype)

  def train_step(state: TrainState, batch, tables):
    # Made in the program, not when the step is built: building it runs nothing on a
    # device, so it also builds for compile-only devices (hmem plan --target).
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), state.step)
    batch = dict(batch)
    leaf_B = batch.pop('leaf_id')
    blocks = memory_bank.gather_levels(memory, state.bank, leaf_B, dtype) if state.bank else {}
    use_generic_B = memory_bank.generic_mask(memory, key, leaf_B.shape[0]) if 'generic' in state.bank else None
    if use_generic_B is not None:
      batch['use_generic'] = use_generic_B
    shared = {} if frozen else {'params': state.params}
    if use_generic_B is not None:
      shared['generic'] = state.bank['generic']

    shared_grads, block_grads, nll, count = loss_and_grads(shared, state.params, blocks, batch)
    count = jnp.maximum(count, 1.0)
    normalise = lambda tree: jax.tree.map(lambda g: g / count, tree)
    anchor_grads = normalise(shared_grads.get('params', {}))
    # Normalised after the per-row sums: the per-sequence gradients stay in the compute dtype
    # until they are summed in fp32 on the bank's shards.
    row_ids, row_grads = (memory_optimizer.row_gradients(memory, block_grads, shared_grads.get('generic'), leaf_B,
                                                         use_generic_B) if state.bank else ({}, {}))
    row_grads = normalise(row_grads)
    loss = nll / count
    grad_norm = optax.tree.norm((anchor_grads, row_grads))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    scale = jnp.minimum(1.0, clip / (grad_norm + 1e-6)) if clip > 0 else 1.0
    scaled = lambda tree: jax.tree.map(lambda g: g * scale, tree)

    new = state.replace(step=state.step + 1)
    if not frozen:
      updates, opt_state = tx.update(scaled(anchor_grads), state.opt_state, state.params)
      updated = (optax.apply_updates(state.params, updates), opt_state)
      # Skip a non-finite update: keep the old anchor (the step still counts).
      params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), updated,
                                       (state.params, state.opt_state))
      new = new.replace(params=params, opt_state=opt_state)
    if state.bank:
      bank, bank_opt = memory_optimizer.update(memory, state.bank, state.bank_opt, row_ids, scaled(row_grads),
                                               state.step + 1, finite, tables['log_decay'])
      new = new.replace(bank=bank, bank_opt=bank_opt)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step), 'tokens': count,
               'finite': finite}
    if state.bank:
      metrics['memory_lr'] = memory_optimizer.memory_schedule(memory)(state.step)
    if use_generic_B is not None:
      metrics['generic_fraction'] = jnp.mean(use_generic_B.astype(jnp.float32))
    return new, metrics

  jitted = jax.jit(train_step, in_shardings=(spec.shardings, sharding.data_shardings(mesh), sharding.replicated(mesh)),
                   out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)
  with sharding.on_host():
    tables = {'log_decay': memory_optimizer.log_decay_table(memory)} if memory.tables else {}
  return TrainStep(jitted, tables, sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The jitted step `(state, batch) -> (state, metrics)`. Tables as long as the schedule
  (the bank's log weight decay per step) are arguments of the program, not constants
  compiled into it: 4 bytes a step would put megabytes into the program of a 2^19-step run.
  They are kept on the host and placed on the devices at the first call, so that lowering
  needs only their shapes (compile-only devices take no data)."""
  fn: Callable
  host_tables: Any
  tables_sharding: Any

  @functools.cached_property
  def tables(self):
    return jax.device_put(self.host_tables, self.tables_sharding)

  def __call__(self, state, batch):
    return self.fn(state, batch, self.tables)

  def lower(self, state, batch):
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.tables_sharding),
                            self.host_tables)
    return self.fn.lower(state, batch, abstract)

  def compile(self, state, batch) -> TrainStep:
    """The same step, compiled ahead of time for these shapes."""
    return dataclasses.replace(self, fn=self.lower(state, batch).compile())


def fresh_train_step(cfg, mesh, init: bool = True, unroll: bool = False):
  """(spec, freshly initialised state or None, jitted train step) for `cfg` on `mesh`; call
  under `sharding.use_mesh`. For benchmarks, tests and plans; `hmem train` also restores."""
  tx, schedule = anchor_optimizer(cfg.train)
  spec = state_spec(cfg, tx, mesh)
  state = init_state(cfg, tx, spec) if init else None
  return spec, state, make_train_step(cfg, spec, tx, schedule, mesh, unroll)


def compiled_train_step_text(cfg) -> str:
  """The HLO text of `cfg`'s train step compiled for all local devices: compiles only (no
  state, no data), e.g. to read its collectives."""
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    spec, _, step = fresh_train_step(cfg, mesh, init=False)
    batch = sharding.abstract_batch(mesh, cfg.train.batch_size, cfg.data.seq_len)
    return step.lower(spec.abstract, batch).compile().as_text()


def make_eval_step(cfg, spec: StateSpec, mesh):
  """(params, bank, batch) -> {mode: (nll_sum, count)} on held-out data, for each
  memory mode: `fetched` rows, the `generic` block, and the `anchor` alone."""
  graphdef = spec.graphdef
  dtype = dtype_of(cfg.model.dtype)

  def eval_step(params, bank, batch):
    model = nnx.merge(graphdef, params)

    def nll(memory):
      logits = model(batch['tokens'], batch['segment_ids'], memory)
      _, nll_sum, count = next_token_loss(logits, batch['tokens'], batch['segment_ids'])
      return nll_sum, count

    out = {'anchor': nll(None)}
    if bank:
      blocks = memory_bank.gather_levels(spec.memory, bank, batch['leaf_id'], dtype)
      out['fetched'] = nll(memory_bank.assemble(blocks, None, None, dtype))
      if 'generic' in bank:
        everyone = jnp.ones(batch['leaf_id'].shape, bool)
        out['generic'] = nll(memory_bank.assemble(blocks, bank['generic'], everyone, dtype))
    return out

  return jax.jit(eval_step, in_shardings=(spec.shardings.params, spec.shardings.bank, sharding.data_shardings(mesh)),
                 out_shardings=sharding.replicated(mesh))
