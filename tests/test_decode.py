"""KV-cached decoding: prefill + one token at a time gives the full forward pass's logits,
for every memory type, with prompts of different lengths in one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmem.infer.decoder import generate, sample
from hmem.memory.spec import memory_spec
from hmem.model import build_model

PROMPT_LENGTHS = (5, 11, 2)
MEMORIES = {
    'none': (),
    'ffn_layer_range': ('memory.type=ffn', 'memory.layers=(1,2)'),
    'lora_qk': ('memory.type=lora', 'memory.lora_targets=qk'),
    'lora_vo': ('memory.type=lora', 'memory.lora_targets=vo'),
    'kv': ('memory.type=kv',),
}


def _setup(make_config, name):
  overrides = () if name == 'none' else ('memory.levels=(4,2)', *MEMORIES[name])
  cfg = make_config('model.dtype=float32', *overrides)
  model = build_model(cfg, seed=1, memory_layers=memory_spec(cfg).layers)
  memory = None
  if name != 'none':
    # Random everywhere (zero-initialised arrays would make the memory a no-op).
    width = sum(cfg.memory.levels)
    shapes = memory_spec(cfg).block_shapes(width)
    keys = jax.random.split(jax.random.key(3), len(shapes))
    memory = {n: 0.3 * jax.random.normal(k, (len(PROMPT_LENGTHS), *s)) for k, (n, s) in zip(keys, shapes.items())}
  prompts = [np.asarray(jax.random.randint(jax.random.key(10 + i), (n,), 1, cfg.model.vocab_size))
             for i, n in enumerate(PROMPT_LENGTHS)]
  return cfg, model, memory, prompts


def _row(memory, b):
  return None if memory is None else {n: a[b:b + 1] for n, a in memory.items()}


@pytest.mark.parametrize('name', list(MEMORIES))
def test_cached_logits_equal_the_full_forward_pass(make_config, name):
  cfg, model, memory, prompts = _setup(make_config, name)
  B, P, new = len(prompts), 16, 5
  tokens = np.zeros((B, P), np.int32)
  segs = np.zeros((B, P), np.int32)
  for b, p in enumerate(prompts):  # left-padded
    tokens[b, P - len(p):], segs[b, P - len(p):] = p, 1
  cache = model.init_cache(B, P + new)
  logits, cache = model(jnp.asarray(tokens), jnp.asarray(segs), memory, cache)
  cached = [logits]
  continuation = jax.random.randint(jax.random.key(7), (B, new), 1, cfg.model.vocab_size)
  for t in range(new):
    step_logits, cache = model(continuation[:, t:t + 1], jnp.ones((B, 1), jnp.int32), memory, cache)
    cached.append(step_logits)
  cached = np.asarray(jnp.concatenate(cached, axis=1))
  np.testing.assert_array_equal(cache.index, P + new)
  np.testing.assert_array_equal(cache.lengths, np.asarray(PROMPT_LENGTHS) + new)
  for b, p in enumerate(prompts):
    # Each row alone, unpadded, through the full (uncached) forward pass.
    seq = jnp.concatenate([jnp.asarray(p), continuation[b]])[None]
    full = model(seq, jnp.ones_like(seq), _row(memory, b))
    np.testing.assert_allclose(cached[b, P - len(p):], full[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('name', ['kv'])
def test_greedy_generation_is_the_argmax_of_the_full_forward_pass(make_config, name):
  cfg, model, memory, prompts = _setup(make_config, name)
  eot = 0
  out = generate(model, prompts, memory, eot_id=eot, max_new_tokens=6)
  for b, (p, gen) in enumerate(zip(prompts, out)):
    assert len(gen) <= 6
    seq = jnp.asarray(np.concatenate([p, gen]))[None]
    logits = model(seq, jnp.ones_like(seq), _row(memory, b))[0]
    expected = np.argmax(np.asarray(logits[len(p) - 1:]), axis=-1)
    np.testing.assert_array_equal(gen, expected[:len(gen)])
    if len(gen) < 6:  # stopped early: the next greedy token is EOT
      assert expected[len(gen)] == eot


def test_generation_stops_at_eot(make_config):
  cfg, model, _, prompts = _setup(make_config, 'none')
  # Call the prompt's most likely next token EOT: generation ends at once, empty.
  eot = int(np.argmax(np.asarray(model(jnp.asarray(prompts[0])[None], jnp.ones((1, 5), jnp.int32))[0, -1])))
  out = generate(model, [prompts[0]], None, eot_id=eot, max_new_tokens=8)
  assert len(out[0]) == 0


def test_sampling_top_p_and_seed():
  B = 4000
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * B))
  keys = lambda seed: jax.random.split(jax.random.key(seed), B)
  full = lambda value: jnp.full((B,), value)
  draws = np.asarray(sample(logits, keys(0), full(1.0), full(0.7)))
  # top_p=0.7 keeps the two most likely tokens (0.5 < 0.7 <= 0.8), renormalised 5:3.
  assert set(np.unique(draws)) == {0, 1}
  assert abs((draws == 0).mean() - 0.625) < 0.03
  np.testing.assert_array_equal(draws, sample(logits, keys(0), full(1.0), full(0.7)))
  assert set(np.unique(np.asarray(sample(logits, keys(1), full(1.0), full(1.0))))) == {0, 1, 2, 3}
  np.testing.assert_array_equal(sample(logits, keys(1), full(0.0), full(1.0)), 0)
  # Rows keep their own settings in one batch: greedy rows stay greedy beside sampled ones.
  mixed = np.asarray(sample(logits, keys(2), jnp.where(jnp.arange(B) % 2 == 0, 0.0, 1.0), full(1.0)))
  np.testing.assert_array_equal(mixed[::2], 0)
  assert set(np.unique(mixed[1::2])) == {0, 1, 2, 3}


def test_sampled_generation_draws_the_same_alone_or_in_a_batch(make_config):
  """A prompt's draws depend on its seed alone: not on its row, nor on the other prompts
  (it drew with its index among them, so a prompt second in a batch drew otherwise alone)."""
  cfg, model, _, prompts = _setup(make_config, 'none')
  kw = dict(eot_id=-1, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5)
  batch = generate(model, prompts[:2], None, **kw)
  for i in range(2):
    np.testing.assert_array_equal(batch[i], generate(model, prompts[i:i + 1], None, **kw)[0])
  np.testing.assert_array_equal(generate(model, prompts[1::-1], None, **kw)[0], batch[1])  # rows swapped
  assert len(batch[0]) == 6 and not np.array_equal(batch[0], generate(model, prompts[:1], None, **{**kw, 'seed': 6})[0])
