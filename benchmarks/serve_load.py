"""A bounded load-and-fault run of `hmem serve` on 127.0.0.1.

    python benchmarks/serve_load.py [--quick] [--clients 64] [--seconds 40]

The model: configs/tiny.py with FFN memory on a k=4, depth-2 tree of
tests/data/wiki_sample.jsonl, trained a few steps and exported once under /tmp (about a
minute; later runs reuse it), its bank rows randomised so the memory changes what is
generated. The run serves a copy with `hmem serve` in a subprocess (--max-queue 48,
--max-prompts 8, --max-body-bytes 65536, so the limits are met), and --clients threads
loop over a mix until --seconds have passed:
- good requests (greedy): plain or streaming (include_usage), one prompt or several, in
  memory mode fetched, generic or none chosen by the model id. Each choice's text must
  equal `hmem generate`'s for its prompt, mode and the memory version the response reports
  (computed before the run, for both versions). A 429 is retried after its Retry-After.
- bad requests of every kind the server refuses (too many prompts, a body over the limit,
  a lone surrogate, temperature 2.5, five stop strings, an unknown field, an unknown model,
  a prompt over the context, invalid JSON, logprobs 6, token ids outside the vocabulary),
  each checked for its status;
- clients that disconnect mid-request, plain and streaming.
Halfway, `hmem bank drop` edits the served bundle (the first prompt's level-1 subtree);
at the end the server gets SIGTERM with requests in flight, which must finish, and must
exit 0.

Reports good requests completed, lost (accepted, never answered), wrong (text differs),
5xx (must be 0), 4xx by cause, the server's peak RSS, TTFT and per-token latency p50/p99
of the good streaming requests; a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, REPO)

CORPUS = os.path.join(REPO, 'tests', 'data', 'wiki_sample.jsonl')
OVERRIDES = ('model.vocab_size=512', 'memory.levels=(8, 4)', 'data.source=prepared', 'data.tokenizer_sample=400',
             'data.tree_sample=400', 'data.kmeans_samples=256', 'data.kmeans_steps=5', 'data.tfidf_dim=32',
             'data.eval_fraction=0.1', 'train.steps=6', 'train.checkpoint_every=6', 'train.eval_every=0',
             'train.log_every=6', 'train.warmup_steps=2')
NAME, MAX_TOKENS = 'tiny', 16
PROMPTS = ('The French Revolution was a period of political and', 'Photosynthesis is the process by which plants',
           'Jazz is a music genre that originated in', 'Mathematics is a field of study that',
           'The Roman Empire was the post-Republican state', 'A volcano is a rupture in the crust of',
           'The Pacific Ocean is the largest and deepest', 'Chess is a board game for two players')
MODELS = {NAME: 'fetched', f'{NAME}:generic': 'generic', f'{NAME}:none': 'none'}
LIMITS = ['--max-queue', '48', '--max-prompts', '8', '--max-body-bytes', '65536']
TIMEOUT = 120


def _bundle(root: str) -> str:
  """The tiny memory model's bundle with a random bank (built once under `root`)."""
  from hmem.bundle.export import export
  from hmem.bundle.format import open_array, read_manifest
  from hmem.config import load_config
  from hmem.data.prepare import prepare
  from hmem.train.trainer import train
  out = os.path.join(root, 'bundle')
  if os.path.exists(os.path.join(out, 'manifest.json')):
    return out
  shutil.rmtree(root, ignore_errors=True)
  data, run = os.path.join(root, 'data'), os.path.join(root, 'run')
  cfg = load_config(os.path.join(REPO, 'configs', 'tiny.py'), [*OVERRIDES, f'data.path={data}'])
  prepare(cfg, CORPUS, data, workers=1, progress=False)
  train(cfg, run, progress=False)
  export(run, out + '.tmp', dtype='float32', progress=False)
  rng = np.random.default_rng(0)
  for meta in read_manifest(out + '.tmp')['bank'].values():  # chunks carry their own crc32c
    array = open_array(out + '.tmp', meta['path'])
    array.write(rng.normal(0, 0.3, meta['shape']).astype(np.float32)).result()
  os.rename(out + '.tmp', out)
  return out


