"""The hierarchical memory: sizes, no-op init, fetch, row-sparse AdamW, regimes, sharding."""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, saved_items
from flax import nnx

from hmem import sharding
from hmem.memory import bank as mb
from hmem.memory import optimizer as mopt
from hmem.memory.spec import memory_spec
from hmem.model import build_model
from hmem.train.optimizer import anchor_optimizer
from hmem.train.state import state_spec
from hmem.train.step import fresh_train_step, make_loss_and_grads
from hmem.train.trainer import train

MEMORY = ('memory.levels=(8,4)', 'memory.lr=1e-2', 'memory.min_lr=1e-3')


@pytest.mark.parametrize('overrides', [
    ('memory.type=ffn',), ('memory.type=lora', 'memory.lora_targets=ffn'),
    ('memory.type=lora', 'memory.lora_targets=qk'), ('memory.type=lora', 'memory.lora_targets=vo'),
    ('memory.type=kv',), ('memory.type=ffn', 'memory.layers=(1,2)'),
])
def test_fresh_memory_is_an_exact_no_op(make_config, overrides):
  cfg = make_config(*MEMORY, *overrides)
  model = build_model(cfg, memory_layers=memory_spec(cfg).layers)
  bank = mb.init_bank(memory_spec(cfg), jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 1, cfg.model.vocab_size)
  segments = jnp.concatenate([jnp.ones((4, 20), jnp.int32), 2 * jnp.ones((4, 12), jnp.int32)], axis=1)
  leaf = jnp.array([0, 5, 5, 15])
  blocks = mb.gather_levels(memory_spec(cfg), bank, leaf)
  memory = mb.assemble(blocks, bank['generic'], jnp.array([False, True, False, False]), jnp.float32)
  dense = model(tokens, segments)
  np.testing.assert_array_equal(model(tokens, segments, memory), dense)
  # A memory that is not zero changes the output (so the no-op above is not vacuous).
  nonzero = {n: a + 0.1 for n, a in memory.items()}
  assert not np.allclose(model(tokens, segments, nonzero), dense)


