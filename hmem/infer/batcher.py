"""Continuous batching: requests join and leave a running decode batch between steps.

The Batcher owns a fixed number of slots (batch rows) over one KV cache of fixed length and
one per-row memory buffer, so the jitted decode step has one shape for the server's life.
A decode thread loops: it starts waiting requests in free slots (a one-row prefill that
also writes the row's own memory block: requests routed to different leaves, the generic
block or no memory share a batch), runs one `decoder.step` for every slot, hands each
active request its token, and frees the slots whose request ended (EOT, its max_tokens, or
cancelled by its caller, e.g. at a stop string). Idle slots ride along as finished rows.

Prompt lengths are rounded up to `decoder.BUCKET`, so prefill compiles once per bucket;
the cache holds the longest prompt plus its tokens (`max_len`). The same ideas as vLLM's
scheduler and S-LoRA's per-request adapters, written for this model: the "adapter" is the
request's memory block, already assembled by the caller (routing and row fetches happen
when a request arrives, outside the decode loop).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from hmem.errors import UserError
from hmem.infer import decoder


@dataclasses.dataclass(eq=False)
class Request:
  """One sequence to continue. `emit(token, finish)` is called from the decode thread: with
  each new token (finish None), then once with token None and finish 'stop' (EOT),
  'length' (max_tokens reached) or 'error'. A cancelled request gets no further calls."""

  tokens: Sequence[int]
  memory: dict | None  # the model's memory for this one sequence ([1, ...]); None: the dense anchor
  max_tokens: int
  emit: Callable[[int | None, str | None], None]
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  prompt_index: int = 0  # among the prompts of its call (keys the sampling, as in `generate`)
  cancelled: bool = False


class Batcher:
  """Decodes requests in `slots` rows of `max_len` cache slots each; see the module doc."""

  def __init__(self, model, *, slots: int, max_len: int, eot_id: int, memory_row: dict | None = None):
    """`memory_row`: a [1, ...] memory of the model's shapes (its values are unused; rows
    start as zeros, i.e. no memory), or None for a model without memory."""
    if slots < 1:
      raise UserError(f'slots={slots}: a server needs at least one slot')
    self.slots, self.max_len, self.eot_id = slots, decoder.round_up(max_len, decoder.BUCKET), eot_id
    self._graphdef, self._params = nnx.split(model)
    self._cache = model.init_cache(slots, self.max_len)
    self._memory = None if memory_row is None else jax.tree.map(
        lambda a: jnp.zeros((slots, *a.shape[1:]), a.dtype), memory_row)
    self._zero_row = None if memory_row is None else jax.tree.map(jnp.zeros_like, memory_row)
    self._logits_BxV = jnp.zeros((slots, model.embed.num_embeddings), jnp.float32)
    self._active: list[Request | None] = [None] * slots
    self._count_B = np.zeros(slots, np.int32)
    self._settings = {name: np.zeros(slots, dtype) for name, dtype in
                      (('seed', np.uint32), ('prompt', np.int32), ('temperature', np.float32), ('top_p', np.float32))}
    self._waiting: list[Request] = []
    self._lock = threading.Condition()
    self._closing = False
    self.steps = 0  # decode steps run (tests and benchmarks read it)
    self._thread = threading.Thread(target=self._loop, name='hmem-batcher', daemon=True)
    self._thread.start()

  def check(self, prompt_tokens: int, max_tokens: int) -> None:
    """Raises UserError unless a prompt of this length and max_tokens fits a slot."""
    if prompt_tokens < 1:
      raise UserError('the prompt is empty (it encodes to no token)')
    if max_tokens < 1:
      raise UserError(f'max_tokens={max_tokens}: ask for at least one token')
    need = decoder.round_up(prompt_tokens, decoder.BUCKET) + max_tokens
    if need > self.max_len:
      raise UserError(f'the prompt has {prompt_tokens} tokens and max_tokens={max_tokens}: that needs {need} cache '
                      f'slots (prompt rounded up to {decoder.BUCKET}) but a slot holds {self.max_len}; '
                      'shorten the prompt or ask for fewer tokens')

  def submit(self, request: Request) -> None:
    """Queues a request; it joins the batch at the next step with a free slot."""
    self.check(len(request.tokens), request.max_tokens)
    decoder.check_sampling(request.temperature, request.top_p)
    if request.memory is None and self._memory is not None:
      request.memory = self._zero_row
    with self._lock:
      if self._closing:
        raise UserError('the server is shutting down')
      self._waiting.append(request)
      self._lock.notify()

  def cancel(self, request: Request) -> None:
    """Stops a request; its slot is freed before the next step (no further emit calls)."""
    request.cancelled = True

  @property
  def load(self) -> dict:
    with self._lock:
      return {'slots': self.slots, 'active': sum(r is not None for r in self._active), 'waiting': len(self._waiting)}

  def close(self, timeout: float | None = None) -> None:
    """Finishes every queued and running request, then stops the decode thread."""
    with self._lock:
      self._closing = True
      self._lock.notify()
    self._thread.join(timeout)

  def _loop(self) -> None:
    while True:
      with self._lock:
        while not self._waiting and not any(self._active) and not self._closing:
          self._lock.wait()
        if self._closing and not self._waiting and not any(self._active):
          return
        joining = []
        for slot in range(self.slots):
          if self._active[slot] is None and self._waiting:
            joining.append((slot, self._waiting.pop(0)))
            self._active[slot] = joining[-1][1]
      try:
        for slot, request in joining:
          if not request.cancelled:
            self._start(slot, request)
        self._drop_cancelled()
        if any(self._active):
          self._step()
      except Exception:  # a bug or a device failure: fail the running requests, keep serving
        logging.exception('decode step failed')
        for slot, request in enumerate(self._active):
          if request is not None:
            self._finish(slot, 'error')

  def _start(self, slot: int, request: Request) -> None:
    P = decoder.round_up(len(request.tokens), decoder.BUCKET)
    tokens_1xP, segment_ids_1xP = decoder.left_pad([request.tokens], P, self.eot_id)
    self._cache, self._memory, self._logits_BxV = decoder.prefill_row(
        self._graphdef, self._params, tokens_1xP, segment_ids_1xP, request.memory, self._cache, self._memory,
        self._logits_BxV, jnp.int32(slot))
    self._count_B[slot] = 0
    for name, value in (('seed', request.seed), ('prompt', request.prompt_index),
                        ('temperature', request.temperature), ('top_p', request.top_p)):
      self._settings[name][slot] = value

  def _drop_cancelled(self) -> None:
    with self._lock:
      for slot, request in enumerate(self._active):
        if request is not None and request.cancelled:
          self._active[slot] = None

  def _step(self) -> None:
    done_B = np.array([r is None for r in self._active])
    sampling = decoder.Sampling(**{name: jnp.asarray(a) for name, a in self._settings.items()})
    token_B, _, self._logits_BxV, self._cache = decoder.step(
        self._graphdef, self._params, self._logits_BxV, self._memory, self._cache, done_B, sampling,
        self._count_B.copy(), eot_id=self.eot_id)
    token_B = np.asarray(token_B)
    self.steps += 1
    for slot, request in enumerate(self._active):
      if request is None or request.cancelled:
        continue
      token = int(token_B[slot])
      if token == self.eot_id:
        self._finish(slot, 'stop')
        continue
      self._count_B[slot] += 1
      request.emit(token, None)
      if self._count_B[slot] >= request.max_tokens:
        self._finish(slot, 'length')

  def _finish(self, slot: int, reason: str) -> None:
    request = self._active[slot]
    with self._lock:
      self._active[slot] = None
    if not request.cancelled:
      request.emit(None, reason)
