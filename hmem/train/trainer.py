"""The training loop: resume or init, step, log, evaluate, checkpoint, stop cleanly.

Determinism: a batch is a pure function of the data position, randomness in the step
derives from fold_in(seed, step), and checkpoints hold the position; so a run killed at
any point and resumed ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any

import jax
from absl import logging
from tqdm import tqdm

from hmem import sharding, sizes
from hmem.data import Position, check_batch, make_source
from hmem.data.prefetch import Prefetcher
from hmem.errors import CheckpointError, ConfigError, TrainingError
from hmem.files import as_path, atomic_write, open_append
from hmem.memory.spec import memory_spec
from hmem.train import resume
from hmem.train.checkpoint import Checkpoints
from hmem.train.hardware import peak_flops_per_device
from hmem.train.metrics import MetricsWriter, trackers
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
    self.prefetcher = Prefetcher(self._read)

  def _read(self, position: Position):
    batch = self.source.batch(position, self.rows)
    check_batch(batch, self.rows.stop - self.rows.start, self.source.seq_len)
    return batch

  def get(self, position: Position, prefetch: Position | None = None):
    batch = self.prefetcher.get(position, prefetch)
    B = self.source.batch_size
    return {name: sharding.np_global(a, self.shardings[name], (B, *a.shape[1:])) for name, a in batch.items()}

  def close(self):
    self.prefetcher.close()


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


# --- setup: every check that can fail on the user's input runs before the state is built.

def _check_workdir(workdir: str) -> None:
  probe = as_path(workdir) / f'.write-test-{uuid.uuid4().hex}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f'workdir {workdir!r} is not writable ({e.strerror or e}); pass a --workdir this '
                          'process can create and write') from None
  except ImportError as e:  # epath reaches an object store through a package of its own (gcsfs, s3fs)
    raise CheckpointError(f'workdir {workdir!r} cannot be reached: {e}') from None


def _sources(cfg):
  """The train source and, with evaluation on, the eval source; checks `train.eval_steps`."""
  t = cfg.train
  source = make_source(cfg, 'train')
  eval_source = make_source(cfg, 'eval') if t.eval_every > 0 else None
  if eval_source is not None and eval_source.steps_per_epoch is not None \
      and t.eval_steps > eval_source.steps_per_epoch:
    raise ConfigError(f'train.eval_steps={t.eval_steps} exceeds the {eval_source.steps_per_epoch} batches of '
                      f'{t.batch_size} sequences in the eval split of {cfg.data.path}; set '
                      f'--config.train.eval_steps={eval_source.steps_per_epoch} or less')
  return source, eval_source


def _data_fingerprint(source) -> str | None:
  """What identifies the dataset (a prepared one's fingerprint), wherever it lies."""
  return getattr(source, 'manifest', {}).get('fingerprint')


def _initial_state(cfg, tx, spec):
  """A fresh state; with `train.init_from`, its anchor parameters come from the latest
  checkpoint of that run (the paper's regime: pretrain the anchor, then add memory)."""
  if not cfg.train.init_from:
    return init_state(cfg, tx, spec)
  source = Checkpoints(as_path(cfg.train.init_from) / 'checkpoints', async_save=False, read_only=True)
  step = source.latest_step()
  if step is None:
    raise CheckpointError(f'train.init_from={cfg.train.init_from!r} holds no checkpoint; point it at the '
                          'workdir of a run that saved one')
  restored, _, _ = source.restore(step, spec.abstract, items=('params',))
  source.close()
  return init_state(cfg, tx, spec, params=restored.params)


def _restore_or_init(cfg, ckpt: Checkpoints, spec, tx, fingerprint):
  """(state, position, resume step or None, config changes) from the newest readable
  checkpoint, whose config must be compatible with `cfg` (resume.py), or a fresh state."""
  changes = {}

  def check(step, meta):
    nonlocal changes
    if 'config' in meta:
      changes = resume.config_changes(meta['config'], cfg, step, meta.get('data_fingerprint'), fingerprint)
      if changes:
        logging.warning(resume.describe(changes, meta['config'], cfg, step))

  restored = ckpt.restore_latest(spec.abstract, check)
  if restored is None:
    return _initial_state(cfg, tx, spec), Position(), None, {}
  state, position, _ = restored
  return state, position, int(state.step), changes


def _record_config(cfg, workdir: str, resume_step: int | None, changes: dict) -> None:
  """config.json is the config of the latest (re)start; each resume that changed keys
  appends them to config_changes.jsonl, so no earlier setting is lost."""
  if changes:
    with open_append(as_path(workdir) / 'config_changes.jsonl') as f:
      f.write(json.dumps({'step': resume_step, 'changes': {k: list(v) for k, v in changes.items()}}) + '\n')
  with atomic_write(as_path(workdir) / 'config.json') as f:
    f.write(cfg.to_json_best_effort(indent=2))


# --- logging: rows of metrics.jsonl, TensorBoard and the progress bar, and throughput.

class _Log:
  """Writes logged steps; step_time, tokens/s and MFU cover training only: evaluation and
  checkpointing are timed out of the window (after waiting for the steps already running)."""

  def __init__(self, cfg, workdir: str, resume_step, step: int, lead: bool, progress: bool):
    t = cfg.train
    self.tokens_per_step = t.batch_size * cfg.data.seq_len
    self.flops_per_step = sizes.flops_per_token(cfg) * self.tokens_per_step
    self.peak = peak_flops_per_device(t.peak_flops)
    self.writer = MetricsWriter(workdir, resume_step, enabled=lead, train_cfg=t)
    self.writer.describe_run(json.loads(cfg.to_json_best_effort()), sizes.sizes(cfg))
    self.bar = tqdm(total=t.steps, initial=step, disable=not (progress and lead), desc='train', unit='step')
    self.window_start, self.window_steps = time.perf_counter(), 0

  def step_done(self) -> None:
    self.window_steps += 1
    self.bar.update(1)

  @contextlib.contextmanager
  def untimed(self, state):
    """Time spent in the block is not training time. The steps dispatched before it are
    waited for first: their time is training time, whenever the host learns of it."""
    jax.block_until_ready(state)
    start = time.perf_counter()
    try:
      yield
    finally:
      self.window_start += time.perf_counter() - start

  def train_row(self, step: int, metrics: dict, position: Position, extra: dict) -> dict:
    """Logs the training metrics of `step` (and `extra`, e.g. eval losses); starts a new window."""
    step_time = (time.perf_counter() - self.window_start) / max(self.window_steps, 1)
    row = {k: float(v) for k, v in metrics.items() if k != 'finite'}
    row.update(step_time=step_time, tokens_per_s=self.tokens_per_step / step_time, epoch=position.epoch)
    if self.peak:
      # Per device: the step's FLOPs are spread over every device, each with this peak.
      row['mfu'] = self.flops_per_step / jax.device_count() / step_time / self.peak
    self.writer.write(step, {**row, **extra})
    self.bar.set_postfix_str(_console(row))
    self.window_start, self.window_steps = time.perf_counter(), 0
    return row

  def write(self, step: int, row: dict) -> None:
    self.writer.write(step, row)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


@dataclasses.dataclass
class _Run:
  """Everything `train` sets up before its first step."""
  ckpt: Checkpoints
  state: Any
  position: Position
  resume_step: int | None
  config_changes: dict
  steps_per_epoch: int | None
  batches: _Batches
  eval_batches: _Batches | None
  train_step: Any
  eval_step: Any
  meta: dict


def _setup(cfg, workdir: str, mesh) -> _Run:
  """Checks the config, workdir and data (cheap, first), then restores or builds the state.
  Call under `sharding.use_mesh(mesh, ...)`."""
  memory_spec(cfg)  # a bad memory config fails here, before any work
  trackers(cfg.train)
  _check_workdir(workdir)
  check_batching(cfg, mesh)
  source, eval_source = _sources(cfg)
  fingerprint = _data_fingerprint(source)
  tx, schedule = anchor_optimizer(cfg.train)
  spec = state_spec(cfg, tx, mesh)
  ckpt = Checkpoints(as_path(workdir) / 'checkpoints', cfg.train.keep_checkpoints, cfg.train.async_checkpoints)
  try:
    state, position, resume_step, changes = _restore_or_init(cfg, ckpt, spec, tx, fingerprint)
  except BaseException:
    ckpt.close()
    raise
  if jax.process_index() == 0:
    _record_config(cfg, workdir, resume_step, changes)
  rows = sharding.host_local_rows(cfg.train.batch_size, mesh)
  return _Run(
      ckpt=ckpt, state=state, position=position, resume_step=resume_step, config_changes=changes,
      steps_per_epoch=source.steps_per_epoch, batches=_Batches(source, mesh, rows),
      eval_batches=_Batches(eval_source, mesh, rows) if eval_source else None,
      train_step=make_train_step(cfg, spec, tx, schedule, mesh),
      eval_step=make_eval_step(cfg, spec, mesh) if eval_source else None,
      meta={'config': json.loads(cfg.to_json_best_effort()), 'data_fingerprint': fingerprint, **sizes.sizes(cfg)})


# --- the loop.

def train(cfg, workdir: str, progress: bool = True, devices=None) -> dict:
  """Trains to `cfg.train.steps`, resuming from `workdir` if it holds checkpoints.

  `devices` defaults to all devices. Returns a summary: the final step, the last loss, the
  last held-out losses (`eval_loss` and, with memory, `eval_loss_generic` and
  `eval_loss_anchor`), whether SIGTERM stopped the run, and the config keys changed on
  resume (`config_changes`: {key: [old, new]}).
  """
  t = cfg.train
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh, devices)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    run = _setup(cfg, workdir, mesh)
  state, position, step = run.state, run.position, int(run.state.step)
  summary = {'step': step, 'loss': None, 'eval_loss': None, 'stopped_by_signal': False,
             'config_changes': {k: list(v) for k, v in run.config_changes.items()}}
  pending = None  # (step, metrics) whose finiteness is not checked yet

  def check_finite():
    nonlocal pending
    if pending is not None and not bool(pending[1]['finite']):
      raise TrainingError(
          f'non-finite loss or gradient at step {pending[0]}: the update was skipped and the run stopped; '
          f'resume from the last checkpoint with a lower train.lr or train.clip_norm')
    pending = None

  log = tracing = None
  try:
    with sharding.use_mesh(mesh, cfg.mesh.rules), Preemption() as preemption:
      log = _Log(cfg, workdir, run.resume_step, step, lead, progress)
      while step < t.steps:
        if t.profile_start >= 0 and step == t.profile_start:
          jax.profiler.start_trace(str(as_path(workdir) / 'profile'))
          tracing = True
        next_position = position.next(run.steps_per_epoch)
        batch = run.batches.get(position, prefetch=next_position if step + 1 < t.steps else None)
        state, metrics = run.train_step(state, batch)
        check_finite()
        step, position = step + 1, next_position
        pending = (step, metrics)
        log.step_done()
        if tracing and step == t.profile_start + t.profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          tracing = False

        eval_row = {}
        if run.eval_step and step % t.eval_every == 0:
          with log.untimed(state):
            eval_row = _evaluate(run.eval_step, state, run.eval_batches, t.eval_steps)
          summary.update(eval_row)
        if step % t.log_every == 0 or step == t.steps:
          check_finite()
          summary['loss'] = log.train_row(step, metrics, position, eval_row)['loss']
        elif eval_row:
          log.write(step, eval_row)

        stop = preemption.requested()
        if stop or (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
          check_finite()
          with log.untimed(state):
            log.writer.flush()  # every row up to the checkpoint is in the file before it exists
            run.ckpt.save(state, position, run.meta)
        if stop:
          summary['stopped_by_signal'] = True
          break
  finally:
    if tracing:
      jax.profiler.stop_trace()
    run.batches.close()
    if run.eval_batches:
      run.eval_batches.close()
    run.ckpt.close()  # waits for any in-flight async save
    if log is not None:
      log.close()
  summary['step'] = step
  return summary