def test_fetch_concatenates_the_path_rows(make_config):
  cfg = make_config(*MEMORY)
  bank = mb.init_bank(memory_spec(cfg), jax.random.key(0))
  bank = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape), bank)
  leaf = jnp.array([13, 2])
  memory = mb.assemble(mb.gather_levels(memory_spec(cfg), bank, leaf), None, None, jnp.float32)
  for b, l in enumerate([13, 2]):
    expected = jnp.concatenate([bank['level1']['ffn_up'][l // 4], bank['level2']['ffn_up'][l]], axis=1)
    np.testing.assert_array_equal(memory['ffn_up'][b], expected)
  assert memory['ffn_up'].shape == (2, cfg.model.layers, 12, cfg.model.d_model)


@contextlib.contextmanager
def _stepper(cfg):
  """(fresh state, jitted step) under the config's mesh on all 8 devices."""
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    _, state, step = fresh_train_step(cfg, mesh)
    yield state, step


def _batch(cfg, leaves, seed=0):
  B, T = len(leaves), cfg.data.seq_len
  tokens = np.asarray(jax.random.randint(jax.random.key(seed), (B, T), 1, cfg.model.vocab_size), np.int32)
  segments = np.ones((B, T), np.int32)
  segments[:, T // 2:] = 2
  return {'tokens': tokens, 'segment_ids': segments, 'leaf_id': np.asarray(leaves, np.int32)}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_sparse_row_gradients_equal_grad_through_a_dense_gather(make_config, dtype):
  """Per-row sums of per-sequence block gradients (with repeated nodes) equal jax.grad
  of the loss with respect to the whole bank through a plain gather. In bf16 the blocks
  and their gradients move in bf16, the bank stays fp32 and the sums are fp32: the same
  row gradients as an fp32 gather cast to bf16 for the model, to fp32 summation order."""
  cfg = make_config(*MEMORY, 'memory.generic_prob=0.0', f'model.dtype={dtype}')
  bank = mb.init_bank(memory_spec(cfg), jax.random.key(0))
  bank = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(a.ndim), a.shape), bank)
  graphdef, params = nnx.split(build_model(cfg))
  params = nnx.to_pure_dict(params)
  batch = _batch(cfg, [3, 3, 7, 12, 3, 7, 0, 15])
  leaf = jnp.asarray(batch.pop('leaf_id'))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  loss_and_grads = make_loss_and_grads(cfg, graphdef)
  blocks = mb.gather_levels(memory_spec(cfg), bank, leaf, jnp.dtype(dtype))
  _, block_grads, _, _ = loss_and_grads({}, params, blocks, batch)
  assert {g.dtype for g in jax.tree.leaves(block_grads)} == {jnp.dtype(dtype)}

  def dense_loss(bank):
    blocks = {t: {n: a[memory_spec(cfg).level_ids(leaf, t)] for n, a in arrays.items()} for t, arrays in bank.items()}
    memory = mb.assemble(blocks, None, None, jnp.dtype(dtype))
    from hmem.train.loss import next_token_loss
    logits = nnx.merge(graphdef, params)(batch['tokens'], batch['segment_ids'], memory)
    return next_token_loss(logits, batch['tokens'], batch['segment_ids'])[0]

  dense = jax.grad(dense_loss)(bank)
  all_ids, all_row_grads = mopt.row_gradients(memory_spec(cfg), block_grads, None, leaf, None)
  for t, (rows, _) in memory_spec(cfg).tables.items():
    ids, row_grads = np.asarray(all_ids[t]), all_row_grads[t]
    valid = ids < rows
    assert sorted(ids[valid]) == sorted(set(np.asarray(memory_spec(cfg).level_ids(leaf, t)).tolist()))
    for n in row_grads:
      assert row_grads[n].dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(row_grads[n])[valid], np.asarray(dense[t][n])[ids[valid]],
                                 rtol=2e-5, atol=1e-9)
      untouched = np.setdiff1d(np.arange(rows), ids[valid])
      assert not np.any(np.asarray(dense[t][n])[untouched])


def test_untouched_rows_and_their_state_are_bitwise_unchanged(make_config):
  cfg = make_config(*MEMORY, 'memory.generic_prob=0.0')
  with _stepper(cfg) as (state, step):
    before = jax.tree.map(np.asarray, (state.bank, state.bank_opt))
    state, _ = step(state, _batch(cfg, [0, 1, 1, 0, 0, 1, 1, 0]))
    bank, opt = jax.tree.map(np.asarray, (state.bank, state.bank_opt))
  touched = {'level1': [0], 'level2': [0, 1]}
  for t, rows in touched.items():
    rest = np.setdiff1d(np.arange(before[0][t]['ffn_up'].shape[0]), rows)
    for n in bank[t]:
      np.testing.assert_array_equal(bank[t][n][rest], before[0][t][n][rest])
      for moment in ('mu', 'nu'):
        np.testing.assert_array_equal(opt[t][moment][n][rest], before[1][t][moment][n][rest])
    np.testing.assert_array_equal(opt[t]['last_step'], np.isin(np.arange(len(opt[t]['last_step'])), rows))
    # The touched rows did take a step (gate/up get zero gradients while down is still zero;
    # the warmup's first lr is 0, so the moments show it, not the weights).
    assert all(np.any(opt[t]['mu']['ffn_down'][r]) for r in rows)


@pytest.mark.parametrize('optimizer', ['exact', 'dense'])
def test_a_non_finite_step_leaves_bank_and_state_bitwise_unchanged(make_config, optimizer):
  """A NaN in the anchor makes the loss non-finite: no bank row, moment or `last_step` moves,
  whichever bank optimizer (the dense one used to update every row regardless). Every
  variant is also checked at every step of `_bank_vs_optax`."""
  cfg = make_config(*MEMORY, 'memory.generic_prob=0.5', 'train.warmup_steps=0', f'memory.optimizer={optimizer}')
  with _stepper(cfg) as (state, step):
    state, metrics = step(state, _batch(cfg, [0, 1, 2, 3, 4, 5, 6, 7]))
    assert bool(metrics['finite'])
    before = jax.tree.map(np.asarray, (state.bank, state.bank_opt))
    poisoned = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), state.params)
    state, metrics = step(state.replace(params=poisoned), _batch(cfg, [0, 1, 2, 3, 8, 9, 10, 11], seed=1))
    assert not bool(metrics['finite'])
    after = jax.tree.map(np.asarray, (state.bank, state.bank_opt))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)


