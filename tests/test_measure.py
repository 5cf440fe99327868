"""What the trainer and benchmarks report: FLOPs per token and the training-time window."""

import time

import jax
import pytest

from hmem import sizes
from hmem.train.trainer import _Log


def test_a_frozen_anchor_counts_4n_and_its_memory_6n(make_config):
  trained = make_config('memory.levels=(8,4)')
  frozen = make_config('memory.levels=(8,4)', 'train.freeze_anchor=true')
  counts = sizes.sizes(trained)
  anchor = counts['non_embedding_params'] + trained.model.vocab_size * trained.model.d_model
  assert counts['fetch_params'] > 0
  assert sizes.flops_per_token(trained) - sizes.flops_per_token(frozen) == pytest.approx(2 * anchor)


def test_untimed_work_waits_for_the_running_steps_first(make_config, tmp_path, monkeypatch):
  """An evaluation after a dispatched step first waits for it; that wait is training time,
  the evaluation is not. A fake clock: the running steps end 5 s after the host asks."""
  log = _Log(make_config(), str(tmp_path), None, 0, lead=True, progress=False)
  clock, waited = [100.0], []

  def block_until_ready(x):
    waited.append(x)
    clock[0] += 5.0
    return x

  monkeypatch.setattr(time, 'perf_counter', lambda: clock[0])
  monkeypatch.setattr(jax, 'block_until_ready', block_until_ready)
  log.window_start = clock[0]
  with log.untimed('state'):
    assert waited == ['state']  # the steps were waited for before the untimed block began
    clock[0] += 3.0  # the evaluation
  assert clock[0] - log.window_start == 5.0
  monkeypatch.undo()
  log.close()


def test_a_profile_running_at_the_end_of_the_run_is_stopped(make_config, tmp_path):
  """A trace window past the last step (or an error inside it) still ends the trace."""
  from hmem.train.trainer import train
  cfg = make_config('train.steps=2', 'train.profile_start=1', 'train.profile_steps=100', 'train.eval_every=0',
                    'train.log_every=1')
  train(cfg, str(tmp_path / 'run'), progress=False)
  assert (tmp_path / 'run' / 'profile').is_dir()
  jax.profiler.start_trace(str(tmp_path / 'again'))  # fails while a trace is still running
  jax.profiler.stop_trace()
