"""The training loop: resume or init, step, log, evaluate, checkpoint, stop cleanly.

Determinism: a batch is a pure function of the data position, randomness in the step
derives from fold_in(seed, step), and checkpoints hold the position; so a run killed at
any point and resumed ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import jax
from tqdm import tqdm

from hmem import sharding, sizes
from hmem.data import Position, check_batch, make_source
from hmem.errors import CheckpointError, ConfigError, TrainingError
from hmem.memory import config as memory_config
from hmem.train.checkpoint import Checkpoints
from hmem.train.hardware import peak_flops_per_device
from hmem.train.metrics import MetricsWriter
from hmem.train.optimizer import anchor_optimizer
from hmem.train.preemption import Preemption
from hmem.train.state import init_state, state_spec
from hmem.train.step import make_eval_step, make_train_step


def check_batching(cfg, mesh) -> None:
  t = cfg.train
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if t.batch_size % t.grad_accum or (t.batch_size // t.grad_accum) % shards:
    raise ConfigError(
        f'train.batch_size={t.batch_size} must split into train.grad_accum={t.grad_accum} micro-batches '
        f'whose size is a multiple of mesh data x fsdp = {shards}; e.g. --config.train.batch_size='
        f'{t.grad_accum * shards * max(1, t.batch_size // (t.grad_accum * shards))}')


class _Batches:
  """Global arrays for successive positions, reading the next batch while a step runs."""

  def __init__(self, source, mesh, rows: slice):
    self.source, self.rows, self.shardings = source, rows, sharding.data_shardings(mesh)
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self.pending: tuple[Position, concurrent.futures.Future] | None = None

  def _read(self, position: Position):
    batch = self.source.batch(position, self.rows)
    check_batch(batch, self.rows.stop - self.rows.start, self.source.seq_len)
    return batch

  def get(self, position: Position, prefetch: Position | None = None):
    if self.pending is not None and self.pending[0] == position:
      batch = self.pending[1].result()
    else:
      batch = self._read(position)
    self.pending = None if prefetch is None else (prefetch, self.pool.submit(self._read, prefetch))
    B = self.source.batch_size
    return {name: sharding.np_global(a, self.shardings[name], (B, *a.shape[1:])) for name, a in batch.items()}

  def close(self):
    self.pool.shutdown(wait=True, cancel_futures=True)


def _console(row: dict) -> str:
  """The progress bar's summary of a logged step."""
  parts = [f"loss {row['loss']:.4f}", f"gnorm {row['grad_norm']:.3f}", f"lr {row['lr']:.2e}",
           f"{row['tokens_per_s']:,.0f} tok/s", f"{row['step_time']:.3f} s/step"]
  if 'mfu' in row:
    parts.append(f"MFU {row['mfu']:.2f}")
  return ', '.join(parts)


def _evaluate(eval_step, state, batches: _Batches, steps: int) -> dict[str, float]:
  """Held-out loss over the first `steps` eval batches: `eval_loss` (fetched memory, or
  the anchor when the memory is off), `eval_loss_generic`, `eval_loss_anchor`."""
  sums: dict[str, list[float]] = {}
  for i in range(steps):
    for mode, (nll, count) in eval_step(state.params, state.bank, batches.get(Position(0, i))).items():
      acc = sums.setdefault(mode, [0.0, 0.0])
      acc[0], acc[1] = acc[0] + float(nll), acc[1] + float(count)
  loss = {mode: nll / max(count, 1.0) for mode, (nll, count) in sums.items()}
  out = {'eval_loss': loss.get('fetched', loss['anchor'])}
  if 'fetched' in loss:
    out['eval_loss_anchor'] = loss['anchor']
  if 'generic' in loss:
    out['eval_loss_generic'] = loss['generic']
  return out


def _initial_state(cfg, tx, spec):
  """A fresh state; with `train.init_from`, its anchor parameters come from the latest
  checkpoint of that run (the paper's regime: pretrain the anchor, then add memory)."""
  if not cfg.train.init_from:
    return init_state(cfg, tx, spec)
  source = Checkpoints(os.path.join(cfg.train.init_from, 'checkpoints'), async_save=False, read_only=True)
  step = source.latest_step()
  if step is None:
    raise CheckpointError(f'train.init_from={cfg.train.init_from!r} holds no checkpoint; point it at the '
                          'workdir of a run that saved one')
  restored, _, _ = source.restore(step, spec.abstract, items=('params',))
  source.close()
  return init_state(cfg, tx, spec, params=restored.params)