def _bank_vs_optax(cfg, touched_SxR, seed=0):
  """Runs the bank optimizer `update` and optax.adamw (applied densely: zero gradients for
  rows not touched) side by side on a one-table bank, with random gradients for the touched
  rows of each step. Checks on the way that a non-finite step changes nothing and that the
  rows a step does not touch keep their parameters, moments and `last_step` (row-sparse
  variants), bitwise. Returns the final (bank, moments) of both and the initial bank."""
  import optax
  steps, rows = touched_SxR.shape
  keys = jax.random.split(jax.random.key(seed), 2)
  bank = {'level1': {'w': jax.random.normal(keys[0], (rows, 1, 2, 3))}}
  grads_SxR = np.asarray(jax.random.normal(keys[1], (steps, rows, 1, 2, 3)))
  t = cfg.train
  spec = memory_spec(cfg)
  tx = optax.adamw(mopt.memory_schedule(spec), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=cfg.memory.weight_decay)
  table = jnp.asarray(mopt.log_decay_table(spec))
  update = jax.jit(lambda b, o, ids, g, s, finite: mopt.update(spec, b, o, {'level1': ids}, {'level1': {'w': g}}, s,
                                                               finite, table))
  dense_step = jax.jit(lambda p, o, g: (lambda u, o: (optax.apply_updates(p, u), o))(*tx.update(g, o, p)))
  ours, opt, theirs, their_opt = bank, mopt.init(bank), bank, tx.init(bank)
  for s in range(steps):
    touched = touched_SxR[s]
    g = np.where(touched[:, None, None, None], grads_SxR[s], 0).astype(np.float32)
    before = jax.tree.map(np.asarray, (ours, opt))
    ids = jnp.where(touched, jnp.arange(rows), rows)
    skipped = update(ours, opt, ids, jnp.asarray(g), jnp.int32(s + 1), False)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(skipped)):
      np.testing.assert_array_equal(x, y)
    ours, opt = update(ours, opt, ids, jnp.asarray(g), jnp.int32(s + 1), True)
    theirs, their_opt = dense_step(theirs, their_opt, {'level1': {'w': jnp.asarray(g)}})
    if cfg.memory.optimizer != 'dense':
      after = jax.tree.map(np.asarray, (ours, opt))
      for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x[~touched], y[~touched])
  adam = their_opt[0]
  return (ours, opt['level1']['mu'], opt['level1']['nu']), (theirs, adam.mu['level1'], adam.nu['level1']), bank


ADAMW = ('train.warmup_steps=20', 'train.steps=300', 'memory.lr=1e-2', 'memory.min_lr=1e-3',
         'memory.weight_decay=0.1')


def _relative_error(ours, theirs, start):
  """max |ours - theirs| over the largest distance optax moved an entry of the bank."""
  o, t, s = (np.asarray(x['level1']['w']) for x in (ours, theirs, start))
  return float(np.max(np.abs(o - t)) / np.max(np.abs(t - s)))


