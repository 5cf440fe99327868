"""`hmem serve`: an OpenAI-compatible completions server for a trained memory.

Endpoints: `POST /v1/completions` (the OpenAI completions API: `prompt` as a string or a
list, `max_tokens`, `temperature`, `top_p`, `stop`, `stream` as server-sent events, `seed`;
plus hmem's `memory` = fetched | generic | none and `block` / `block_best`), `GET /v1/models`
and `GET /health`. Each prompt is routed when its request arrives and its path's rows are
read then (a bundle's Reader keeps hot rows in its LRU cache); decoding is shared by every
request in flight through continuous batching (hmem.infer.batcher). Each choice reports the
path it was routed to (`path`: ["1:2", "2:9"], node ids per level; null without routing).

A bad request gets a 4xx JSON error in OpenAI's shape ({"error": {"message", "type",
"param"}}) naming the field and the fix; the server keeps serving. SIGTERM (or Ctrl-C)
stops accepting connections, finishes the requests in flight, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import time
import uuid
from typing import Literal

import numpy as np
from absl import logging
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hmem.data.router import parse_node
from hmem.errors import BundleError, UserError
from hmem.infer import decoder
from hmem.infer.batcher import Batcher, Request
from hmem.infer.source import MODES, MemorySource
from hmem.memory import bank as memory_bank


class CompletionRequest(BaseModel):
  """The request body. Unknown fields are refused (a misspelt one would otherwise be
  silently ignored); OpenAI fields hmem does not implement are accepted only at their
  no-op values."""
  model_config = ConfigDict(extra='forbid')
  model: str
  prompt: str | list[str]
  max_tokens: int = Field(16, ge=1)
  temperature: float = Field(1.0, ge=0)
  top_p: float = Field(1.0, gt=0, le=1)
  stop: str | list[str] | None = None
  stream: bool = False
  seed: int | None = Field(None, ge=0, lt=2**32)
  n: Literal[1] = 1
  best_of: Literal[1] | None = None
  echo: Literal[False] = False
  logprobs: None = None
  user: str | None = None
  stream_options: dict | None = None
  memory: Literal[MODES] = 'fetched'
  block: list[str] = []
  block_best: bool = False


class _Choice:
  """One prompt's text as its tokens arrive: stop strings cut it, and text that might still
  become a stop string (or an unfinished UTF-8 character) is held back until it cannot."""

  def __init__(self, tokenizer, stop: list[str]):
    self.tokenizer, self.stop = tokenizer, stop
    self.tokens: list[int] = []
    self.sent = 0  # characters handed out so far
    self.hold = max(map(len, stop), default=1) - 1

  def add(self, token: int) -> tuple[str, bool]:
    """(new text to hand out, whether a stop string ended it)."""
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
    if cut >= 0:
      return self._take(text[:cut]), True
    safe = text[:len(text) - self.hold].rstrip('\ufffd')
    return self._take(safe), False

  def rest(self) -> str:
    return self._take(self.tokenizer.decode(self.tokens))

  def _take(self, upto: str) -> str:
    new = upto[self.sent:]
    self.sent = max(self.sent, len(upto))
    return new


class CompletionServer:
  """The server's state: the source, its batcher, and the request handling (no HTTP here)."""

  def __init__(self, source: MemorySource, *, name: str, slots: int = 16):
    if source.tokenizer is None or (source.has_memory and source.router is None):
      raise BundleError('this run has no tokenizer or tree to read and route text (it trained on synthetic data); '
                        'serve a run trained on a prepared dataset, one made by hmem import, or a bundle')
    self.source, self.name = source, name
    self.tokenizer = source.tokenizer  # a run without memory (hmem import) has no tree: it serves in mode none
    self.context = source.config.data.seq_len
    memory_row = None
    if source.has_memory:  # a row of zeros: no memory (the shapes of a fetched block)
      shapes = memory_bank.block_shapes(source.config, sum(int(r) for r in source.config.memory.levels))
      memory_row = {n: np.zeros((1, *s), source.dtype) for n, s in shapes.items()}
    self.batcher = Batcher(source.model, slots=slots, max_len=self.context + decoder.BUCKET,
                           eot_id=self.tokenizer.eot_id, memory_row=memory_row)
    self.created = int(time.time())

  def prepare(self, body) -> tuple[list[np.ndarray], list[dict | None], list[list[str] | None]]:
    """(token ids, memory, routed path) per prompt; UserError names what is wrong with the request.
    Routing and the rows' reads happen here, before the request joins the batch."""
    if body.model != self.name:
      raise _NotFound(f'model {body.model!r} is not served here; this server serves {self.name!r} (GET /v1/models)')
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
      raise _Invalid('prompt', 'prompt is an empty list; give a string or a list of strings')
    for i, prompt in enumerate(prompts):
      if not prompt:
        raise _Invalid('prompt', f'prompt {i} is empty; every prompt needs some text to continue')
    if body.max_tokens >= self.context:
      raise _Invalid('max_tokens', f'max_tokens={body.max_tokens} leaves no room for a prompt in the model\'s '
                     f'{self.context}-token context; ask for fewer tokens')
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if any(not s for s in stop):
      raise _Invalid('stop', 'stop strings must not be empty')
    if (body.block or body.block_best) and body.memory != 'fetched':
      raise _Invalid('block', 'block / block_best route around nodes, so they need memory="fetched" '
                     f'(got {body.memory!r})')
    m = self.source.config.memory
    try:
      block = [parse_node(node, m.k, m.depth) for node in body.block]
    except BundleError as e:
      raise _Invalid('block', str(e)) from None
    ids = self.tokenizer.encode(prompts)
    for i, prompt_ids in enumerate(ids):
      if len(prompt_ids) + body.max_tokens > self.context:
        raise _Invalid('prompt', f'prompt {i} has {len(prompt_ids)} tokens; with max_tokens={body.max_tokens} that is '
                       f'more than the model\'s {self.context}-token context; shorten it or ask for fewer tokens')
    leaf = np.zeros(len(prompts), np.int64)
    paths: list[list[str] | None] = [None] * len(prompts)
    if body.memory == 'fetched' and self.source.has_memory:
      routes = self.source.router.route(prompts, block, body.block_best)
      leaf = routes.leaf
      paths = [[f'{level}:{node}' for level, node in enumerate(path, start=1)] for path in routes.path.tolist()]
    memory = self.source.memory(leaf, body.memory)
    rows = [None if memory is None else {n: a[i:i + 1] for n, a in memory.items()} for i in range(len(prompts))]
    return ids, rows, paths

  def model_card(self) -> dict:
    return {'id': self.name, 'object': 'model', 'created': self.created, 'owned_by': 'hmem',
            'step': self.source.step, 'memory': self.source.has_memory, 'context': self.context}