def _expected(bundle: str, node: str) -> dict:
  """{(prompt, mode, memory version): `hmem generate`'s text}, before and after dropping
  `node` (on a copy)."""
  from hmem.bundle import edit
  from hmem.data.router import parse_node
  from hmem.infer.decoder import complete
  from hmem.infer.source import open_source
  expected = {}
  after = bundle + '.after'
  shutil.rmtree(after, ignore_errors=True)
  shutil.copytree(bundle, after)
  source = open_source(bundle=bundle)
  edit.drop(after, [parse_node(node, source.config.memory.k, source.config.memory.depth)])
  for version, root in enumerate((bundle, after)):
    source = open_source(bundle=root)
    for prompt in PROMPTS:
      for mode in MODELS.values():
        expected[prompt, mode, version] = complete(source, prompt, mode=mode, max_new_tokens=MAX_TOKENS)[1]
  shutil.rmtree(after)
  return expected


class Load:
  """Counts and latencies of the run, shared by the client threads."""

  def __init__(self, base: str, expected: dict):
    self.base, self.expected = base, expected
    self.lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()
    self.refused: collections.Counter = collections.Counter()  # (cause, status)
    self.problems: list[str] = []
    self.ttft, self.gaps = [], []
    self.stop = threading.Event()  # no new requests (SIGTERM is coming)

  def count(self, key, n=1):
    with self.lock:
      self.counts[key] += n

  def problem(self, what: str):
    with self.lock:
      self.problems.append(what)
      self.counts['wrong' if what.startswith('wrong') else 'lost' if what.startswith('lost') else 'other'] += 1

  def lost(self, what: str, error: OSError):
    """A request that got no answer: lost, unless it was never accepted (sent as SIGTERM came)."""
    if self.stop.is_set() and isinstance(error, ConnectionRefusedError):
      return self.count('refused')
    self.problem(f'lost: {what}: {error!r}')

  def _connect(self):
    host, port = self.base.split(':')
    return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)

  def post(self, body, raw: bytes | None = None):
    """(status, headers, body bytes) of one POST /v1/completions."""
    conn = self._connect()
    try:
      data = raw if raw is not None else json.dumps(body).encode()
      conn.request('POST', '/v1/completions', data, {'Content-Type': 'application/json'})
      reply = conn.getresponse()
      return reply.status, reply.headers, reply.read()
    finally:
      conn.close()

  def check(self, choices, mode, version, prompts):
    for choice in choices:
      version = choice.get('memory_version', version)  # each choice's rows were read at their own
      want = self.expected[prompts[choice['index']], mode, version]
      if choice['text'] != want:
        self.problem(f'wrong: {prompts[choice["index"]]!r} {mode} v{version}: {choice["text"]!r} != {want!r}')
        return False
    return True

  def good_plain(self, rng):
    model = rng.choice(list(MODELS))
    prompts = rng.sample(PROMPTS, rng.choice((1, 1, 2, 3)))
    body = {'model': model, 'prompt': prompts, 'max_tokens': MAX_TOKENS, 'temperature': 0}
    while True:
      try:
        status, headers, data = self.post(body)
      except OSError as e:
        return self.lost('plain request', e)
      if status == 429:
        self.count('429_retried')
        time.sleep(float(headers['Retry-After']))
        continue
      if status != 200:
        self.count(f'{status // 100}xx')
        return self.problem(f'lost: plain request answered {status}: {data[:200]!r}')
      reply = json.loads(data)
      if self.check(reply['choices'], MODELS[model], reply['memory_version'], prompts):
        self.count('good')
        self.count(f'good_v{reply["memory_version"]}')
      return

  def good_stream(self, rng):
    model, prompt = rng.choice(list(MODELS)), rng.choice(PROMPTS)
    body = {'model': model, 'prompt': prompt, 'max_tokens': MAX_TOKENS, 'temperature': 0, 'stream': True,
            'stream_options': {'include_usage': True}}
    while True:
      conn = self._connect()
      try:
        start = time.perf_counter()
        conn.request('POST', '/v1/completions', json.dumps(body).encode(), {'Content-Type': 'application/json'})
        reply = conn.getresponse()
        if reply.status == 429:
          reply.read()
          self.count('429_retried')
          time.sleep(float(reply.headers['Retry-After']))
          continue
        if reply.status != 200:
          self.count(f'{reply.status // 100}xx')
          return self.problem(f'lost: stream answered {reply.status}: {reply.read()[:200]!r}')
        text, times, version, done, usage = '', [], None, False, None
        for line in reply:
          if line.strip() == b'data: [DONE]':
            done = True
          elif line.startswith(b'data: '):
            event = json.loads(line[6:])
            if 'error' in event:
              return self.problem(f'lost: stream error {event["error"]}')
            if event['choices']:
              times.append(time.perf_counter())
              text += event['choices'][0]['text']
              version = event['memory_version']
            else:
              usage = event['usage']
        if not done or usage is None:
          return self.problem('lost: stream ended before [DONE] or without its usage chunk')
      except OSError as e:
        return self.lost('stream', e)
      finally:
        conn.close()
      if self.check([{'index': 0, 'text': text}], MODELS[model], version, [prompt]):
        self.count('good')
        self.count(f'good_v{version}')
        with self.lock:
          self.ttft.append(times[0] - start)
          self.gaps.extend(np.diff(times[:-1]).tolist())  # the last chunk carries the finish
      return

  BAD = {  # cause: (body or raw bytes, expected status)
      'too_many_prompts': ({'prompt': [PROMPTS[0]] * 9}, 400),
      'body_too_large': ({'prompt': 'word ' * 14000}, 413),
      'lone_surrogate': (b'{"model": "tiny", "prompt": "a\\ud800b"}', 400),
      'temperature': ({'prompt': PROMPTS[0], 'temperature': 2.5}, 400),
      'five_stops': ({'prompt': PROMPTS[0], 'stop': ['a', 'b', 'c', 'd', 'e']}, 400),
      'unknown_field': ({'prompt': PROMPTS[0], 'colour': 'red'}, 400),
      'unknown_model': ({'prompt': PROMPTS[0], 'model': 'gpt-4'}, 404),
      'over_context': ({'prompt': 'word ' * 300}, 400),
      'invalid_json': (b'{"model": "tiny", "prompt": ', 400),
      'logprobs_6': ({'prompt': PROMPTS[0], 'logprobs': 6}, 400),
      'token_ids': ({'prompt': [1, 10**6]}, 400),
  }

  def bad(self, rng):
    cause = rng.choice(sorted(self.BAD))
    body, want = self.BAD[cause]
    try:
      status, _, _ = self.post(None, raw=body) if isinstance(body, bytes) else self.post({'model': NAME, **body})
    except OSError as e:
      return self.problem(f'other: bad request {cause}: {e!r}')
    with self.lock:
      self.refused[cause, status] += 1
    if status != want:
      self.problem(f'other: bad request {cause} answered {status}, not {want}')
    if status >= 500:
      self.count('5xx')

  def disconnect(self, rng):
    stream = rng.random() < 0.5
    body = json.dumps({'model': NAME, 'prompt': rng.sample(PROMPTS, 2), 'max_tokens': MAX_TOKENS,
                       'stream': stream}).encode()
    host, port = self.base.split(':')
    try:
      with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                     b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
        if stream:
          sock.recv(64)
        else:
          time.sleep(rng.random() * 0.05)
      self.count('disconnected')
    except OSError as e:
      self.problem(f'other: disconnecting client: {e!r}')

  def client(self, seed: int):
    rng = random.Random(seed)
    kinds = [self.good_plain] * 5 + [self.good_stream] * 3 + [self.bad, self.disconnect]
    while not self.stop.is_set():
      rng.choice(kinds)(rng)


