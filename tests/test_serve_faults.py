"""`hmem serve` under many, careless or departing clients, device faults and an operator:
bounded admission (400, 413, 429 with Retry-After), queued prompts hold no device memory,
a failed prefill or step fails only the requests it must and serving goes on (/health 503
while it cannot), a client that disconnects is cancelled at once, SIGTERM drains with a
time limit and exits 0, and bank edits committed while requests stream take effect for
later requests without failing any. Faults are injected by wrapping `hmem.infer.decoder`'s
jitted functions; servers run on threads (SIGTERM: `hmem serve` in a subprocess)."""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from http.client import HTTPConnection

import jax
import numpy as np
import pytest
from serving import NAME, PROMPTS, TIMEOUT, free_socket, http, randomize_bank, running, wait_until

from hmem.bundle import edit
from hmem.infer import decoder
from hmem.infer.decoder import complete
from hmem.infer.server import CompletionServer
from hmem.infer.source import open_source


@pytest.fixture(scope='module')
def bundle(memory_bundle, tmp_path_factory):
  """A copy of the shared float32 bundle (the edit tests change it)."""
  out = tmp_path_factory.mktemp('serve_faults') / 'bundle'
  shutil.copytree(memory_bundle, out)
  return out


@pytest.fixture(scope='module')
def source(bundle):
  return open_source(bundle=str(bundle))


class Gate:
  """Wraps a decoder function: `hold()` makes calls wait until `release()`; `fail_next(after)`
  makes the next call raise, before it runs or `after` it ran (its donated buffers gone);
  `delay` seconds are added to each call. Used as a context inside `running(...)`, so a
  failing test releases it before the server stops."""

  def __init__(self, monkeypatch, name):
    self.real, self.open, self.calls, self.delay = getattr(decoder, name), threading.Event(), 0, 0.0
    self.open.set()
    self.failing = None
    monkeypatch.setattr(decoder, name, self)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.failing, self.delay = None, 0.0
    self.release()

  def hold(self):
    self.open.clear()

  def release(self):
    self.open.set()

  def fail_next(self, after: bool):
    self.failing = 'after' if after else 'before'

  def __call__(self, *args, **kwargs):
    self.calls += 1
    assert self.open.wait(TIMEOUT)
    time.sleep(self.delay)
    failing, self.failing = self.failing, None
    if failing == 'before':
      raise RuntimeError('injected failure before the call')
    out = self.real(*args, **kwargs)
    if failing == 'after':
      jax.block_until_ready(out)
      raise RuntimeError('injected device failure')
    return out


def _connect(base, rcvbuf=None) -> socket.socket:
  host, port = base.removeprefix('http://').split(':')
  sock = socket.socket()
  if rcvbuf:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
  sock.settimeout(TIMEOUT)
  sock.connect((host, int(port)))
  return sock


def _post(sock, body: dict) -> None:
  data = json.dumps(body).encode()
  sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
               b'Content-Length: %d\r\n\r\n%s' % (len(data), data))


def _ask(base, prompt, model=NAME, **body):
  return http(f'{base}/v1/completions', {'model': model, 'prompt': prompt, 'temperature': 0, **body})


def _stream(base, prompt, first: threading.Event | None = None, **body):
  """The text, finish reasons, memory versions and errors of a streamed request."""
  url = base.removeprefix('http://')
  conn = HTTPConnection(url, timeout=TIMEOUT)
  conn.request('POST', '/v1/completions', json.dumps({'model': NAME, 'prompt': prompt, 'temperature': 0,
                                                        'stream': True, **body}), {'Content-Type': 'application/json'})
  reply = conn.getresponse()
  assert reply.status == 200, reply.read()
  text, finishes, versions, errors = '', [], set(), []
  for line in reply:
    if not line.startswith(b'data: ') or line.strip() == b'data: [DONE]':
      continue
    event = json.loads(line[6:])
    if 'error' in event:
      errors.append(event['error']['message'])
    else:
      text += event['choices'][0]['text']
      finishes.append(event['choices'][0]['finish_reason'])
      versions.add(event.get('memory_version'))
    if first is not None:
      first.set()
  conn.close()
  return text, [f for f in finishes if f], versions, errors


