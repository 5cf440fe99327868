"""The anchor: causality, per-document masking, RoPE restarts, kernels and layer modes agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmem.model import build_model
from hmem.model.attention import attention_mask
from hmem.model.layers import segment_positions


def _model(make_config, *overrides):
  cfg = make_config('model.dtype=float32', *overrides)
  return cfg, build_model(cfg, seed=1)


def _tokens(cfg, B=2, T=32, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 1, cfg.model.vocab_size)


def test_segment_positions_restart_per_document():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0]])
  np.testing.assert_array_equal(segment_positions(seg)[0], [0, 1, 2, 0, 1, 0, 1, 2, 0, 1])


def test_attention_mask_is_causal_and_per_segment():
  seg = jnp.array([[1, 1, 2, 2]])
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(attention_mask(seg)[0], expected)


@pytest.mark.parametrize('attention', ['xla', 'dot_product'])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(make_config, attention):
  cfg, model = _model(make_config, f'model.attention={attention}')
  tokens = _tokens(cfg)
  seg = jnp.ones_like(tokens)
  t = 20
  changed = tokens.at[:, t].set((tokens[:, t] + 7) % cfg.model.vocab_size)
  a, b = model(tokens, seg), model(changed, seg)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize('attention', ['xla', 'dot_product'])
def test_no_leak_across_segments_and_rope_restarts(make_config, attention):
  """A document packed after another gives exactly the logits it gives alone."""
  cfg, model = _model(make_config, f'model.attention={attention}')
  doc_a, doc_b = _tokens(cfg, 1, 12, seed=1), _tokens(cfg, 1, 20, seed=2)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 12), jnp.int32), 2 * jnp.ones((1, 20), jnp.int32)], axis=1)
  alone = model(doc_b, jnp.ones_like(doc_b))
  np.testing.assert_allclose(model(packed, seg)[:, 12:], alone, atol=2e-5, rtol=2e-5)
  # And the earlier document cannot see the later one: change doc_b, doc_a's logits stay.
  other = jnp.concatenate([doc_a, (doc_b + 3) % cfg.model.vocab_size], axis=1)
  np.testing.assert_array_equal(model(packed, seg)[:, :12], model(other, seg)[:, :12])


def test_attention_kernels_agree(make_config):
  cfg, model = _model(make_config)
  tokens = _tokens(cfg)
  seg = jnp.concatenate([jnp.ones((2, 10), jnp.int32), 2 * jnp.ones((2, 22), jnp.int32)], axis=1)
  xla = model(tokens, seg)
  cfg2, model2 = _model(make_config, 'model.attention=dot_product')
  np.testing.assert_allclose(model2(tokens, seg), xla, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('overrides', [('model.scan_layers=False',), ('model.remat=full',), ('model.remat=dots',)])
def test_layer_modes_give_the_same_loss_and_grads(make_config, overrides):
  cfg, model = _model(make_config)
  cfg2, model2 = _model(make_config, *overrides)
  tokens = _tokens(cfg)
  seg = jnp.ones_like(tokens)

  def loss_and_grads(m):
    graphdef, params = nnx.split(m)
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p)(tokens, seg) ** 2)
    return jax.value_and_grad(loss)(params)

  (l1, g1), (l2, g2) = loss_and_grads(model), loss_and_grads(model2)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_grouped_query_attention_and_rmsnorm_untied(make_config):
  cfg, model = _model(make_config, 'model.kv_heads=1', 'model.norm=rmsnorm', 'model.tie_embeddings=False',
                      'model.qk_norm=False')
  out = model(_tokens(cfg), jnp.ones((2, 32), jnp.int32))
  assert out.shape == (2, 32, cfg.model.vocab_size) and out.dtype == jnp.float32
  params = nnx.to_pure_dict(nnx.state(model))
  assert params['blocks']['attn']['k']['kernel'].shape == (2, 64, 16)
  assert 'lm_head' in params and 'q_norm' not in params['blocks']['attn']


def test_bf16_compute_runs_and_logits_are_fp32(make_config):
  cfg, model = _model(make_config, 'model.dtype=bfloat16')
  out = model(_tokens(cfg), jnp.ones((2, 32), jnp.int32))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize('shape', [(16, 8, 32), (16, 32, 8)], ids=['narrow_in', 'narrow_out'])
def test_custom_dense_gradient_equals_autodiff(shape):
  """Both branches of `dense`'s weight gradient (transpose x, or transpose g)."""
  from hmem.model.layers import dense
  M, I, O = shape
  x = jax.random.normal(jax.random.key(0), (M, I))
  w = jax.random.normal(jax.random.key(1), (I, O))
  probe = jax.random.normal(jax.random.key(2), (M, O))
  ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w)) * probe), argnums=(0, 1))(x, w)
  plain = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w) * probe), argnums=(0, 1))(x, w)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
