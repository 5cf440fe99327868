"""Continuous batching: requests join and leave a running decode batch between steps.

The Batcher owns `slots` rows of one KV cache of fixed length and of one per-row memory
buffer on the device. A decode thread loops: it starts waiting requests in free slots (a
one-row prefill that also writes the row's own memory block: requests routed to different
leaves, the generic block or no memory share a batch), runs one `decoder.step`, hands each
active request its token, and frees the slots whose request ended (EOT, its max_tokens, or
cancelled by its caller: a stop string, a client that went away).

Admission and memory: `submit` queues requests, at most `max_queue` waiting (else
`QueueFull`). A waiting request holds host memory only. A pool of reader threads runs the
`fetch` of the first `slots` waiting requests (reads its path's rows, e.g. through a
bundle's row cache) while the batch decodes, so a cold read delays only its own request;
a request joins once its rows are in and a slot is free, and its block reaches the device
then, in its prefill. Device memory is thus bounded by the slots, host memory by the slots
and that prefetch window, whatever the queue holds.

Steps: a request takes the lowest free slot, and a step runs over rows [0, R) with R the
smallest bucket (1, 2, 4, ..., slots) that holds every active slot: one compile per bucket,
and a step costs what the requests in flight need, not the whole batch.

Failures: an exception in a prefill or a step fails the requests whose state it lost (the
joining request when the buffers survived; every active one when a donated buffer is gone),
the buffers are rebuilt and decoding goes on; `healthy` is False while they cannot be
(hmem serve's /health answers 503 then). `close(timeout)` stops taking requests, lets the
waiting and running ones finish for `timeout` seconds, then ends the rest ('abort').

Prompt lengths are rounded up to `decoder.BUCKET`, so prefill compiles once per bucket;
the cache holds the longest prompt plus its tokens (`max_len`). The same ideas as vLLM's
scheduler and S-LoRA's per-request adapters, written for this model: the "adapter" is the
request's memory block.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from hmem.errors import UserError
from hmem.infer import decoder

MAX_TOP_K = 5  # alternatives reported per token (OpenAI's completions limit)
_RETRY_S = 1.0  # between attempts to rebuild the buffers


class QueueFull(UserError):
  """The queue holds `max_queue` waiting prompts: come back later (HTTP 429)."""


class Closing(UserError):
  """The batcher takes no new requests (the server is shutting down)."""


def _no_memory() -> None:
  return None


@dataclasses.dataclass(eq=False)
class Request:
  """One sequence to continue. `emit(token, finish, logprob)` is called from the decode
  thread: with each new token (finish None), then once with finish 'stop' (the EOT: token
  is its id, and `logprob` its logprob when asked, as vLLM reports an EOS), 'length'
  (max_tokens reached), 'error' (`error` says why) or 'abort' (the batcher closed first),
  token None but for 'stop'. `logprob` is (the token's log-probability, [(id, log-probability)] of the
  `logprobs` most likely tokens) when `logprobs` is set, else None. A cancelled request gets no further
  calls. `fetch()` returns the request's memory in host memory, as stored ([1, ...]; None:
  no memory); it runs on a reader thread while the request waits."""

  tokens: Sequence[int]
  max_tokens: int  # 0: the prompt alone (its logprobs), no new token
  emit: Callable[[int | None, str | None, tuple | None], None]
  fetch: Callable[[], dict | None] = _no_memory
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  logprobs: int | None = None  # each new token's logprob and this many alternatives' (None: no logprobs)
  echo: bool = False  # with logprobs: `prompt_logprobs` (None for the first token) is set before the first emit
  cancelled: bool = False
  prompt_logprobs: list | None = None
  error: str | None = None
  memory: dict | None = dataclasses.field(default=None, repr=False)
  state: str = 'queued'  # queued -> reading -> ready | failed


def buckets(slots: int) -> list[int]:
  """Step sizes: powers of two below `slots`, then `slots`."""
  return sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})


class Batcher:
  """Decodes requests in `slots` rows of `max_len` cache slots each; see the module doc."""

  def __init__(self, model, *, slots: int, max_len: int, eot_id: int, memory_shapes: dict | None = None,
               max_queue: int = 1024, readers: int = 4):
    """`memory_shapes`: {name: [layers_m, width, features]} of one row's memory in the
    compute dtype, or None for a model without memory."""
    if slots < 1:
      raise UserError(f'slots={slots}: a server needs at least one slot')
    if max_queue < 1 or readers < 1:
      raise UserError(f'max_queue={max_queue}, readers={readers}: each needs to be at least 1')
    self.slots, self.max_len, self.eot_id = slots, decoder.round_up(max_len, decoder.BUCKET), eot_id
    self.max_queue, self.buckets = max_queue, buckets(slots)
    self._model, self._memory_shapes = model, memory_shapes
    self._graphdef, self._params = nnx.split(model)
    self._cache = self._memory = self._logits_BxV = None
    self._active: list[Request | None] = [None] * slots
    self._count_B = np.zeros(slots, np.int32)
    self._settings = {name: np.zeros(slots, dtype) for name, dtype in
                      (('seed', np.uint32), ('temperature', np.float32), ('top_p', np.float32))}
    self._waiting: collections.deque[Request] = collections.deque()
    self._inputs_key, self._inputs = None, None  # _step_inputs' cache
    self._lock = threading.Condition()
    self._closing = self._aborting = False
    self._broken: str | None = 'starting'  # why the buffers are not there, or None
    self._readers = concurrent.futures.ThreadPoolExecutor(readers, thread_name_prefix='hmem-reader')
    self.steps = 0  # decode steps run (tests and benchmarks read it)
    self.submitted = 0  # requests taken since the start
    self.step_rows: collections.Counter = collections.Counter()  # steps run per bucket
    self._rebuild()
    self._thread = threading.Thread(target=self._loop, name='hmem-batcher', daemon=True)
    self._thread.start()

  # -- the callers' side --------------------------------------------------------------------

  def check(self, prompt_tokens: int, max_tokens: int) -> None:
    """Raises UserError unless a prompt of this length and max_tokens fits a slot."""
    if prompt_tokens < 1:
      raise UserError('the prompt is empty (it encodes to no token)')
    if max_tokens < 0:
      raise UserError(f'max_tokens={max_tokens}: ask for at least zero tokens')
    need = decoder.round_up(prompt_tokens, decoder.BUCKET) + max_tokens
    if need > self.max_len:
      raise UserError(f'the prompt has {prompt_tokens} tokens and max_tokens={max_tokens}: that needs {need} cache '
                      f'slots (prompt rounded up to {decoder.BUCKET}) but a slot holds {self.max_len}; '
                      'shorten the prompt or ask for fewer tokens')

  def submit(self, *requests: Request) -> None:
    """Queues requests, all or none; each joins the batch once its rows are read and a slot
    is free. Raises QueueFull when they do not fit in the queue, Closing when closing."""
    for request in requests:
      self.check(len(request.tokens), request.max_tokens)
      decoder.check_sampling(request.temperature, request.top_p)
      if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_K:
        raise UserError(f'logprobs={request.logprobs}: at most {MAX_TOP_K} alternatives a token')
    with self._lock:
      if self._closing:
        raise Closing('the server is shutting down')
      if len(self._waiting) + len(requests) > self.max_queue:
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        if len(self._waiting) + len(requests) > self.max_queue:
          raise QueueFull(f'the queue holds {len(self._waiting)} waiting prompts (at most {self.max_queue}); '
                          'retry later')
      self._waiting.extend(requests)
      self.submitted += len(requests)
      self._prefetch()
      self._lock.notify_all()

  def cancel(self, request: Request) -> None:
    """Stops a request: no further emit calls; its slot is freed before the next step."""
    with self._lock:
      request.cancelled = True
      self._lock.notify_all()

  @property
  def healthy(self) -> bool:
    """Whether the batcher can serve: running, its buffers in place, not closing."""
    return self._thread.is_alive() and self._broken is None and not self._closing

  @property
  def load(self) -> dict:
    with self._lock:
      return {'slots': self.slots, 'active': sum(r is not None for r in self._active),
              'waiting': sum(not r.cancelled for r in self._waiting), 'max_queue': self.max_queue,
              'submitted': self.submitted,
              **({'problem': self._broken} if self._broken else {})}

  def close(self, timeout: float | None = None) -> None:
    """Takes no new requests, lets the waiting and running ones finish for up to `timeout`
    seconds (None: however long they take), then ends the rest with 'abort' and stops."""
    with self._lock:
      self._closing = True
      self._lock.notify_all()
    self._thread.join(timeout)
    if self._thread.is_alive():
      logging.warning('ending the requests still in flight (%s)', self.load)
      with self._lock:
        self._aborting = True
        self._lock.notify_all()
      self._thread.join()
    self._readers.shutdown(wait=False, cancel_futures=True)

  # -- the decode thread --------------------------------------------------------------------

  def _prefetch(self) -> None:
    """Starts the reads of the first `slots` live waiting requests (with the lock held)."""
    window = 0
    for request in self._waiting:
      if window == self.slots:
        break
      if request.cancelled:
        continue
      window += 1
      if request.state == 'queued':
        request.state = 'reading'
        self._readers.submit(self._read, request)

  def _read(self, request: Request) -> None:
    try:
      memory = None if request.cancelled else request.fetch()
      state, error = 'ready', None
    except Exception as e:  # a damaged bundle, an unreadable row: this request fails, the rest go on
      logging.exception('reading the rows of a request failed')
      memory, state, error = None, 'failed', f'reading its memory rows failed: {e}'
    with self._lock:
      request.memory, request.state, request.error = memory, state, error
      self._lock.notify_all()

  def _has_work(self) -> bool:
    if self._aborting or self._broken or any(self._active) or (self._closing and not self._waiting):
      return True
    return any(r.cancelled or r.state in ('ready', 'failed') for r in self._waiting)

  def _take(self) -> tuple[list[tuple[int, Request]], list[Request]]:
    """(slot, request) of the ready requests that join now, in queue order, and the requests
    whose read failed; drops cancelled ones (with the lock held)."""
    joining, failed, kept = [], [], collections.deque()
    free = [slot for slot, r in enumerate(self._active) if r is None]
    for request in self._waiting:
      if request.cancelled:
        continue
      if request.state == 'failed':
        failed.append(request)
      elif request.state == 'ready' and free and not self._broken:
        slot = free.pop(0)
        self._active[slot] = request
        joining.append((slot, request))
      else:
        kept.append(request)
    self._waiting = kept
    self._prefetch()
    return joining, failed

  def _loop(self) -> None:
    while True:
      with self._lock:
        while not self._has_work():
          self._lock.wait()
        if self._aborting or (self._closing and not self._waiting and not any(self._active)):
          ending = [r for r in (*self._active, *self._waiting) if r is not None]
          self._active, self._waiting = [None] * self.slots, collections.deque()
          break
        joining, failed = self._take()
      for request in failed:
        self._emit(request, None, 'error')
      if self._broken and not self._rebuild():
        time.sleep(_RETRY_S)
        continue
      pending = [request for _, request in joining]  # not yet prefilled
      current: list[Request] = []  # what the work in hand touches
      try:
        for slot, request in joining:
          current = [request]
          self._start(slot, request)
          pending.remove(request)
        current = [r for r in self._active if r is not None]
        self._drop_cancelled()
        if any(self._active):
          self._step()
      except Exception as e:  # a bug or a device failure: fail what it touched, keep serving
        logging.exception('decoding failed')
        self._recover(current, [r for r in pending if r not in current], e)
    for request in ending:
      self._emit(request, None, 'abort')

  def _recover(self, current: list[Request], unstarted: list[Request], error: Exception) -> None:
    """After a failed prefill or step: fails the requests it lost (those it touched, or every
    active one when a donated buffer is gone, and then rebuilds the buffers) and puts the
    requests that were about to join back at the head of the queue."""
    lost = any(a.is_deleted() for a in jax.tree.leaves((self._cache, self._memory, self._logits_BxV)))
    with self._lock:
      victims = [r for r in self._active if r is not None and r not in unstarted] if lost else current
      self._active = [None if r in victims or r in unstarted else r for r in self._active]
      self._waiting.extendleft(reversed(unstarted))
      if lost:
        self._broken = f'decoding failed: {error}'
    for request in victims:
      request.error = f'decoding failed: {error}'
      self._emit(request, None, 'error')
    if lost:
      self._rebuild()

  def _rebuild(self) -> bool:
    """New (empty) device buffers; False when even that fails (the device is out of memory)."""
    try:
      self._cache = self._logits_BxV = self._memory = None
      self._cache = self._model.init_cache(self.slots, self.max_len)
      self._logits_BxV = jnp.zeros((self.slots, self._model.embed.num_embeddings), jnp.float32)
      if self._memory_shapes is not None:
        dtype = self._cache.keys.dtype
        self._memory = {n: jnp.zeros((self.slots, *s), dtype) for n, s in self._memory_shapes.items()}
    except Exception as e:
      logging.exception('the decode buffers cannot be built')
      self._broken = f'the decode buffers cannot be built: {e}'
      return False
    with self._lock:
      self._broken = None
    return True

  def _start(self, slot: int, request: Request) -> None:
    n = len(request.tokens)
    P = decoder.round_up(n, decoder.BUCKET)
    tokens_1xP, segment_ids_1xP = decoder.left_pad([request.tokens], P, self.eot_id)
    top_k = MAX_TOP_K if request.logprobs is not None and request.echo else 0
    memory, request.memory = request.memory, None  # the host copy goes once the block is on the device
    self._cache, self._memory, self._logits_BxV, scores = decoder.prefill_row(
        self._graphdef, self._params, tokens_1xP, segment_ids_1xP, memory, self._cache, self._memory,
        self._logits_BxV, jnp.int32(slot), top_k=top_k)
    if scores is not None:  # entry j scores prompt position j + 1; the prompt starts at P - n
      value_P, ids_PxK, top_PxK = (np.asarray(a) for a in scores)
      request.prompt_logprobs = [None] + [_logprob(value_P[j], ids_PxK[j], top_PxK[j], request.logprobs)
                                          for j in range(P - n, P - 1)]
    self._count_B[slot] = 0
    for name, value in (('seed', request.seed), ('temperature', request.temperature), ('top_p', request.top_p)):
      self._settings[name][slot] = value
    if request.max_tokens == 0:
      self._finish(slot, 'length')

  def _drop_cancelled(self) -> None:
    with self._lock:
      self._active = [None if r is None or r.cancelled else r for r in self._active]

  def _step_inputs(self) -> tuple[int, jax.Array, decoder.Sampling]:
    """(R, done_R, sampling) of the rows in flight, on the device; they change only when a
    request joins or leaves, so a step in between transfers nothing but the counts."""
    key = (tuple(r is None for r in self._active), *(a.tobytes() for a in self._settings.values()))
    if self._inputs_key != key:
      last = max(slot for slot, r in enumerate(self._active) if r is not None)
      R = next(b for b in self.buckets if b > last)
      done_R = jnp.asarray([r is None for r in self._active[:R]])
      sampling = decoder.Sampling(**{name: jnp.asarray(a[:R]) for name, a in self._settings.items()})
      self._inputs_key, self._inputs = key, (R, done_R, sampling)
    return self._inputs

  def _step(self) -> None:
    R, done_R, sampling = self._step_inputs()
    top_k = MAX_TOP_K if any(r is not None and r.logprobs is not None for r in self._active[:R]) else 0
    token_R, _, self._logits_BxV, self._cache, scores = decoder.step(
        self._graphdef, self._params, self._logits_BxV, self._memory, self._cache, done_R, sampling,
        self._count_B[:R].copy(), eot_id=self.eot_id, top_k=top_k, rows=R)
    token_R = np.asarray(token_R)
    if scores is not None:
      value_R, ids_RxK, top_RxK = (np.asarray(a) for a in scores)
    self.steps += 1
    self.step_rows[R] += 1
    for slot, request in enumerate(self._active[:R]):
      if request is None or request.cancelled:
        continue
      token = int(token_R[slot])
      logprob = (None if request.logprobs is None else
                 _logprob(value_R[slot], ids_RxK[slot], top_RxK[slot], request.logprobs))
      if token == self.eot_id:
        self._finish(slot, 'stop', token, logprob)
        continue
      self._count_B[slot] += 1
      self._emit(request, token, None, logprob)
      if self._count_B[slot] >= request.max_tokens:
        self._finish(slot, 'length')

  def _finish(self, slot: int, reason: str, token: int | None = None, logprob=None) -> None:
    with self._lock:
      request, self._active[slot] = self._active[slot], None
    self._emit(request, token, reason, logprob)

  def _emit(self, request: Request, token: int | None, finish: str | None, logprob=None) -> None:
    """Hands the caller an event; a caller whose callback fails is cancelled, the rest go on."""
    if request.cancelled:
      return
    try:
      request.emit(token, finish, logprob)
    except Exception:
      logging.exception('a request callback failed; cancelling the request')
      request.cancelled = True


def _logprob(value, ids_K, top_K, k: int) -> tuple[float, list[tuple[int, float]]]:
  return float(value), [(int(i), float(v)) for i, v in zip(ids_K[:k], top_K[:k])]