def test_admission_limits_answer_before_any_work(source, monkeypatch):
  """Prompts per request (400), body bytes (413, also when chunked) and the queue (429 with
  Retry-After) are bounded: one request could queue any number of prompts, each holding its
  memory block on the device (a 2,000-prompt request was accepted)."""
  server = CompletionServer(source, name=NAME, slots=1, max_prompts=3, max_queue=2, max_body_bytes=3000)
  with running(server) as (_, _, base), Gate(monkeypatch, 'step') as step:
    status, reply, _ = _ask(base, list(PROMPTS), max_tokens=2)
    assert status == 400 and reply['error']['param'] == 'prompt' and 'at most 3' in reply['error']['message']
    status, reply, _ = _ask(base, 'word ' * 700, max_tokens=2)
    assert status == 413 and '3000 bytes' in reply['error']['message']
    conn = HTTPConnection(base.removeprefix('http://'), timeout=TIMEOUT)
    body = json.dumps({'model': NAME, 'prompt': 'word ' * 700}).encode()
    conn.request('POST', '/v1/completions', body=iter([body[:1000], body[1000:]]), encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    step.hold()  # one request in the slot, two prompts waiting: the queue is full
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      running_ = pool.submit(_ask, base, PROMPTS[0], max_tokens=3)
      wait_until(lambda: server.batcher.load['active'] == 1, 'the first request to start')
      queued = pool.submit(_ask, base, PROMPTS[1:3], max_tokens=3)
      wait_until(lambda: server.batcher.load['waiting'] == 2, 'two prompts to queue')
      status, reply, headers = _ask(base, PROMPTS[3], max_tokens=3)
      assert status == 429 and headers['Retry-After'] == '1' and 'queue' in reply['error']['message']
      step.release()
      assert running_.result(TIMEOUT)[0] == 200 and queued.result(TIMEOUT)[0] == 200
    assert _ask(base, PROMPTS[3], max_tokens=3)[0] == 200


def test_queued_prompts_hold_no_device_memory(source, monkeypatch):
  """A waiting prompt's block stays on the host, and only the next `slots` are read ahead: the
  device holds the slots' buffers whatever the queue (each queued prompt's block was built
  on the device when it was routed)."""
  server = CompletionServer(source, name=NAME, slots=1)
  reads = []
  read = source.rows.read
  monkeypatch.setattr(source.rows, 'read', lambda requests: reads.append(requests) or read(requests))
  block = source.spec.block_shapes(source.spec.fetch_width)
  block_bytes = sum(4 * int(np.prod(s)) for s in block.values())
  device_bytes = lambda: sum(a.nbytes for a in jax.live_arrays())
  with running(server) as (_, _, base), concurrent.futures.ThreadPoolExecutor(2) as pool, \
      Gate(monkeypatch, 'step') as step:
    step.hold()
    first = pool.submit(_ask, base, PROMPTS[0], max_tokens=2)
    wait_until(lambda: server.batcher.load['active'] == 1, 'the first request to start')
    before = device_bytes()
    many = pool.submit(_ask, base, list(PROMPTS) * 8, max_tokens=2)
    wait_until(lambda: server.batcher.load['waiting'] == 32, '32 prompts to queue')
    time.sleep(0.5)  # the read-ahead
    grown = device_bytes() - before
    assert grown < block_bytes, (grown, block_bytes)  # 32 blocks would be 32 * block_bytes
    assert len(reads) == 2  # the running request's rows and the next one's (one slot), not the queue's
    step.release()
    assert first.result(TIMEOUT)[0] == 200 and many.result(TIMEOUT)[0] == 200


def test_a_failed_step_fails_only_its_requests_and_serving_goes_on(source, monkeypatch):
  """A prefill that fails leaves the other requests decoding; a step that fails after its
  buffers were donated fails the requests in it, the buffers are rebuilt (/health 503 until
  they are) and later requests are served as before (the lost buffers failed every later
  request while /health said ok)."""
  import hmem.model.transformer as transformer
  expected = [complete(source, p, max_new_tokens=12)[1] for p in PROMPTS[:2]]
  server = CompletionServer(source, name=NAME, slots=2)
  with running(server) as (_, _, base), concurrent.futures.ThreadPoolExecutor(2) as pool, \
      Gate(monkeypatch, 'step') as step, Gate(monkeypatch, 'prefill_row') as prefill:
    # A failed prefill: only the joining request fails; the one decoding beside it goes on.
    step.delay = 0.02
    started = threading.Event()
    streaming = pool.submit(_stream, base, PROMPTS[0], started, max_tokens=12)
    assert started.wait(TIMEOUT)
    prefill.fail_next(after=False)
    status, reply, _ = _ask(base, PROMPTS[1], max_tokens=12)
    text, _, _, errors = streaming.result(TIMEOUT)
    assert not errors and text == expected[0], errors  # the request beside it went on
    assert status == 500 and 'injected failure' in reply['error']['message']
    # A failed step that lost the buffers, and a rebuild that fails until the device recovers.
    step.delay = 0.0
    init_cache, recovered = transformer.Transformer.init_cache, threading.Event()

    def failing_init(model, *args):
      if not recovered.is_set():
        raise RuntimeError('injected out of memory')
      return init_cache(model, *args)

    monkeypatch.setattr(transformer.Transformer, 'init_cache', failing_init)
    step.fail_next(after=True)
    status, reply, _ = _ask(base, PROMPTS[0], max_tokens=12)
    assert status == 500 and 'injected device failure' in reply['error']['message']
    # The failed request is answered before the rebuild is tried: /health says 503 throughout,
    # naming the decode failure, then the failed rebuild.
    status, reply, _ = http(f'{base}/health')
    assert status == 503 and 'injected' in reply['error']['message']
    wait_until(lambda: 'injected out of memory' in http(f'{base}/health')[1]['error']['message'],
               '/health to name the failed rebuild')
    waiting = pool.submit(_ask, base, PROMPTS[1], max_tokens=12)  # waits for the device
    wait_until(lambda: server.batcher.load['waiting'] == 1, 'a request to wait')
    recovered.set()
    assert waiting.result(TIMEOUT)[1]['choices'][0]['text'] == expected[1]
    assert http(f'{base}/health')[0] == 200
    assert [_ask(base, p, max_tokens=12)[1]['choices'][0]['text'] for p in PROMPTS[:2]] == expected


@pytest.mark.parametrize('stream', [False, True])
def test_a_client_that_disconnects_is_cancelled_at_once(source, monkeypatch, stream):
  """Its prompts leave their slots within a step or so (a plain request's client was never
  noticed: its prompts decoded to max_tokens for nobody)."""
  server = CompletionServer(source, name=NAME, slots=2)
  with running(server) as (_, _, base), Gate(monkeypatch, 'step') as step:
    step.delay = 0.02
    sock = _connect(base)
    _post(sock, {'model': NAME, 'prompt': [PROMPTS[0], PROMPTS[1]], 'max_tokens': 40, 'temperature': 0,
                 'stream': stream})
    wait_until(lambda: server.batcher.steps >= 3, 'decoding to start')
    sock.close()
    left_at = server.batcher.steps
    wait_until(lambda: server.batcher.load['active'] == 0, 'the slots to free')
    assert server.batcher.steps - left_at <= 3, (left_at, server.batcher.steps)  # not 40 steps
    assert _ask(base, PROMPTS[2], max_tokens=2)[0] == 200


def _serve(bundle, tmp_path, *flags):
  """`hmem serve` in a subprocess: (process, base URL, log path) once /health answers."""
  sock = free_socket()
  port = sock.getsockname()[1]
  sock.close()
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)}
  log = tmp_path / 'serve.log'
  proc = subprocess.Popen([sys.executable, '-m', 'hmem.cli', 'serve', '--bundle', str(bundle), '--port', str(port),
                           '--name', NAME, *flags], stdout=open(log, 'w'), stderr=subprocess.STDOUT, env=env)
  base = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + TIMEOUT
  while True:
    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
    try:
      if http(f'{base}/health')[0] == 200:
        return proc, base, log
    except urllib.error.URLError:
      time.sleep(0.2)


