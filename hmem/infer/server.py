"""`hmem serve`: an OpenAI-compatible completions server for a trained memory.

Endpoints: `POST /v1/completions` (hmem.infer.api has the fields), `GET /v1/models` (one id
per memory mode: NAME routes each prompt and fetches its path, NAME:generic and NAME:none
are the controls, so a client that cannot send hmem's own fields picks the mode by the
model id, as vLLM lists each LoRA adapter as a model), `GET /health` (503 while the server
cannot serve), and vLLM's tokenizer endpoints that lm-evaluation-harness's
`tokenizer_backend=remote` reads: `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`.

A request is checked, tokenized and routed on arrival (bad input: a 4xx naming the field,
before any work), then its prompts queue in the batcher (hmem.infer.batcher), whose reader
threads read their paths' rows while other requests decode; decoding is shared by every
request in flight (continuous batching). Each choice reports the path it was routed to
(`path`: ["1:2", "2:9"]) and the bundle's `memory_version` (edits committed when its rows
were read; the response's is its choices' latest: a `hmem bank` edit of the served bundle
takes effect for the requests read after its commit, without a restart; hmem.bundle.live). Text is detokenized
incrementally on the decode thread, never on the event loop.

Limits: prompts per request (`max_prompts`, else 400), prompts waiting in the queue
(`max_queue`, else 429 with Retry-After) and body bytes (`max_body_bytes`, else 413). A
client that disconnects has its prompts cancelled at once, streaming or not. SIGTERM (or
Ctrl-C) stops accepting connections, lets the requests in flight finish for
`shutdown_timeout` seconds, ends the rest (a streamed choice gets an error event, a plain
request a 503), and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import secrets
import signal
import socket
import threading
import time
import uuid

import numpy as np
import uvicorn
from absl import logging
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from hmem.bundle.live import LiveBank
from hmem.bundle.reader import Reader
from hmem.data.router import parse_node
from hmem.errors import BundleError, UserError
from hmem.infer import api, decoder, text
from hmem.infer.batcher import Batcher, Closing, QueueFull, Request
from hmem.infer.source import MemorySource

RETRY_AFTER_S = 1  # what a 429 asks a client to wait
_GRACE_S = 5  # after --shutdown-timeout, for the last answers to go out


@dataclasses.dataclass(eq=False)
class Choice:
  """One prompt of a request: what was routed, and its text and logprobs as they arrive."""
  index: int
  ids: np.ndarray
  echo: str  # the prompt's text, handed out first when the request asks for `echo`
  path: list[str] | None
  leaf: int
  completion: text.Completion
  request: Request | None = None
  version: int | None = None  # the bundle's memory version its rows were read at
  logprobs: list = dataclasses.field(default_factory=list)  # (logprob, top) per new token
  eot: tuple | None = None  # (logprob, top) of the EOT that ended it, when logprobs are asked
  sent: int = 0  # new tokens whose logprobs went out (streaming)
  offset: int = 0  # characters of those tokens


@dataclasses.dataclass
class Job:
  """A checked request: its memory mode and its choices."""
  mode: str
  choices: list[Choice]


class CompletionServer:
  """The server's state: the source, its batcher and limits, and request checking (no HTTP here)."""

  def __init__(self, source: MemorySource, *, name: str, slots: int = 16, max_prompts: int = 64,
               max_queue: int = 256, max_body_bytes: int = 4 << 20, readers: int = 4):
    if source.tokenizer is None or (source.has_memory and source.router is None):
      raise BundleError('this run has no tokenizer or tree to read and route text (it trained on synthetic data); '
                        'serve a run trained on a prepared dataset, one made by hmem import, or a bundle')
    for flag, value in (('--max-prompts', max_prompts), ('--max-body-bytes', max_body_bytes)):
      if value < 1:
        raise UserError(f'{flag} {value}: give a positive number')
    self.source, self.name = source, name
    self.max_prompts, self.max_body_bytes = max_prompts, max_body_bytes
    self.tokenizer = source.tokenizer  # a run without memory (hmem import) has no tree: it serves in mode none
    self.context = source.config.data.seq_len
    self.live = LiveBank(source.rows, source.manifest) if isinstance(source.rows, Reader) else None
    shapes = None
    if source.has_memory:
      shapes = source.spec.block_shapes(source.spec.fetch_width)
    self.batcher = Batcher(source.model, slots=slots, max_len=self.context + decoder.BUCKET,
                           eot_id=self.tokenizer.eot_id, memory_shapes=shapes, max_queue=max_queue, readers=readers)
    if not source.has_memory:
      self.modes = ('none',)
    else:
      self.modes = ('fetched', 'generic', 'none') if 'generic' in source.tables else ('fetched', 'none')
    self.created = int(time.time())

  # -- model ids ---------------------------------------------------------------------------

  def model_ids(self) -> dict[str, str]:
    """{model id: memory mode}: the name for the first mode, NAME:MODE for the others."""
    return {self.name if i == 0 else f'{self.name}:{mode}': mode for i, mode in enumerate(self.modes)}

  def model_cards(self) -> list[dict]:
    return [{'id': model, 'object': 'model', 'created': self.created, 'owned_by': 'hmem', 'memory': mode,
             'step': self.source.step, 'context': self.context} for model, mode in self.model_ids().items()]

  # -- checking a request ------------------------------------------------------------------

  def prepare(self, body: api.CompletionRequest) -> Job:
    """Checks, tokenizes and routes a request (rows are read later, by the batcher's
    readers); raises api.Invalid / api.NotFound naming what is wrong."""
    ids = self.model_ids()
    if body.model not in ids:
      raise api.NotFound(f'model {body.model!r} is not served here; this server serves '
                         f'{", ".join(map(repr, ids))} (GET /v1/models)')
    mode = ids[body.model]
    if body.memory is not None and body.memory != mode:
      if body.model != self.name:
        raise api.Invalid('memory', f'memory={body.memory!r} contradicts model {body.model!r} (memory {mode!r}); '
                          'send one of them')
      mode = body.memory
    if mode not in self.modes and self.source.has_memory:
      raise api.Invalid('memory', f'memory={mode!r}: this run trained no generic block; use fetched or none')
    api.check_no_ops(body)
    stop = api.stop_strings(body.stop)
    if body.max_tokens == 0 and not body.echo:
      raise api.Invalid('max_tokens', 'max_tokens=0 makes nothing; ask for at least one token, or echo the prompt')
    if body.max_tokens >= self.context:
      raise api.Invalid('max_tokens', f'max_tokens={body.max_tokens} leaves no room for a prompt in the model\'s '
                        f'{self.context}-token context; ask for fewer tokens')
    if (body.block or body.block_best) and mode != 'fetched':
      raise api.Invalid('block', 'block / block_best route around nodes, so they need memory="fetched" '
                        f'(got {mode!r})')
    m = self.source.config.memory
    try:
      block = [parse_node(node, m.k, m.depth) for node in body.block]
    except BundleError as e:
      raise api.Invalid('block', str(e)) from None
    texts, ids = self._prompts(body.prompt)
    for i, prompt_ids in enumerate(ids):
      if len(prompt_ids) + body.max_tokens > self.context:
        raise api.Invalid('prompt', f'prompt {i} has {len(prompt_ids)} tokens; with max_tokens={body.max_tokens} '
                          f'that is more than the model\'s {self.context}-token context; shorten it or ask for fewer '
                          'tokens')
    leaf = np.zeros(len(ids), np.int64)
    paths: list[list[str] | None] = [None] * len(ids)
    if mode == 'fetched' and self.source.has_memory:
      routes = self.source.router.route(texts, block, body.block_best)
      leaf = routes.leaf
      paths = [[f'{level}:{node}' for level, node in enumerate(path, start=1)] for path in routes.path.tolist()]
    choices = [Choice(i, prompt_ids, texts[i], paths[i], int(leaf[i]), text.Completion(self.tokenizer, stop))
               for i, prompt_ids in enumerate(ids)]
    return Job(mode, choices)

  def _prompts(self, prompt) -> tuple[list[str], list[np.ndarray]]:
    """(text, token ids) per prompt; token-id prompts are decoded for routing and echo."""
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not prompts:
      raise api.Invalid('prompt', 'prompt is an empty list; give a string, a list of strings or of token ids')
    if len(prompts) > self.max_prompts:
      raise api.Invalid('prompt', f'{len(prompts)} prompts in one request; this server takes at most '
                        f'{self.max_prompts} (--max-prompts): split the request')
    if isinstance(prompts[0], str):
      for i, p in enumerate(prompts):
        if not api.is_text(p):
          raise api.Invalid('prompt', f'prompt {i} is not valid text (it holds a lone surrogate); send UTF-8 text')
        if not p.strip():
          raise api.Invalid('prompt', f'prompt {i} is empty or blank; every prompt needs some text to continue')
      return list(prompts), self.tokenizer.encode(prompts)
    vocab = self.tokenizer.vocab_size
    for i, p in enumerate(prompts):
      if not p:
        raise api.Invalid('prompt', f'prompt {i} is an empty list of token ids')
      if not all(0 <= t < vocab for t in p):
        raise api.Invalid('prompt', f'prompt {i} holds token ids outside [0, {vocab}), the tokenizer\'s vocabulary')
    return [self.tokenizer.decode(p) for p in prompts], [np.asarray(p, np.int32) for p in prompts]

  def fetch(self, choice: Choice, mode: str):
    """The reader threads' work for a choice: its rows, as stored, from the bundle's latest
    committed version (recorded in the choice)."""
    leaf_B = np.array([choice.leaf])
    if self.live is None:
      return self.source.host_memory(leaf_B, mode)
    choice.version, memory = self.live.read(lambda rows: self.source.host_memory(leaf_B, mode, rows))
    return memory

  # -- vLLM's tokenizer endpoints -----------------------------------------------------------

  def tokenize(self, prompt: str, add_special_tokens: bool) -> list[int]:
    """Like vLLM's /tokenize: special tokens spelled out (<|endoftext|>) are those tokens
    (completions' text prompts never read them so); `add_special_tokens` puts the BOS first
    when the tokenizer has one."""
    t = self.tokenizer
    specials = {t.token(i): i for i in (t.eot_id, t.bos_id) if i is not None}
    ids = [t.bos_id] if add_special_tokens and t.bos_id is not None else []
    for part in re.split('(' + '|'.join(map(re.escape, specials)) + ')', prompt):
      if part in specials:
        ids.append(specials[part])
      elif part:
        ids.extend(int(i) for i in t.encode([part], start=False)[0])
    return ids

  def tokenizer_info(self) -> dict:
    t = self.tokenizer
    return {'tokenizer_class': 'hmem', 'eos_token': t.token(t.eot_id),
            'bos_token': None if t.bos_id is None else t.token(t.bos_id), 'pad_token': None,
            'model_max_length': self.context, 'vocab_size': t.vocab_size}


