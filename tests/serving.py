"""Helpers of the serve tests: a server on a thread, raw HTTP, a free port."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai

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
  app = make_app(server, shutdown_timeout)
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