def test_exact_row_sparse_adamw_reproduces_dense_optax_adamw(make_config):
  """300 steps of warmup + cosine; rows fetched at different rates (half the steps down to
  never), one row idle for ~290 steps (beyond the drift window), the last step touching every
  row so that the moments compare too. `exact` ends within 1e-4 of optax.adamw; `lazy` does
  not come close (its rows stand still between fetches)."""
  rate_R = np.array([0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0])
  touched_SxR = np.random.default_rng(0).random((300, 8)) < rate_R
  touched_SxR[:5, 6] = True  # row 6: fetched early, then (almost) never until the end
  touched_SxR[-1] = True
  errors = {}
  for optimizer in ('exact', 'lazy'):
    cfg = make_config(*ADAMW, f'memory.optimizer={optimizer}')
    ours, theirs, start = _bank_vs_optax(cfg, touched_SxR)
    errors[optimizer] = _relative_error(ours[0], theirs[0], start)
    if optimizer == 'exact':
      for a, b in zip(ours[1:], theirs[1:]):
        np.testing.assert_allclose(a['w'], b['w'], rtol=1e-5, atol=1e-9)
  print('relative error vs optax.adamw:', errors)
  assert errors['exact'] <= 1e-4 and errors['lazy'] > 0.05, errors


def test_every_variant_is_optax_adamw_when_every_row_is_touched(make_config):
  """12 steps of warmup + cosine with every row touched at every step: `exact`, `lazy` and
  `dense` are the same update (to rounding: XLA fuses the three programs differently), and
  that update is optax.adamw."""
  finals = {}
  for optimizer in ('exact', 'lazy', 'dense'):
    cfg = make_config('train.warmup_steps=3', 'train.steps=12', 'memory.lr=1e-2', 'memory.min_lr=1e-3',
                      'memory.weight_decay=0.1', f'memory.optimizer={optimizer}')
    finals[optimizer], theirs, _ = _bank_vs_optax(cfg, np.ones((12, 8), bool))
    for a, b in zip(jax.tree.leaves(finals[optimizer]), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)
  for other in ('lazy', 'dense'):
    for a, b in zip(jax.tree.leaves(finals['exact']), jax.tree.leaves(finals[other])):
      np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-9)


def test_bank_optimizer_options_are_checked(make_config):
  from hmem.errors import ConfigError
  from hmem.memory.spec import memory_spec
  with pytest.raises(ConfigError, match="'exact'.*'lazy'"):
    memory_spec(make_config(*MEMORY, 'memory.optimizer=sparse'))
  with pytest.raises(ConfigError, match='train.b1 / sqrt'):
    memory_spec(make_config(*MEMORY, 'train.b1=0.99', 'train.b2=0.95'))
  memory_spec(make_config(*MEMORY, 'train.b1=0.99', 'train.b2=0.95', 'memory.optimizer=lazy'))


def test_generic_switch_rate_and_seeding(make_config):
  cfg = make_config(*MEMORY)
  spec = memory_spec(cfg)
  draws = jnp.stack([mb.generic_mask(spec, jax.random.fold_in(jax.random.key(0), s), 64) for s in range(200)])
  p = 1 / (cfg.memory.k + 1)
  sd = np.sqrt(p * (1 - p) / draws.size)
  assert abs(float(draws.mean()) - p) < 5 * sd
  same_key = [mb.generic_mask(spec, jax.random.key(3), 64) for _ in range(2)]
  np.testing.assert_array_equal(*same_key)
  assert mb.generic_mask(memory_spec(make_config(*MEMORY, 'memory.generic_prob=0.0')), jax.random.key(0), 8) is None


def test_rows_fetched_only_by_generic_sequences_stay_untouched(make_config):
  cfg = make_config(*MEMORY, 'memory.generic_prob=0.5')
  with _stepper(cfg) as (state, step):
    batch = _batch(cfg, [0, 1, 2, 3, 4, 5, 6, 7])
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)
    use_generic = np.asarray(mb.generic_mask(memory_spec(cfg), key, 8))
    assert use_generic.any() and not use_generic.all()
    state, _ = step(state, batch)
    last = np.asarray(state.bank_opt['level2']['last_step'])
  np.testing.assert_array_equal(last[:8] == 1, ~use_generic)
  assert int(np.asarray(state.bank_opt['generic']['last_step'])[0]) == 1


