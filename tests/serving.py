"""Helpers of the serve tests: a server on a thread, raw HTTP, a free port."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai

PROMPTS = ('The French Revolution was a period of political and',
           'Photosynthesis is the process by which plants turn',
           'Jazz is a music genre that originated in',
           'Mathematics is a field of study that')
NAME = 'tiny'  # the model id the test servers serve under
TIMEOUT = 120  # seconds: a hang guard for every request and wait, never a timing assertion


def free_socket() -> socket.socket:
  sock = socket.socket()
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(('127.0.0.1', 0))
  return sock


def http(url, body=None, raw: bytes | None = None, headers=None):
  """(status, JSON reply, headers) of a GET, or of a POST of `body` (or `raw` bytes); raw, to
  send what the client would refuse."""
  data = raw if raw is not None else None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data, {'Content-Type': 'application/json', **(headers or {})})
  try:
    with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
      return reply.status, json.loads(reply.read()), reply.headers
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read()), e.headers


@contextlib.contextmanager
def running(server, shutdown_timeout=None):
  """(uvicorn server, openai client, base URL) of `server` (a CompletionServer) on a thread."""
  import uvicorn

  from hmem.infer.server import make_app
  sock = free_socket()
  port = sock.getsockname()[1]
  app = make_app(server) if shutdown_timeout is None else make_app(server, shutdown_timeout)
  config = uvicorn.Config(app, log_level='warning', timeout_graceful_shutdown=None if shutdown_timeout is None
                          else int(shutdown_timeout) + 2)
  uv = uvicorn.Server(config)
  thread = threading.Thread(target=uv.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  base = f'http://127.0.0.1:{port}'
  client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', timeout=TIMEOUT, max_retries=0)
  deadline = time.monotonic() + TIMEOUT
  while not uv.started:
    assert time.monotonic() < deadline and thread.is_alive(), 'the server did not start'
    time.sleep(0.05)
  try:
    yield uv, client, base
  finally:
    uv.should_exit = True
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def wait_until(condition, what: str):
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.01)


def forward_logprobs(source, prompt, mode='fetched'):
  """(log p of each prompt token after the first, the log-probabilities of every token at
  each of those positions [T - 1, V]) by the full forward pass (no cache), fp64 softmax."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  ids = source.tokenizer.encode([prompt])[0]
  tokens_1xT = jnp.asarray(ids, jnp.int32)[None]
  memory = source.memory(source.router.route([prompt]).leaf, mode)
  logits = source.model(tokens_1xT, jnp.ones_like(tokens_1xT), memory)
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64)[:-1], axis=-1)
  return np.asarray(logp)[np.arange(len(ids) - 1), ids[1:]], np.asarray(logp)


def randomize_bank(root, seed=0):
  """Random rows in every bank array of the bundle at `root`, in place: a few training steps
  leave the memory almost a no-op, and tests must see its rows matter. The chunks carry
  their own crc32c, so the manifest's checksums still hold."""
  import numpy as np

  from hmem.bundle.format import open_array, read_manifest
  rng = np.random.default_rng(seed)
  for meta in read_manifest(root)['bank'].values():
    array = open_array(root, meta['path'])
    array.write(rng.normal(0, 0.3, meta['shape']).astype(array.dtype.numpy_dtype)).result()