class _Invalid(UserError):
  """A request field that cannot be served (HTTP 400)."""

  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param = param


class _NotFound(UserError):
  """A model this server does not serve (HTTP 404)."""


def _error(status: int, message: str, param: str | None = None, kind: str = 'invalid_request_error'):
  return JSONResponse({'error': {'message': message, 'type': kind, 'param': param, 'code': None}}, status_code=status)


def make_app(server: CompletionServer):
  """The FastAPI application over a CompletionServer; its shutdown drains the batcher."""
  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    await run_in_threadpool(server.batcher.close)

  app = FastAPI(title='hmem', lifespan=lifespan)

  @app.exception_handler(RequestValidationError)
  async def invalid(request: HttpRequest, exc: RequestValidationError):
    problems = []
    for err in exc.errors():
      where = '.'.join(str(part) for part in err['loc'] if part != 'body') or 'body'
      problems.append(f'{where}: {err["msg"]}' + (' (not an hmem or OpenAI completions field)'
                                                  if err['type'] == 'extra_forbidden' else ''))
    param = next((str(e['loc'][1]) for e in exc.errors() if len(e['loc']) > 1), None)
    return _error(400, 'invalid request: ' + '; '.join(problems), param)

  @app.get('/health')
  async def health():
    return {'status': 'ok', **server.batcher.load}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [server.model_card()]}

  @app.post('/v1/completions')
  async def completions(body: CompletionRequest):
    try:
      ids, memory, paths = await run_in_threadpool(server.prepare, body)
    except _NotFound as e:
      return _error(404, str(e), 'model', 'not_found_error')
    except _Invalid as e:
      return _error(400, str(e), e.param)
    except UserError as e:
      return _error(400, str(e))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    requests = []
    for i, prompt_ids in enumerate(ids):
      emit = lambda token, finish, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, token, finish))
      requests.append(Request(prompt_ids, memory[i], body.max_tokens, emit, temperature=body.temperature,
                              top_p=body.top_p, seed=seed, prompt_index=i))
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    choices = [_Choice(server.tokenizer, stop) for _ in ids]
    try:
      for request in requests:
        server.batcher.submit(request)
    except UserError as e:
      for request in requests:
        server.batcher.cancel(request)
      return _error(503 if 'shutting down' in str(e) else 400, str(e))
    head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion', 'created': int(time.time()),
            'model': server.name, 'memory': body.memory}

    async def pieces():
      """(choice index, new text, finish reason or None) as tokens arrive, until every choice ends."""
      open_ = len(requests)
      try:
        while open_:
          i, token, finish = await events.get()
          if requests[i].cancelled:
            continue
          if finish is not None:
            open_ -= 1
            yield i, choices[i].rest() if finish != 'error' else '', finish
            continue
          text, stopped = choices[i].add(token)
          if stopped:
            server.batcher.cancel(requests[i])
            open_ -= 1
            yield i, text, 'stop'
          elif text:
            yield i, text, None
      finally:  # the client went away, or a stop string ended a choice: free the slots
        for request in requests:
          server.batcher.cancel(request)

    def choice(i, text, finish):
      return {'index': i, 'text': text, 'logprobs': None, 'finish_reason': finish, 'path': paths[i]}

    if body.stream:
      async def sse():
        async for i, text, finish in pieces():
          if finish == 'error':
            yield f'data: {json.dumps({"error": {"message": "decoding failed; see the server log"}})}\n\n'
            continue
          yield f'data: {json.dumps({**head, "choices": [choice(i, text, finish)]})}\n\n'
        yield 'data: [DONE]\n\n'
      return StreamingResponse(sse(), media_type='text/event-stream')

    texts, finishes = [''] * len(ids), [None] * len(ids)
    async for i, text, finish in pieces():
      texts[i] += text
      finishes[i] = finish or finishes[i]
    if 'error' in finishes:
      return _error(500, 'decoding failed; see the server log', kind='server_error')
    made = [len(c.tokens) for c in choices]
    prompt_tokens = sum(len(x) for x in ids)
    return {**head, 'choices': [choice(i, texts[i], finishes[i]) for i in range(len(ids))],
            'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': sum(made),
                      'total_tokens': prompt_tokens + sum(made)}}

  return app


def serve(source: MemorySource, *, host: str = '127.0.0.1', port: int = 8000, name: str = 'hmem',
          slots: int = 16) -> None:
  """Serves until SIGTERM or Ctrl-C, then finishes the requests in flight and returns."""
  import uvicorn

  def stop(signum, frame):
    raise SystemExit(0)

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
  server = CompletionServer(source, name=name, slots=slots)
  config = uvicorn.Config(make_app(server), log_level='info', timeout_keep_alive=5)
  logging.info('serving %s on http://%s:%d/v1 with %d slots', name, host, port, slots)
  uvicorn.Server(config).run(sockets=[sock])
