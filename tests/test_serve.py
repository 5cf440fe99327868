"""`hmem serve`: the OpenAI completions API over a bundle, spoken to with the official
`openai` client. Greedy completions equal `hmem generate`'s; requests with different
memories decoded together (continuous batching) equal the same requests served one by
one; memory modes by model id; echo and logprobs score a prompt as the forward pass does;
token-id prompts, vLLM's tokenizer endpoints, OpenAI's no-op values, streaming, usage and
stop strings; a seeded draw is the same everywhere; bad requests are 4xx naming the field
and the server keeps serving. (Faults, limits and shutdown: test_serve_faults.py.)"""

import concurrent.futures
import json
import shutil

import numpy as np
import openai
import pytest
from serving import NAME, PROMPTS, forward_logprobs, free_socket, http, randomize_bank, running

from hmem.infer.decoder import complete, complete_all
from hmem.infer.server import CompletionServer
from hmem.infer.source import open_source


@pytest.fixture(scope='module')
def bundle(memory_bundle, tmp_path_factory):
  """The shared float32 bundle, copied, with random bank rows (memory modes must differ to
  mean something)."""
  out = tmp_path_factory.mktemp('serve') / 'bundle'
  shutil.copytree(memory_bundle, out)
  randomize_bank(out)
  return out


@pytest.fixture(scope='module')
def served(bundle):
  """(source, CompletionServer, openai client) of a server on a thread, 4 slots."""
  source = open_source(bundle=str(bundle))
  server = CompletionServer(source, name=NAME, slots=4)
  with running(server) as (_, client, _):
    yield source, server, client


def _ask(client, prompt, memory='fetched', max_tokens=10, **extra):
  body = {'memory': memory, **extra}
  out = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body)
  return [(c.text, c.path, c.finish_reason) for c in sorted(out.choices, key=lambda c: c.index)]


def _path(path):
  return None if path is None else [f'{level}:{node}' for level, node in enumerate(path.tolist(), start=1)]


def test_greedy_completions_equal_hmem_generate(served):
  source, _, client = served
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
  assert len(text) > 8, text
  stop = text[len(text) // 2:len(text) // 2 + 3]
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


def test_model_ids_select_the_memory_mode(served):
  """Clients that send only OpenAI's fields pick the mode by model id (NAME, NAME:generic,
  NAME:none), as vLLM lists each LoRA adapter."""
  source, _, client = served
  assert [(m.id, m.memory) for m in client.models.list().data] == [
      (NAME, 'fetched'), (f'{NAME}:generic', 'generic'), (f'{NAME}:none', 'none')]
  for model, mode in ((f'{NAME}:generic', 'generic'), (f'{NAME}:none', 'none'), (NAME, 'fetched')):
    out = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert out.choices[0].text == complete(source, PROMPTS[1], mode=mode, max_new_tokens=8)[1], mode
    assert out.model == model and out.memory == mode and (out.choices[0].path is None) == (mode != 'fetched')
  assert len({complete(source, PROMPTS[1], mode=m, max_new_tokens=8)[1] for m in ('generic', 'none')}) == 2


@pytest.mark.parametrize('model', [NAME, f'{NAME}:none'])
def test_echo_and_logprobs_score_the_prompt_as_the_forward_pass(served, model):
  """What lm-evaluation-harness's local-completions sends to score a text: echo, logprobs,
  max_tokens 0 or 1. (It was refused: logprobs and echo were not implemented.)"""
  source, _, client = served
  mode = 'fetched' if model == NAME else 'none'
  ids = source.tokenizer.encode([PROMPTS[0]])[0]
  want, logp = forward_logprobs(source, PROMPTS[0], mode)
  for prompt in (PROMPTS[0], ids.tolist()):  # text, or token ids as the harness sends them
    out = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == PROMPTS[0] and ''.join(lp.tokens) == PROMPTS[0]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], want, rtol=1e-4, atol=1e-5)
    for t, top in enumerate(lp.top_logprobs[1:]):  # the 2 most likely, and the token itself
      best = np.sort(logp[t])[::-1][:2]
      assert 2 <= len(top) <= 3 and max(top.values()) == pytest.approx(best[0], rel=1e-4, abs=1e-5)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
  # New tokens carry theirs: greedy picks the most likely, after the echoed prompt.
  out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, echo=True, logprobs=1, temperature=0)
  choice = out.choices[0]
  text = complete(source, PROMPTS[0], mode=mode, max_new_tokens=4)[1]
  assert choice.text == PROMPTS[0] + text and len(choice.logprobs.tokens) == len(ids) + 4
  for value, top in zip(choice.logprobs.token_logprobs[len(ids):], choice.logprobs.top_logprobs[len(ids):]):
    assert value == max(top.values())
  plain = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, logprobs=0, temperature=0)
  assert plain.choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs[len(ids):]
  assert all(len(top) == 1 for top in plain.choices[0].logprobs.top_logprobs)