def _peak_rss(pid: int, out: list, done: threading.Event):
  while not done.is_set():
    try:
      with open(f'/proc/{pid}/status') as f:
        out[0] = max(out[0], next(int(line.split()[1]) for line in f if line.startswith('VmHWM')))
    except (OSError, StopIteration):
      pass
    time.sleep(0.2)


def run(clients: int, seconds: float) -> dict:
  build = time.perf_counter()
  root = '/tmp/hmem-serve-load'
  bundle = _bundle(root)
  served = os.path.join(root, 'served')
  shutil.rmtree(served, ignore_errors=True)
  shutil.copytree(bundle, served)
  from hmem.infer.source import open_source
  node = f'1:{open_source(bundle=served).router.route([PROMPTS[0]]).path[0, 0]}'
  expected = _expected(served, node)
  setup_s = time.perf_counter() - build
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  port = sock.getsockname()[1]
  sock.close()
  log = open(os.path.join(root, 'serve.log'), 'w')
  proc = subprocess.Popen([sys.executable, '-m', 'hmem.cli', 'serve', '--bundle', served, '--port', str(port),
                           '--name', NAME, *LIMITS], stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, 'PYTHONPATH': REPO})
  load = Load(f'127.0.0.1:{port}', expected)
  peak, watching = [0], threading.Event()
  threading.Thread(target=_peak_rss, args=(proc.pid, peak, watching), daemon=True).start()
  deadline = time.monotonic() + TIMEOUT
  while True:  # up, then warm: every step size and prompt bucket compiled before the clock starts
    assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()
    try:
      json.loads(_get(load, '/health'))['status']
      break
    except (OSError, KeyError, ValueError):
      time.sleep(0.2)
  warm = threading.Thread(target=lambda: [load.good_plain(random.Random(i)) for i in range(2)])
  threads = [threading.Thread(target=load.good_plain, args=(random.Random(i),)) for i in range(20)]
  for t in threads + [warm]:
    t.start()
  for t in threads + [warm]:
    t.join()
  load.counts.clear()
  start = time.perf_counter()
  workers = [threading.Thread(target=load.client, args=(seed,), daemon=True) for seed in range(clients)]
  for t in workers:
    t.start()
  time.sleep(seconds / 2)
  edit = subprocess.run([sys.executable, '-m', 'hmem.cli', 'bank', 'drop', '--bundle', served, '--node', node],
                        capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': REPO})
  edited_at = time.perf_counter() - start
  time.sleep(seconds / 2)
  in_flight = json.loads(_get(load, '/health'))
  load.stop.set()
  proc.send_signal(signal.SIGTERM)  # with the requests of every client in flight
  for t in workers:
    t.join(TIMEOUT)
  code = proc.wait(TIMEOUT)
  wall = time.perf_counter() - start
  watching.set()
  log.close()
  pct = lambda xs, q: round(1e3 * float(np.percentile(xs, q)), 1) if xs else None
  c = load.counts
  return {
      'clients': clients, 'seconds': round(wall, 1), 'setup_s': round(setup_s, 1), 'good': c['good'],
      'good_before_edit': c['good_v0'], 'good_after_edit': c['good_v1'], 'lost': c['lost'], 'wrong': c['wrong'],
      'other_problems': c['other'], '5xx': c['5xx'], '429_retried': c['429_retried'],
      'disconnected': c['disconnected'], 'refused_after_sigterm': c['refused'],
      '4xx': {f'{cause} {status}': n for (cause, status), n in sorted(load.refused.items())},
      'edit_ok': edit.returncode == 0, 'edit_at_s': round(edited_at, 1), 'in_flight_at_sigterm': in_flight,
      'exit_code': code, 'peak_rss_mb': round(peak[0] / 1024), 'ttft_ms_p50': pct(load.ttft, 50),
      'ttft_ms_p99': pct(load.ttft, 99), 'token_ms_p50': pct(load.gaps, 50), 'token_ms_p99': pct(load.gaps, 99),
      'problems': load.problems[:10],
  }


def _get(load: Load, path: str) -> bytes:
  conn = load._connect()
  try:
    conn.request('GET', path)
    return conn.getresponse().read()
  finally:
    conn.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='32 clients for 15 s (< 60 s with the bundle built)')
  parser.add_argument('--clients', type=int, default=None, help='client threads (default 64; quick 32)')
  parser.add_argument('--seconds', type=float, default=None, help='length of the run (default 40; quick 15)')
  args = parser.parse_args()
  r = run(args.clients or (32 if args.quick else 64), args.seconds or (15 if args.quick else 40))
  print(f'{r["clients"]} clients, {r["seconds"]} s (setup {r["setup_s"]} s); edit committed at {r["edit_at_s"]} s '
        f'({"ok" if r["edit_ok"] else "FAILED"}); SIGTERM with {r["in_flight_at_sigterm"]["active"]} active and '
        f'{r["in_flight_at_sigterm"]["waiting"]} waiting; exit code {r["exit_code"]}')
  print(f'{"good":>6} {"v0":>5} {"v1":>5} {"lost":>5} {"wrong":>6} {"5xx":>4} {"429s":>5} {"left":>5} '
        f'{"RSS MB":>7} {"TTFT p50":>9} {"p99":>7} {"tok p50":>8} {"p99":>6}')
  print(f'{r["good"]:>6} {r["good_before_edit"]:>5} {r["good_after_edit"]:>5} {r["lost"]:>5} {r["wrong"]:>6} '
        f'{r["5xx"]:>4} {r["429_retried"]:>5} {r["disconnected"]:>5} {r["peak_rss_mb"]:>7} {r["ttft_ms_p50"]:>9} '
        f'{r["ttft_ms_p99"]:>7} {r["token_ms_p50"]:>8} {r["token_ms_p99"]:>6}')
  print('4xx by cause: ' + ', '.join(f'{k}: {v}' for k, v in r['4xx'].items()))
  for problem in r['problems']:
    print('problem:', problem)
  print(json.dumps(r))


if __name__ == '__main__':
  main()
