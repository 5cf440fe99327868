"""`hmem serve`: the OpenAI completions API over a bundle, spoken to with the official
`openai` client. Greedy completions equal `hmem generate`'s; requests with different
memories decoded together (continuous batching) equal the same requests served one by
one; streaming and stop strings; bad requests are 4xx and the server keeps serving;
SIGTERM drains the requests in flight and exits 0."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from hmem.bundle.export import export
from hmem.infer.decoder import complete
from hmem.infer.server import CompletionServer, make_app
from hmem.infer.source import open_source

PROMPTS = ('The French Revolution was a period of political and',
           'Photosynthesis is the process by which plants turn',
           'Jazz is a music genre that originated in',
           'Mathematics is a field of study that')
NAME = 'tiny'
TIMEOUT = 120  # seconds: a hang guard for every request and wait, never a timing assertion


def _http(url, body=None):
  """(status, JSON reply) of a GET, or of a POST of `body`; raw, to send what the client would refuse."""
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data, {'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
      return reply.status, json.loads(reply.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _free_socket() -> socket.socket:
  sock = socket.socket()
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(('127.0.0.1', 0))
  return sock


@pytest.fixture(scope='module')
def bundle(memory_run, tmp_path_factory):
  _, _, _, workdir = memory_run
  out = tmp_path_factory.mktemp('serve') / 'bundle'
  export(str(workdir), str(out), dtype='float32', progress=False)
  return out


@pytest.fixture(scope='module')
def served(bundle):
  """(source, CompletionServer, openai client) of a server on a thread, 4 slots."""
  import uvicorn
  source = open_source(bundle=str(bundle))
  server = CompletionServer(source, name=NAME, slots=4)
  sock = _free_socket()
  port = sock.getsockname()[1]
  http = uvicorn.Server(uvicorn.Config(make_app(server), log_level='warning'))
  thread = threading.Thread(target=http.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='unused', timeout=TIMEOUT, max_retries=0)
  deadline = time.monotonic() + TIMEOUT
  while not http.started:
    assert time.monotonic() < deadline and thread.is_alive(), 'the server did not start'
    time.sleep(0.05)
  yield source, server, client
  http.should_exit = True
  thread.join(TIMEOUT)
  assert not thread.is_alive()


def _ask(client, prompt, memory='fetched', max_tokens=10, **extra):
  body = {'memory': memory, **extra}
  out = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body)
  return [(c.text, c.path, c.finish_reason) for c in sorted(out.choices, key=lambda c: c.index)]


def _path(path):
  return None if path is None else [f'{level}:{node}' for level, node in enumerate(path.tolist(), start=1)]


def test_greedy_completions_equal_hmem_generate(served):
  source, _, client = served
  assert [m.id for m in client.models.list().data] == [NAME]
  expected = []
  for prompt in PROMPTS:
    path, text = complete(source, prompt, mode='fetched', max_new_tokens=10)
    expected.append((text, _path(path)))
  assert len({tuple(p) for _, p in expected}) > 1  # the prompts reach different leaves
  # One request per prompt, and all prompts as one list (one choice each, in order).
  assert [(text, path) for text, path, _ in (_ask(client, p)[0] for p in PROMPTS)] == expected
  assert [(text, path) for text, path, _ in _ask(client, list(PROMPTS))] == expected


def test_mixed_memory_requests_batched_equal_one_by_one(served):
  """Requests routed to different leaves, the generic block, no memory and a blocked route,
  in flight together, get what each gets alone, and what `hmem generate` gives."""
  source, server, client = served
  cases = [(PROMPTS[0], 'fetched', {}), (PROMPTS[1], 'fetched', {}), (PROMPTS[2], 'generic', {}),
           (PROMPTS[0], 'none', {}), (PROMPTS[3], 'fetched', {'block_best': True}), (PROMPTS[2], 'fetched', {}),
           (PROMPTS[1], 'none', {})]
  ask = lambda case: _ask(client, case[0], case[1], max_tokens=12, **case[2])[0]
  alone = [ask(case) for case in cases]
  steps = server.batcher.steps
  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    together = list(pool.map(ask, cases))
  assert together == alone
  tokens = sum(len(source.router.tokenizer.encode([text])[0]) for text, _, _ in alone)
  assert server.batcher.steps - steps < tokens  # decode steps were shared (not one step per token)
  for (prompt, memory, extra), (text, path, _) in zip(cases, alone):
    want_path, want = complete(source, prompt, mode=memory, max_new_tokens=12, **extra)
    assert (text, path) == (want, _path(want_path))
  # block_best moves the prompt to another level-1 subtree than its own.
  assert alone[4][1][0] != _ask(client, PROMPTS[3])[0][1][0]


def test_streaming_and_stop_strings(served):
  _, _, client = served
  (text, path, finish), = _ask(client, PROMPTS[1], max_tokens=16)
  stream = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True)
  chunks = list(stream)
  assert len(chunks) > 1 and ''.join(c.choices[0].text for c in chunks) == text
  assert chunks[-1].choices[0].finish_reason == finish and all(c.choices[0].path == path for c in chunks)
  assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
  # A stop string ends the text just before it (also when streamed).
  words = text.split()
  assert len(words) > 2, text
  stop = ' ' + words[2]
  cut = text[:text.index(stop)]
  assert _ask(client, PROMPTS[1], max_tokens=16, stop=[stop])[0] == (cut, path, 'stop')
  stream = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True,
                                     stop=stop)
  chunks = list(stream)
  assert ''.join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == 'stop'


def test_sampling_with_a_seed_repeats(served):
  _, _, client = served
  ask = lambda seed: client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=12, temperature=1.0,
                                               top_p=0.9, seed=seed).choices[0].text
  first = ask(3)
  assert ask(3) == first and len({first, ask(4), ask(5)}) > 1


@pytest.mark.parametrize('body, param, words', [
    ({'prompt': ''}, 'prompt', 'empty'),
    ({'prompt': []}, 'prompt', 'empty list'),
    ({'prompt': 123}, 'prompt', 'valid string'),
    ({'max_tokens': 'many'}, 'max_tokens', 'integer'),
    ({'max_tokens': 10**6}, 'max_tokens', 'context'),
    ({'prompt': 'word ' * 200}, 'prompt', 'context'),
    ({'temperature': -1}, 'temperature', 'greater than or equal'),
    ({'memory': 'all'}, 'memory', "'fetched', 'generic' or 'none'"),
    ({'block': ['9:0']}, 'block', 'level 9'),
    ({'block': ['1:99']}, 'block', 'does not exist'),
    ({'block_best': True, 'memory': 'none'}, 'block', 'need memory="fetched"'),
    ({'n': 2}, 'n', 'Input should be 1'),
    ({'colour': 'red'}, 'colour', 'not an hmem or OpenAI completions field'),
])
def test_bad_requests_are_4xx_and_the_server_keeps_serving(served, body, param, words):
  _, _, client = served
  url = f'{client.base_url}completions'
  status, reply = _http(url, {'model': NAME, 'prompt': PROMPTS[0], 'max_tokens': 4, **body})
  assert status == 400, reply
  error = reply['error']
  assert error['param'] == param and words in error['message'], error
  assert _ask(client, PROMPTS[0], max_tokens=2)[0][2] in ('stop', 'length')  # still serving


def test_unknown_model_is_404_through_the_client(served):
  _, _, client = served
  with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
    client.completions.create(model='gpt-4', prompt=PROMPTS[0], max_tokens=2)
  with pytest.raises(openai.BadRequestError, match='prompt 1 is empty'):
    client.completions.create(model=NAME, prompt=[PROMPTS[0], ''], max_tokens=2)


def test_sigterm_drains_requests_in_flight_and_exits_0(bundle, tmp_path):
  """`hmem serve` in a subprocess with one slot: SIGTERM after the first of several queued
  requests has started; every request still completes, and the process exits 0."""
  sock = _free_socket()
  port = sock.getsockname()[1]
  sock.close()
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)}
  log = open(tmp_path / 'serve.log', 'w')
  proc = subprocess.Popen([sys.executable, '-m', 'hmem.cli', 'serve', '--bundle', str(bundle), '--port', str(port),
                           '--slots', '1', '--name', NAME], stdout=log, stderr=subprocess.STDOUT, env=env)
  try:
    base = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + TIMEOUT
    while True:
      assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / 'serve.log').read_text()
      try:
        if _http(f'{base}/health')[0] == 200:
          break
      except urllib.error.URLError:
        time.sleep(0.2)
    client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', timeout=TIMEOUT, max_retries=0)
    started = threading.Event()

    def ask(prompt):
      chunks = []
      for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True):
        chunks.append(chunk.choices[0])
        started.set()
      return chunks

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      futures = [pool.submit(ask, p) for p in PROMPTS]
      assert started.wait(TIMEOUT)
      proc.send_signal(signal.SIGTERM)
      replies = [f.result(TIMEOUT) for f in futures]
    assert proc.wait(TIMEOUT) == 0, (tmp_path / 'serve.log').read_text()
    for chunks in replies:  # every request ran to its end
      assert chunks[-1].finish_reason in ('stop', 'length')
    with pytest.raises(urllib.error.URLError):
      _http(f'{base}/health')
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()


def test_a_port_in_use_is_one_clear_error(bundle, capsys):
  from hmem.cli import main
  with _free_socket() as taken:
    taken.listen()
    port = taken.getsockname()[1]
    assert main(['serve', '--bundle', str(bundle), '--port', str(port)]) == 2
  assert f'cannot listen on 127.0.0.1:{port}' in capsys.readouterr().err


def test_a_run_without_memory_or_tree_can_be_served(imported_run):
  """A run made by `hmem import` (no memory, no tree) is served with its own tokenizer
  (it was refused as having no tokenizer)."""
  source = open_source(workdir=str(imported_run))
  server = CompletionServer(source, name=NAME, slots=1)
  assert source.router is None and server.tokenizer is source.tokenizer