class _BodyLimit:
  """ASGI middleware: a request body over `limit` bytes gets a 413 before it is parsed."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    length = dict(scope['headers']).get(b'content-length')
    too_big = length is not None and length.isdigit() and int(length) > self.limit
    body, more = [], not too_big
    while more:
      message = await receive()
      if message['type'] != 'http.request':
        return
      body.append(message.get('body', b''))
      more = message.get('more_body', False)
      too_big = sum(map(len, body)) > self.limit
      if too_big:
        break
    if too_big:
      reply = api.error(413, f'the request body is over {self.limit} bytes (--max-body-bytes); send fewer or '
                        'shorter prompts', 'body')
      return await reply(scope, receive, send)
    replayed = False

    async def replay():
      nonlocal replayed
      if replayed:
        return await receive()
      replayed = True
      return {'type': 'http.request', 'body': b''.join(body), 'more_body': False}

    return await self.app(scope, replay, send)


def make_app(server: CompletionServer, shutdown_timeout: float | None = None):
  """The FastAPI application over a CompletionServer; its shutdown drains the batcher for up
  to `shutdown_timeout` seconds (None: however long it takes)."""
  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    await run_in_threadpool(server.batcher.close, shutdown_timeout)

  app = FastAPI(title='hmem', lifespan=lifespan)
  app.add_middleware(_BodyLimit, limit=server.max_body_bytes)

  @app.exception_handler(RequestValidationError)
  async def invalid(request: HttpRequest, exc: RequestValidationError):
    problems = []
    for err in exc.errors():
      where = '.'.join(str(part) for part in err['loc'] if part != 'body') or 'body'
      problems.append(f'{where}: {err["msg"]}' + (' (not an hmem or OpenAI completions field)'
                                                  if err['type'] == 'extra_forbidden' else ''))
    param = next((str(e['loc'][1]) for e in exc.errors() if len(e['loc']) > 1), None)
    return api.error(400, 'invalid request: ' + '; '.join(dict.fromkeys(problems)), param)

  @app.get('/health')
  async def health():
    load = server.batcher.load
    if not server.batcher.healthy:
      return api.error(503, f'the server cannot serve now: {load.get("problem", "shutting down")}', kind='unavailable')
    return {'status': 'ok', **load}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': server.model_cards()}

  @app.get('/tokenizer_info')
  async def tokenizer_info():
    return server.tokenizer_info()

  @app.post('/tokenize')
  async def tokenize(body: api.TokenizeRequest):
    if not api.is_text(body.prompt):
      return api.error(400, 'prompt is not valid text (a lone surrogate); send UTF-8 text', 'prompt')
    tokens = await run_in_threadpool(server.tokenize, body.prompt, body.add_special_tokens)
    return {'count': len(tokens), 'max_model_len': server.context, 'tokens': tokens, 'token_strs': None}

  @app.post('/detokenize')
  async def detokenize(body: api.DetokenizeRequest):
    if not all(0 <= t < server.tokenizer.vocab_size for t in body.tokens):
      return api.error(400, f'tokens must lie in [0, {server.tokenizer.vocab_size})', 'tokens')
    return {'prompt': await run_in_threadpool(server.tokenizer.decode, body.tokens)}

  @app.post('/v1/completions')
  async def completions(body: api.CompletionRequest, http: HttpRequest):
    try:
      job = await run_in_threadpool(server.prepare, body)
    except api.NotFound as e:
      return api.error(404, str(e), 'model', 'not_found_error')
    except api.Invalid as e:
      return api.error(e.status, str(e), e.param)
    except UserError as e:
      return api.error(400, str(e))
    return await _complete(server, job, body, http)

  return app


async def _complete(server: CompletionServer, job: Job, body: api.CompletionRequest, http: HttpRequest):
  """Queues a checked request's prompts and answers as their tokens arrive."""
  loop = asyncio.get_running_loop()
  events: asyncio.Queue = asyncio.Queue()
  post = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
  logprobs = body.logprobs
  for choice in job.choices:
    def emit(token, finish, logprob, c=choice):  # on the decode thread: text work stays off the event loop
      if finish is not None:
        c.eot = logprob if finish == 'stop' else None
        post((c.index, c.completion.finish() if finish in ('stop', 'length') else '', finish))
        return
      out = c.completion.add(token)
      if logprob is not None:
        c.logprobs.append(logprob)
      if c.completion.stopped:
        server.batcher.cancel(c.request)  # no further calls: the choice ends here
        post((c.index, out, 'stop'))
      elif out:
        post((c.index, out, None))
    # Each prompt of an unseeded request draws its own seed; a seeded one draws as `hmem generate --seed`.
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    choice.request = Request(choice.ids, body.max_tokens, emit, lambda c=choice: server.fetch(c, job.mode),
                             temperature=body.temperature, top_p=body.top_p, seed=seed, logprobs=logprobs,
                             echo=body.echo)
  requests = [c.request for c in job.choices]
  try:
    server.batcher.submit(*requests)
  except QueueFull as e:
    return api.error(429, str(e), kind='rate_limit_error', headers={'Retry-After': str(RETRY_AFTER_S)})
  except Closing as e:
    return api.error(503, str(e), kind='unavailable')
  except UserError as e:
    return api.error(400, str(e))

  def cancel_all():
    for request in requests:
      server.batcher.cancel(request)

  head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion', 'created': int(time.time()),
          'model': body.model, 'memory': job.mode}

  def choice_json(c: Choice, text_: str, finish, first: bool, last: bool) -> dict:
    echo = first and body.echo
    out = {'index': c.index, 'text': (c.echo if echo else '') + text_, 'logprobs': None, 'finish_reason': finish,
           'path': c.path, 'memory_version': c.version}
    if logprobs is not None:  # those of the tokens since the last chunk (an echoed prompt's first)
      start = c.sent
      end = max(start, c.completion.kept_tokens() if last else len(c.logprobs))
      tokens, pieces_ = c.completion.tokens[start:end], c.completion.pieces[start:end]
      entries, offset = c.logprobs[start:end], c.offset + (len(c.echo) if body.echo else 0)
      if echo:
        prompt = c.request.prompt_logprobs or [None] * len(c.ids)
        tokens, pieces_, entries, offset = [*c.ids, *tokens], [*text.pieces(server.tokenizer, c.ids), *pieces_], \
            [*prompt, *entries], 0
      c.sent, c.offset = end, c.offset + sum(map(len, c.completion.pieces[start:end]))
      if last and c.eot is not None:  # the EOT ends no text but is a token with its logprob (as in vLLM)
        tokens, pieces_, entries = [*tokens, server.tokenizer.eot_id], [*pieces_, ''], [*entries, c.eot]
      out['logprobs'] = api.logprobs_object(server.tokenizer, tokens, pieces_, entries, offset)
    return out

  def usage() -> dict:
    prompt_tokens = sum(len(c.ids) for c in job.choices)
    made = sum(len(c.completion.tokens) for c in job.choices)
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': made, 'total_tokens': prompt_tokens + made}

  def version():
    versions = {c.version for c in job.choices} - {None}
    return max(versions) if versions else (None if server.live is None else server.live.version)

  async def pieces():
    """(choice index, new text, finish reason or None) until every choice has ended."""
    open_ = len(requests)
    try:
      while open_:
        i, piece, finish = await events.get()
        if i is None:  # the client went away
          return
        open_ -= finish is not None
        yield i, piece, finish
    finally:  # the client went away, or the stream was cancelled: free the slots
      cancel_all()

  if body.stream:
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def sse():
      started = set()
      async for i, piece, finish in pieces():
        c = job.choices[i]
        if finish in ('error', 'abort'):
          message = (c.request.error or 'decoding failed') if finish == 'error' else \
              'the server shut down before this completion finished'
          yield f'data: {json.dumps({"error": {"message": message, "type": "server_error", "index": i}})}\n\n'
          continue
        chunk = {**head, 'memory_version': version(),
                 'choices': [choice_json(c, piece, finish, i not in started, finish is not None)]}
        started.add(i)
        if include_usage:
          chunk['usage'] = None
        yield f'data: {json.dumps(chunk)}\n\n'
      if include_usage:
        yield f'data: {json.dumps({**head, "memory_version": version(), "choices": [], "usage": usage()})}\n\n'
      yield 'data: [DONE]\n\n'

    return StreamingResponse(sse(), media_type='text/event-stream')

  async def watch():
    """Cancels the prompts as soon as the client disconnects (the server would otherwise
    decode them to their end for nobody)."""
    while (await http.receive())['type'] != 'http.disconnect':
      pass
    cancel_all()
    events.put_nowait((None, None, None))

  watcher = asyncio.create_task(watch())
  texts, finishes = [[] for _ in requests], [None] * len(requests)
  try:
    async for i, piece, finish in pieces():
      texts[i].append(piece)
      finishes[i] = finish or finishes[i]
  finally:
    watcher.cancel()
  if 'error' in finishes:
    reason = next(c.request.error for c, f in zip(job.choices, finishes) if f == 'error')
    return api.error(500, f'{reason or "decoding failed"}; see the server log', kind='server_error')
  if None in finishes:  # the client went away: nobody reads this
    return api.error(499, 'the client closed the connection', kind='client_closed')
  if 'abort' in finishes:
    return api.error(503, 'the server shut down before this completion finished', kind='unavailable')
  choices = [choice_json(c, ''.join(texts[c.index]), finishes[c.index], True, True) for c in job.choices]
  return {**head, 'memory_version': version(), 'choices': choices, 'usage': usage()}