@pytest.mark.parametrize('kind', ['ffn', 'lora', 'kv'])
def test_each_memory_type_learns_what_only_the_cluster_predicts(make_config, tmp_path, kind):
  """Post-hoc regime: the anchor is frozen, so only the memory can lower the held-out loss
  on synthetic data whose token transitions depend on the sequence's leaf."""
  cfg = make_config('memory.levels=(16,16)', f'memory.type={kind}', 'memory.lr=3e-2', 'memory.min_lr=3e-3',
                    'memory.generic_prob=0.0', 'train.freeze_anchor=true', 'train.steps=20', 'train.eval_every=20',
                    'train.checkpoint_every=0')
  summary = train(cfg, str(tmp_path), progress=False)
  row = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')][-1]
  assert summary['eval_loss'] < row['eval_loss_anchor'] - 0.03


def test_freeze_anchor_and_init_from(make_config, tmp_path):
  """Pretrain a dense anchor, then train memory only from it: the anchor never moves."""
  train(make_config('train.steps=5', 'train.checkpoint_every=0', 'train.eval_every=0'), str(tmp_path / 'dense'),
        progress=False)
  cfg = make_config(*MEMORY, 'train.steps=3', 'train.checkpoint_every=0', 'train.eval_every=0',
                    'train.freeze_anchor=true', f'train.init_from={tmp_path / "dense"}')
  train(cfg, str(tmp_path / 'memory'), progress=False)
  from test_train import _params
  dense, memory = _params(tmp_path / 'dense'), _params(tmp_path / 'memory')
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(memory)):
    np.testing.assert_array_equal(a, b)


MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (2, 1, 1, 4), (2, 2, 1, 2)]


def _mesh_run(make_config, workdir, mesh, devices=None):
  """(metrics rows, final anchor parameters and bank) of 3 memory steps on `mesh`."""
  d, f, t, m = mesh
  cfg = make_config(*MEMORY, 'train.steps=3', 'train.log_every=1', 'train.eval_every=0', 'train.checkpoint_every=0',
                    f'mesh.data={d}', f'mesh.fsdp={f}', f'mesh.tensor={t}', f'mesh.memory={m}')
  train(cfg, str(workdir), progress=False, devices=devices)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return rows, saved_items(workdir, 3, ('params', 'bank'))


@pytest.fixture(scope='module')
def memory_single_device_run(make_config, tmp_path_factory):
  return _mesh_run(make_config, tmp_path_factory.mktemp('memory_one'), (1, 1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize('mesh', MESHES, ids=lambda m: 'x'.join(map(str, m)))
def test_feature_and_row_sharded_bank_match_a_single_device(make_config, tmp_path, memory_single_device_run, mesh):
  """Only the fp32 summation order differs. Measured: losses and gradient norms within
  3e-7 relative, anchor parameters within 1e-6 absolute after 3 steps; in the bank a few
  elements (1-4 of 4096 per array) move up to 1.3e-5, where AdamW divides a near-zero
  row gradient by its own scale. Allowed: rtol 1e-5; anchor rtol 1e-4 + atol 2e-6; bank
  atol 5e-5 (a wrong or missed row update moves elements by ~memory.lr = 1e-2)."""
  rows, saved = _mesh_run(make_config, tmp_path, mesh)
  single_rows, single_saved = memory_single_device_run
  assert [r['step'] for r in rows] == [1, 2, 3]
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in single_rows], rtol=1e-5, err_msg=key)
  assert np.any(saved['bank']['level2']['ffn_down'])  # the bank was updated, so the comparison is not vacuous
  assert_trees_close(saved['params'], single_saved['params'], rtol=1e-4, atol=2e-6)
  assert_trees_close(saved['bank'], single_saved['bank'], rtol=0, atol=5e-5)