@pytest.mark.slow  # hmem serve processes end to end
@pytest.mark.parametrize('timeout', [None, 0])
def test_sigterm_drains_within_the_shutdown_timeout_and_exits_0(bundle, tmp_path, timeout):
  """One slot, several streams queued, SIGTERM once one has started: with the default timeout
  every stream completes; with --shutdown-timeout 0 (the streams cannot finish in it, and a
  client that stopped reading holds its finished stream's connection open) the rest end
  with an error event and the process still exits 0 (it waited without limit for such a
  client)."""
  flags = ['--slots', '1'] + ([] if timeout is None else ['--shutdown-timeout', str(timeout)])
  proc, base, log = _serve(bundle, tmp_path, *flags)
  try:
    stalled = _connect(base, rcvbuf=1024) if timeout == 0 else None
    if stalled:  # sends a streaming request and never reads
      _post(stalled, {'model': NAME, 'prompt': [PROMPTS[0]] * 8, 'max_tokens': 40, 'stream': True})
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      futures = [pool.submit(_stream, base, p, started, max_tokens=40) for p in PROMPTS]
      prompts = len(PROMPTS) + (8 if stalled else 0)
      wait_until(lambda: started.is_set() and http(f'{base}/health')[1]['submitted'] == prompts,
                 'a stream to start and every request to queue')
      proc.send_signal(signal.SIGTERM)
      replies = [f.result(TIMEOUT) for f in futures]
    assert proc.wait(TIMEOUT) == 0, log.read_text()
    finished = [bool(finishes) and not errors for _, finishes, _, errors in replies]
    if timeout is None:
      assert all(finished), replies
    else:
      assert not all(finished)
      assert all(finishes or 'shut down' in errors[0] for _, finishes, _, errors in replies), replies
      stalled.close()
    with pytest.raises(urllib.error.URLError):
      http(f'{base}/health')
  finally:
    if proc.poll() is None:
      proc.kill()