def serve(source: MemorySource, *, host: str = '127.0.0.1', port: int = 8000, name: str = 'hmem',
          shutdown_timeout: float = 30.0, **limits) -> None:
  """Serves until SIGTERM or Ctrl-C, then drains for up to `shutdown_timeout` seconds and
  returns. `limits`: CompletionServer's slots, max_prompts, max_queue, max_body_bytes, readers."""
  def stop(signum, frame):
    raise SystemExit(0)

  if not shutdown_timeout >= 0:
    raise UserError(f'--shutdown-timeout {shutdown_timeout}: give a number of seconds >= 0')
  sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:  # before any model state is built
    sock.bind((host, port))
  except OSError as e:
    raise UserError(f'cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host') from None
  # While it runs, uvicorn handles SIGTERM/SIGINT itself (stop accepting, drain, shut
  # down) and then raises the signal again: this handler turns that, or a signal before
  # serving starts, into a clean exit 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, stop)
  server = CompletionServer(source, name=name, **limits)
  app = make_app(server, shutdown_timeout)
  # uvicorn waits for open connections up to its own timeout, then cancels them: a
  # streaming client that stopped reading cannot hold the exit. The batcher ends what is
  # left at `shutdown_timeout` (handle_exit below), and the answers saying so go out in
  # the grace after it (a step, or a compile, in progress delays them).
  config = uvicorn.Config(app, log_level='info', timeout_keep_alive=5,
                          timeout_graceful_shutdown=int(shutdown_timeout) + _GRACE_S)
  http = _Server(config, server.batcher, shutdown_timeout)
  logging.info('serving %s on http://%s:%d/v1 with %d slots', ', '.join(server.model_ids()), host, port,
               server.batcher.slots)
  http.run(sockets=[sock])


class _Server(uvicorn.Server):
  """uvicorn's server; SIGTERM/SIGINT also start the drain's clock: what the batcher still
  holds `shutdown_timeout` seconds later is ended."""

  def __init__(self, config, batcher: Batcher, shutdown_timeout: float):
    super().__init__(config)
    self.batcher, self.shutdown_timeout = batcher, shutdown_timeout

  def handle_exit(self, sig, frame):
    super().handle_exit(sig, frame)
    timer = threading.Timer(self.shutdown_timeout, self.batcher.close, args=(0,))
    timer.daemon = True
    timer.start()