def test_streamed_logprobs_and_usage(served):
  _, _, client = served
  whole = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=10, logprobs=1, temperature=0)
  chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=10, logprobs=1, temperature=0,
                                          stream=True, stream_options={'include_usage': True}))
  *text_chunks, last = chunks
  assert last.choices == [] and last.usage == whole.usage  # include_usage: a last chunk with the usage
  assert all(c.usage is None for c in text_chunks)
  joined = [x for c in text_chunks for x in c.choices[0].logprobs.token_logprobs]
  assert joined == whole.choices[0].logprobs.token_logprobs
  offsets = [x for c in text_chunks for x in c.choices[0].logprobs.text_offset]
  assert offsets == whole.choices[0].logprobs.text_offset
  plain = list(client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=3, temperature=0, stream=True))
  assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless asked


def test_openai_no_op_values_are_accepted(served):
  """The defaults client libraries send (they were refused with a 400)."""
  source, _, client = served
  out = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=6, temperature=0, frequency_penalty=0,
                                  presence_penalty=0, logit_bias={}, suffix=None, user='someone', n=1, best_of=1)
  assert out.choices[0].text == complete(source, PROMPTS[2], max_new_tokens=6)[1]


def test_tokenizer_endpoints_as_vllm_serves_them(served):
  source, _, client = served
  base = str(client.base_url).removesuffix('/v1/')
  status, info, _ = http(f'{base}/tokenizer_info')
  tokenizer = source.tokenizer
  assert status == 200 and info['eos_token'] == '<|endoftext|>' and info['bos_token'] is None
  status, out, _ = http(f'{base}/tokenize', {'prompt': PROMPTS[0], 'add_special_tokens': False})
  assert out['tokens'] == tokenizer.encode([PROMPTS[0]], start=False)[0].tolist() and out['count'] == len(out['tokens'])
  # A special token spelled out is that token (the harness finds the EOT id so).
  status, out, _ = http(f'{base}/tokenize', {'prompt': info['eos_token'], 'add_special_tokens': False})
  assert out['tokens'] == [tokenizer.eot_id]
  status, out, _ = http(f'{base}/detokenize', {'tokens': tokenizer.encode([PROMPTS[1]])[0].tolist()})
  assert status == 200 and out['prompt'] == PROMPTS[1]
  assert http(f'{base}/detokenize', {'tokens': [-1]})[0] == 400