def test_edits_take_effect_while_requests_stream(bundle, tmp_path, monkeypatch):
  """Two `hmem bank drop` edits of the served bundle, each committed while requests stream:
  the streams finish as they began, requests read after a commit are served with the edited
  rows and report its memory_version, and no request fails (the server kept reading the
  removed old version, 'the bundle is damaged: export it again', or served stale cached
  rows)."""
  live, expected = tmp_path / 'live', tmp_path / 'expected'  # served and edited; edited alone
  shutil.copytree(bundle, live)
  randomize_bank(live)
  shutil.copytree(live, expected)
  source = open_source(bundle=str(live))
  paths = source.router.route(list(PROMPTS)).path.tolist()
  other = next(path for path in paths if path[0] != paths[0][0])
  nodes = [(1, paths[0][0]), (2, other[1])]  # prompt 0's level-1 subtree, then a deeper node elsewhere
  texts = lambda s: [complete(s, p, max_new_tokens=12)[1] for p in PROMPTS]
  versions = [texts(source)]
  server = CompletionServer(source, name=NAME, slots=4)
  with running(server) as (_, _, base), concurrent.futures.ThreadPoolExecutor(2) as pool, \
      Gate(monkeypatch, 'step') as step:
    step.delay = 0.05
    for version, node in enumerate(nodes, start=1):
      started = threading.Event()
      streams = [pool.submit(_stream, base, PROMPTS[1], started, max_tokens=12) for _ in range(2)]
      assert started.wait(TIMEOUT)
      edit.drop(str(live), [node])
      edit.drop(str(expected), [node])
      versions.append(texts(open_source(bundle=str(expected))))
      for i, prompt in enumerate(PROMPTS):
        status, reply, _ = _ask(base, prompt, max_tokens=12)
        assert status == 200 and reply['choices'][0]['text'] == versions[version][i], (version, i, reply)
        assert reply['memory_version'] == version
      for future in streams:
        text, finishes, stream_versions, errors = future.result(TIMEOUT)
        assert not errors and text == versions[version - 1][1] and stream_versions == {version - 1}
  # Each drop changed what the prompts routed under it generate.
  assert versions[0][0] != versions[1][0] and versions[1] != versions[2], versions
