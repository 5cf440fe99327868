"""The continuous batcher (hmem.infer.batcher) on a tiny random model: greedy tokens equal
`generate`'s at every step size; steps are sized to the requests in flight; a request
whose rows are slow to read holds up no other; cancelled and closing requests end as
documented. Seconds (one tiny model, a few compiled step sizes)."""

import threading

import jax
import numpy as np
import pytest

from hmem.infer.batcher import Batcher, Request
from hmem.infer.decoder import generate
from hmem.memory.spec import memory_spec
from hmem.model import build_model

TIMEOUT = 120
LENGTHS = (5, 11, 2, 7, 9, 3, 6, 4)


@pytest.fixture(scope='module')
def setup(make_config):
  cfg = make_config('model.dtype=float32', 'memory.levels=(4,2)')
  model = build_model(cfg, seed=1, memory_layers=memory_spec(cfg).layers)
  shapes = memory_spec(cfg).block_shapes(memory_spec(cfg).fetch_width)
  rng = np.random.default_rng(0)
  memories = [{n: 0.3 * rng.standard_normal((1, *s)).astype(np.float32) for n, s in shapes.items()}
              for _ in LENGTHS]
  prompts = [rng.integers(1, cfg.model.vocab_size, n).tolist() for n in LENGTHS]
  batcher = Batcher(model, slots=8, max_len=64, eot_id=-1, memory_shapes=shapes)
  yield model, memories, prompts, batcher
  batcher.close()


class _Collect:
  def __init__(self):
    self.tokens, self.finish, self.done = [], None, threading.Event()

  def __call__(self, token, finish, logprob):
    if finish is None:
      self.tokens.append(token)
    else:
      self.finish = finish
      self.done.set()


def _run(batcher, prompts, memories, max_tokens=6, fetch_gate=None):
  outs = [_Collect() for _ in prompts]
  requests = [Request(p, max_tokens, out, lambda m=m: m) for p, m, out in zip(prompts, memories, outs)]
  batcher.submit(*requests)
  for out in outs:
    assert out.done.wait(TIMEOUT)
  return [out.tokens for out in outs]


def test_greedy_tokens_equal_generate_at_every_step_size(setup):
  model, memories, prompts, batcher = setup
  want = [generate(model, [p], jax.tree.map(np.asarray, m), eot_id=-1, max_new_tokens=6)[0].tolist()
          for p, m in zip(prompts, memories)]
  batcher.step_rows.clear()
  alone = [_run(batcher, [p], [m])[0] for p, m in zip(prompts, memories)]
  assert set(batcher.step_rows) == {1}  # one request in flight: one-row steps
  together = _run(batcher, prompts, memories)
  assert max(batcher.step_rows) == 8
  assert alone == want and together == want


def test_steps_follow_the_requests_in_flight(setup):
  _, memories, prompts, batcher = setup
  batcher.step_rows.clear()
  _run(batcher, prompts[:3], memories[:3])
  assert set(batcher.step_rows) <= {1, 2, 4} and 4 in batcher.step_rows  # never the whole batch of 8


def test_a_slow_read_holds_up_no_other_request(setup):
  """Rows are read by the batcher's readers while others decode (they were read when a
  request arrived, in its handler, before it could join)."""
  _, memories, prompts, batcher = setup
  gate, slow = threading.Event(), _Collect()
  batcher.submit(Request(prompts[0], 6, slow, lambda: gate.wait(TIMEOUT) and memories[0]))
  assert _run(batcher, prompts[1:3], memories[1:3])  # served while the first one's read waits
  assert not slow.done.is_set() and batcher.load['waiting'] == 1
  gate.set()
  assert slow.done.wait(TIMEOUT) and len(slow.tokens) == 6


def test_a_failed_read_fails_its_request_alone(setup):
  _, memories, prompts, batcher = setup
  broken, fine = _Collect(), _Collect()

  def fail():
    raise OSError('the disk is gone')

  broken_request = Request(prompts[0], 6, broken, fail)
  batcher.submit(broken_request, Request(prompts[1], 6, fine, lambda: memories[1]))
  assert broken.done.wait(TIMEOUT) and fine.done.wait(TIMEOUT)
  assert broken.finish == 'error' and 'the disk is gone' in broken_request.error and not broken.tokens
  assert fine.finish == 'length' and len(fine.tokens) == 6


def test_cancelled_requests_end_and_close_aborts_what_is_left(setup, make_config):
  model, memories, prompts, _ = setup
  shapes = {n: a.shape[1:] for n, a in memories[0].items()}
  batcher = Batcher(model, slots=1, max_len=64, eot_id=-1, memory_shapes=shapes, max_queue=3)
  gate = threading.Event()  # the reads wait: nothing can join yet
  outs = [_Collect() for _ in range(3)]
  first, second, third = (Request(p, 30, out, lambda m=m: gate.wait(TIMEOUT) and m)
                          for p, m, out in zip(prompts, memories, outs))
  batcher.submit(first, second, third)
  with pytest.raises(Exception, match='queue holds 3 waiting prompts'):
    batcher.submit(Request(prompts[3], 2, _Collect()))
  batcher.cancel(second)  # never started, never called again
  batcher.close(timeout=0)  # ends the rest at once
  gate.set()
  assert outs[0].done.wait(TIMEOUT) and outs[2].done.wait(TIMEOUT)
  assert outs[0].finish == 'abort' and outs[2].finish == 'abort' and not outs[1].done.is_set()
  with pytest.raises(Exception, match='shutting down'):
    batcher.submit(Request(prompts[3], 2, _Collect()))