def test_bank_checkpoint_items_restore_alone_and_onto_another_mesh(make_config, tmp_path):
  from hmem.train.checkpoint import Checkpoints
  cfg = make_config(*MEMORY, 'train.steps=4', 'train.checkpoint_every=0', 'train.eval_every=0', 'mesh.data=8')
  train(cfg, str(tmp_path), progress=False)
  assert {'bank', 'bank_opt'} <= set(os.listdir(tmp_path / 'checkpoints' / '4'))
  other = make_config(*MEMORY, 'mesh.data=2', 'mesh.fsdp=2', 'mesh.memory=2')
  mesh = sharding.make_mesh(other.mesh)
  with sharding.use_mesh(mesh, other.mesh.rules):
    spec = state_spec(other, anchor_optimizer(other.train)[0], mesh)
    ckpt = Checkpoints(str(tmp_path / 'checkpoints'), read_only=True)
    state, _, _ = ckpt.restore(4, spec.abstract, items=('bank',))
    ckpt.close()
  assert state.bank['level2']['ffn_up'].sharding.spec == spec.shardings.bank['level2']['ffn_up'].spec
  assert np.any(np.asarray(state.bank['level2']['ffn_down']))
  assert isinstance(state.params['embed']['embedding'], jax.ShapeDtypeStruct)  # not read


@pytest.mark.parametrize('mesh', [('mesh.data=8',), ('mesh.data=2', 'mesh.fsdp=2', 'mesh.memory=2')],
                         ids=['feature', 'rows'])
def test_memory_collectives_scale_with_the_local_fetch_not_the_bank(make_config, mesh):
  """The compiled post-hoc step (anchor frozen: no anchor gradient all-reduce) moves at most
  2 x B_local x fetch bytes in any one collective, at two global batch sizes."""
  from hmem.memory.collectives import largest_collective_over_local_fetch
  from hmem.train.step import compiled_train_step_text
  for batch in (16, 64):
    cfg = make_config(*MEMORY, *mesh, f'train.batch_size={batch}', 'train.freeze_anchor=true')
    found = largest_collective_over_local_fetch(cfg, compiled_train_step_text(cfg))
    assert 0 < found['largest_bytes'] and found['ratio'] <= 2, (batch, found)


def test_hlo_collective_parser_reads_tuple_results():
  from hmem import hlo
  text = ('  %all-to-all.1 = (f32[1,8,2]{2,1,0}, /*index=1*/bf16[4]{0}) all-to-all(%a, %b), channel_id=1\n'
          '  %x = f32[2]{0} add(%p, %q)\n'
          '  %all-reduce-start.2 = f32[16,4]{1,0} all-reduce-start(%c), to_apply=%sum\n')
  assert hlo.collectives(text) == [('all-to-all', 64 + 8), ('all-reduce', 256)]


def test_memory_gradients_survive_gradient_accumulation(make_config):
  """Per-sequence block gradients are concatenated across micro-batches, in row order, not
  summed: 2 micro-batches give the gradients of a single pass."""
  grads = []
  for accum in (1, 2):
    cfg = make_config(*MEMORY, f'train.grad_accum={accum}')
    graphdef, params = nnx.split(build_model(cfg))
    bank = mb.init_bank(memory_spec(cfg), jax.random.key(0))
    bank = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(a.ndim), a.shape), bank)
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg, [0, 5, 5, 9, 12, 3, 3, 15]).items()}
    blocks = mb.gather_levels(memory_spec(cfg), bank, batch.pop('leaf_id'))
    _, block_grads, nll, count = make_loss_and_grads(cfg, graphdef)({}, nnx.to_pure_dict(params), blocks, batch)
    grads.append((block_grads, nll, count))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)  # fp32 summation order only