def train(cfg, workdir: str, progress: bool = True, devices=None) -> dict:
  """Trains to `cfg.train.steps`, resuming from `workdir` if it holds checkpoints.

  `devices` defaults to all devices. Returns a summary: the final step, the last loss, the
  last held-out losses (`eval_loss` and, with memory, `eval_loss_generic` and
  `eval_loss_anchor`), and whether SIGTERM stopped the run.
  """
  memory_config.check(cfg)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  check_batching(cfg, mesh)
  t = cfg.train
  lead = jax.process_index() == 0

  with sharding.use_mesh(mesh, cfg.mesh.rules):
    tx, schedule = anchor_optimizer(t)
    spec = state_spec(cfg, tx, mesh)
    ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'), t.keep_checkpoints, t.async_checkpoints)
    resume_step = ckpt.latest_step()
    if resume_step is not None:
      state, position, _ = ckpt.restore(resume_step, spec.abstract)
    else:
      state, position = _initial_state(cfg, tx, spec), Position()
    if lead:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(cfg.to_json_best_effort(indent=2))

    source = make_source(cfg, 'train')
    rows = sharding.host_local_rows(t.batch_size, mesh)
    batches = _Batches(source, mesh, rows)
    eval_batches = _Batches(make_source(cfg, 'eval'), mesh, rows) if t.eval_every > 0 else None
    train_step = make_train_step(cfg, spec, tx, schedule, mesh)
    eval_step = make_eval_step(cfg, spec, mesh) if eval_batches else None
    writer = MetricsWriter(workdir, resume_step, enabled=lead)

    counts = sizes.sizes(cfg)
    flops_per_step = sizes.flops_per_token(cfg, counts) * t.batch_size * cfg.data.seq_len
    peak = peak_flops_per_device(t.peak_flops)
    meta = {'config': json.loads(cfg.to_json_best_effort()), **counts}

    step = int(state.step)
    summary = {'step': step, 'loss': None, 'eval_loss': None, 'stopped_by_signal': False}
    bar = tqdm(total=t.steps, initial=step, disable=not (progress and lead), desc='train', unit='step')
    pending = None  # (step, metrics) whose finiteness is not checked yet

    def check_finite():
      nonlocal pending
      if pending is not None and not bool(pending[1]['finite']):
        raise TrainingError(
            f'non-finite loss or gradient at step {pending[0]}: the update was skipped and the run stopped; '
            f'resume from the last checkpoint with a lower train.lr or train.clip_norm')
      pending = None

    window_start, window_steps = time.perf_counter(), 0
    try:
      with Preemption() as preemption:
        while step < t.steps:
          profiling = t.profile_start >= 0
          if profiling and step == t.profile_start:
            jax.profiler.start_trace(os.path.join(workdir, 'profile'))
          next_position = position.next(source.steps_per_epoch)
          batch = batches.get(position, prefetch=next_position if step + 1 < t.steps else None)
          state, metrics = train_step(state, batch)
          check_finite()
          step, position, window_steps = step + 1, next_position, window_steps + 1
          pending = (step, metrics)
          bar.update(1)
          if profiling and step == t.profile_start + t.profile_steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()

          eval_row = {}
          if eval_step and step % t.eval_every == 0:
            eval_start = time.perf_counter()
            eval_row = _evaluate(eval_step, state, eval_batches, t.eval_steps)
            summary.update(eval_row)
            window_start += time.perf_counter() - eval_start  # keep step_time a training figure

          if step % t.log_every == 0 or step == t.steps:
            check_finite()
            elapsed = time.perf_counter() - window_start
            row = {k: float(v) for k, v in metrics.items() if k != 'finite'}
            step_time = elapsed / window_steps
            row.update(step_time=step_time, tokens_per_s=t.batch_size * cfg.data.seq_len / step_time,
                       epoch=position.epoch)
            if peak:
              row['mfu'] = flops_per_step / step_time / (peak * jax.device_count())
            writer.write(step, {**row, **eval_row})
            eval_row = {}
            bar.set_postfix_str(_console(row))
            summary['loss'] = row['loss']
            window_start, window_steps = time.perf_counter(), 0
          if eval_row:
            writer.write(step, eval_row)

          stop = preemption.requested()
          if stop or (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
            check_finite()
            save_start = time.perf_counter()
            ckpt.save(state, position, meta)
            window_start += time.perf_counter() - save_start
          if stop:
            summary['stopped_by_signal'] = True
            break
    finally:
      bar.close()
      batches.close()
      if eval_batches:
        eval_batches.close()
      ckpt.close()  # waits for any in-flight async save
      writer.close()
    summary['step'] = step
    return summary