def test_a_seeded_draw_is_the_same_alone_batched_generated_and_served(served, bundle):
  """Same seed, same tokens: alone or among other prompts, through `complete_all` (`hmem
  generate`), the harness and the server, alone or batched with other requests. (Each
  prompt drew with its index in a leaf-sorted batch, so calls with several prompts differed.)"""
  from lm_eval.api.instance import Instance

  from hmem.infer.harness import HarnessLM
  source, _, client = served
  sampling = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)
  target = PROMPTS[2]
  alone = complete_all(source, [target], **sampling)[1][0]
  among = complete_all(source, [PROMPTS[0], PROMPTS[3], target, PROMPTS[1]], **sampling)[1]
  assert among[2] == alone
  ask = lambda prompt: [c.text for c in sorted(client.completions.create(
      model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=11).choices, key=lambda c: c.index)]
  assert ask(target) == [alone] and ask([PROMPTS[1], target])[1] == alone
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    served_together = list(pool.map(ask, [PROMPTS[0], target, [PROMPTS[3], PROMPTS[1]]]))
  assert served_together[1] == [alone]
  lm = HarnessLM(bundle=str(bundle), batch_size=4, progress=False)
  kwargs = {'until': [], 'max_gen_toks': 8, 'do_sample': True, 'temperature': 1.0, 'top_p': 0.9, 'seed': 11}
  texts = lm.generate_until([Instance('generate_until', {}, (p, kwargs), i) for i, p in enumerate(PROMPTS)])
  assert texts[2] == alone
  assert len(set(among)) > 1 and complete_all(source, [target], **{**sampling, 'seed': 12})[1][0] != alone


@pytest.mark.parametrize('body, param, words', [
    ({'prompt': ''}, 'prompt', 'empty'),
    ({'prompt': []}, 'prompt', 'empty list'),
    ({'prompt': 123}, 'prompt', 'valid string'),
    ({'max_tokens': 'many'}, 'max_tokens', 'integer'),
    ({'max_tokens': 10**6}, 'max_tokens', 'context'),
    ({'prompt': 'word ' * 200}, 'prompt', 'context'),
    ({'temperature': -1}, 'temperature', 'greater than or equal'),
    ({'temperature': 2.5}, 'temperature', 'less than or equal to 2'),
    ({'stop': ['a', 'b', 'c', 'd', 'e']}, 'stop', 'at most 4'),
    ({'stop': ['x' * 300]}, 'stop', '1 to 256'),
    ({'logprobs': 6}, 'logprobs', 'less than or equal to 5'),
    ({'max_tokens': 0}, 'max_tokens', 'echo the prompt'),
    ({'prompt': [3, 10**6]}, 'prompt', 'outside [0,'),
    ({'frequency_penalty': 0.5}, 'frequency_penalty', 'no penalties'),
    ({'logit_bias': {'5': 1.0}}, 'logit_bias', 'not supported'),
    ({'suffix': 'the end'}, 'suffix', 'not supported'),
    ({'model': 'tiny:none', 'memory': 'fetched'}, 'memory', 'contradicts'),
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
  status, reply, _ = http(url, {'model': NAME, 'prompt': PROMPTS[0], 'max_tokens': 4, **body})
  assert status == 400, reply
  error = reply['error']
  assert error['param'] == param and words in error['message'], error
  assert _ask(client, PROMPTS[0], max_tokens=2)[0][2] in ('stop', 'length')  # still serving


@pytest.mark.parametrize('field', ['prompt', 'stop'])
def test_text_that_is_not_utf8_is_a_400_naming_the_field(served, field):
  """A lone surrogate (valid JSON, no valid text) was a plain-text 500 from the tokenizer."""
  _, _, client = served
  body = {'model': NAME, 'prompt': PROMPTS[0], 'max_tokens': 2, field: 'a\\ud800b'}
  raw = json.dumps(body).replace('\\\\ud800', '\\ud800').encode()  # the escape itself, as a client sends it
  assert b'\\ud800' in raw and b'\\\\' not in raw
  status, reply, _ = http(f'{client.base_url}completions', raw=raw)
  assert status == 400 and reply['error']['param'] == field and 'surrogate' in reply['error']['message'], reply


def test_unknown_model_is_404_through_the_client(served):
  _, _, client = served
  with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
    client.completions.create(model='gpt-4', prompt=PROMPTS[0], max_tokens=2)
  with pytest.raises(openai.BadRequestError, match='prompt 1 is empty'):
    client.completions.create(model=NAME, prompt=[PROMPTS[0], ''], max_tokens=2)


def test_a_port_in_use_is_one_clear_error(bundle, capsys):
  from hmem.cli import main
  with free_socket() as taken:
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
