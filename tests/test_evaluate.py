"""`hmem eval`: per-mode perplexity and accuracy equal a direct computation with the model;
blocking; bad records counted; fields eval does not use ignored and counted; a file with
nothing usable is one clear error; a run without memory or tree (imported) evaluates and
generates in mode none."""

import json
import math
import shutil

import jax
import numpy as np
import pytest
from conftest import WIKI
from flax import nnx

from hmem.cli import main
from hmem.errors import DataError
from hmem.infer.evaluate import evaluate
from hmem.infer.source import ArrayBank, open_source
from hmem.memory.spec import memory_spec


def _texts(n, skip=0):
  with open(WIKI) as f:
    return [json.loads(line)['text'] for line in f][skip:skip + n]


@pytest.fixture(scope='module')
def source(memory_run):
  """The run, its bank rows randomised: a few training steps leave the memory almost a
  no-op, and the modes must differ for the comparison to mean something."""
  source = open_source(workdir=str(memory_run[3]))
  rng = np.random.default_rng(0)
  bank = {t: {name: rng.normal(0, 0.3, shape).astype(np.float32) for name, shape in named.items()}
          for t, named in memory_spec(source.config).bank_shapes.items()}
  source.rows = ArrayBank(bank)
  return source


@pytest.fixture(scope='module')
def eval_file(tmp_path_factory):
  """Texts (some longer than seq_len), questions, and one bad line of each kind."""
  texts = _texts(5)
  questions = [{'prompt': 'The capital of France is', 'candidates': ['Paris', 'a river', 'blue'], 'answer': 0},
               {'prompt': 'Music of the 20th century', 'candidates': ['diverged', 'ended'], 'answer': 'ended',
                'context': texts[0]},
               {'prompt': 'One, two,', 'candidates': ['three', 'seven'], 'answer': 1}]
  lines = [json.dumps({'text': t}) for t in texts[:4]] + [json.dumps({'text': texts[4], 'context': texts[1]})]
  lines += [json.dumps(q) for q in questions]
  lines += ['', '{"text": "unterminated', json.dumps({'title': 'y'}),
            json.dumps({'prompt': 'p', 'candidates': [], 'answer': 0}), '[1, 2]']
  # What prepare skips: a lone surrogate (JSON-escaped) in a text and in a prompt, a blank
  # text, and bytes that are not UTF-8.
  lines += ['{"text": "a\\ud800b"}', json.dumps({'prompt': 'p\ud800', 'candidates': ['a'], 'answer': 0}),
            json.dumps({'text': ' \n'})]
  path = tmp_path_factory.mktemp('eval') / 'eval.jsonl'
  path.write_bytes(('\n'.join(lines) + '\n').encode() + b'{"text": "x\xff"}\n')
  return path, texts, questions


@nnx.jit
def _logp(model, tokens_1xT, segment_ids_1xT, memory):
  return jax.nn.log_softmax(model(tokens_1xT, segment_ids_1xT, memory), axis=-1)


def _nll(model, tokens, memory, T):
  """Summed NLL of tokens[1:] given the prefix: one sequence through the full forward pass
  (right-padded to seq_len with segment 0, so it compiles once)."""
  n = len(tokens)
  x = np.zeros((1, T), np.int32)
  x[0, :n] = tokens
  logp = np.asarray(_logp(model, x, (np.arange(T) < n)[None].astype(np.int32), memory))[0, :n - 1]
  return -float(np.sum(np.take_along_axis(logp, x[0, 1:n, None], axis=-1)))


def _direct(source, texts, questions, leaves, mode):
  """Perplexity and accuracy computed one sequence at a time, independently of evaluate."""
  tok, L = source.tokenizer, source.config.data.seq_len
  memory = lambda leaf: source.memory(np.array([leaf]), mode)
  nll = count = 0
  for text, leaf in zip(texts, leaves):
    ids = np.append(tok.encode([text])[0], tok.eot_id)
    for start in range(0, len(ids) - 1, L - 1):  # windows overlapping by one token
      window = ids[start:start + L]
      nll += _nll(source.model, window, memory(leaf), L)
      count += len(window) - 1
  correct = []
  for q, leaf in zip(questions, leaves[len(texts):]):
    prompt = tok.encode([q['prompt']])[0]
    scores = [-_nll(source.model, np.concatenate([prompt, tok.encode([' ' + c], start=False)[0]]), memory(leaf), L)
              + _nll(source.model, prompt, memory(leaf), L) for c in q['candidates']]
    answer = q['answer'] if isinstance(q['answer'], int) else q['candidates'].index(q['answer'])
    correct.append(int(np.argmax(scores)) == answer)
  return math.exp(nll / count), float(np.mean(correct)) if correct else None


def test_eval_equals_a_direct_computation_per_mode(source, eval_file, tmp_path):
  path, texts, questions = eval_file
  assert len(source.router.tokenizer.encode([texts[0]])[0]) > 2 * source.config.data.seq_len  # windows
  result = evaluate(source, str(path), block_best=True, batch_size=4, progress=False)
  assert result['documents'] == 5 and result['examples'] == 3
  assert result['skipped'] == {'blank_line': 1, 'malformed_json': 1, 'missing_field': 1, 'bad_candidates': 1,
                               'not_an_object': 1, 'invalid_unicode': 2, 'empty': 1, 'non_utf8': 1}

  routed = texts[:4] + [texts[1]] + [q.get('context', q['prompt']) for q in questions]
  plain, blocked = source.router.route(routed), source.router.route(routed, block_best=True)
  # --block-best moves every record to another level-1 subtree.
  assert (plain.path[:, 0] != blocked.path[:, 0]).all()
  for mode, leaves in (('fetched', plain.leaf), ('generic', plain.leaf), ('none', plain.leaf),
                       ('blocked', blocked.leaf)):
    ppl, acc = _direct(source, texts, questions, leaves, 'fetched' if mode == 'blocked' else mode)
    np.testing.assert_allclose(result[f'ppl_{mode}'], ppl, rtol=1e-5, err_msg=mode)
    assert result[f'acc_{mode}'] == pytest.approx(acc), mode
  # The memory matters: the modes do not all score alike.
  assert len({round(result[f'ppl_{m}'], 4) for m in ('fetched', 'generic', 'none', 'blocked')}) == 4


def test_eval_of_a_file_with_nothing_usable_names_it(source, tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('\n{"text": ""}\nnot json\n')
  with pytest.raises(DataError, match=r'bad\.jsonl: no usable record \(1 blank_line, 1 empty, 1 malformed_json'):
    evaluate(source, str(path), progress=False)


def test_eval_data_and_plot_on_an_object_store(source, tmp_path, gcs):
  from hmem.files import as_path
  from hmem.infer.evaluate import plot
  lines = ''.join(json.dumps({'text': t}) + '\n' for t in _texts(2)) + 'not json\n'
  (tmp_path / 'eval.jsonl').write_text(lines)
  as_path('gs://bucket/eval.jsonl').write_text(lines)
  result = evaluate(source, 'gs://bucket/eval.jsonl', progress=False)
  assert result == evaluate(source, str(tmp_path / 'eval.jsonl'), progress=False)
  assert result['documents'] == 2 and result['skipped'] == {'malformed_json': 1}
  plot(result, 'gs://bucket/out/eval.png')
  plot(result, str(tmp_path / 'eval.png'))
  png = (gcs / 'bucket' / 'out' / 'eval.png').read_bytes()
  assert png.startswith(b'\x89PNG') and png == (tmp_path / 'eval.png').read_bytes()


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_export_drop_then_eval_scores_the_subtree_as_without_memory(memory_bundle, tmp_path, capsys):
  bundle = tmp_path / 'bundle'
  shutil.copytree(memory_bundle, bundle)  # `hmem export`'s bundle, edited below
  texts = _texts(40)
  level1 = open_source(bundle=str(bundle)).router.route(texts).path[:, 0]
  node = int(level1[0])
  files = {}
  for name, inside in (('inside', True), ('outside', False)):
    files[name] = tmp_path / f'{name}.jsonl'
    files[name].write_text(''.join(json.dumps({'text': t}) + '\n'
                                   for t, n in zip(texts, level1) if (n == node) == inside))
  capsys.readouterr()
  assert main(['bank', 'drop', '--bundle', str(bundle), '--node', f'1:{node}']) == 0
  assert main(['eval', '--bundle', str(bundle), '--data', str(files['inside']), '--json', '--no-progress']) == 0
  inside = _last_json(capsys)
  assert inside['documents'] == int((level1 == node).sum()) and inside['ppl_fetched'] == inside['ppl_none']
  plot = tmp_path / 'eval.png'
  assert main(['eval', '--bundle', str(bundle), '--data', str(files['outside']), '--plot', str(plot),
               '--no-progress']) == 0
  out = capsys.readouterr().out.splitlines()
  outside = json.loads(out[-1])
  assert outside['ppl_fetched'] != outside['ppl_none']  # the other subtrees still act
  assert out[0].split()[0] == 'mode' and [line.split()[0] for line in out[1:4]] == ['fetched', 'generic', 'none']
  assert plot.stat().st_size > 0


def test_generate_prints_the_routed_path_then_the_text(memory_run, capsys):
  run, prompt = str(memory_run[3]), 'Classical music of the 20th century'
  args = ['generate', '--workdir', run, '--prompt', prompt, '--max-new-tokens', '6', '--no-progress']
  assert main(args) == 0
  path_line, text = capsys.readouterr().out.splitlines()[:2]
  expected = open_source(workdir=run).router.route([prompt]).path[0]
  assert path_line == f'path: 1:{expected[0]} 2:{expected[1]}' and text.startswith(prompt)
  assert main(args + ['--block', f'1:{expected[0]}']) == 0
  assert capsys.readouterr().out.splitlines()[0].split()[1] != f'1:{expected[0]}'
  assert main(args + ['--memory', 'none', '--block-best']) == 2
  assert 'need --memory fetched' in capsys.readouterr().err


def test_generate_refuses_a_prompt_prepare_would_skip_in_one_line(memory_run, capsys):
  """`hmem generate --prompt $'x\\xff'`: the shell's byte reaches Python as a lone surrogate."""
  for prompt, reason in (('x\udcff', 'invalid_unicode'), ('  ', 'empty')):
    assert main(['generate', '--workdir', str(memory_run[3]), '--prompt', prompt, '--no-progress']) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f'hmem: error: the prompt cannot be used ({reason}') and not captured.out
    assert captured.err.count('\n') == 1


def test_eval_and_generate_use_the_persistent_compile_cache(memory_run, tmp_path, monkeypatch, capsys):
  before = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv('HMEM_CACHE', str(tmp_path / 'cache'))
  try:
    for command in (['generate', '--prompt', 'Music', '--max-new-tokens', '1'], ['eval', '--data', str(WIKI)]):
      jax.config.update('jax_compilation_cache_dir', before)
      if command[0] == 'eval':
        (tmp_path / 'one.jsonl').write_text(json.dumps({'text': _texts(1)[0]}) + '\n')
        command[-1] = str(tmp_path / 'one.jsonl')
      assert main([*command, '--workdir', str(memory_run[3]), '--no-progress']) == 0
      assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'cache'), command[0]
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
  capsys.readouterr()


def test_eval_reads_a_training_corpus_with_metadata_fields(memory_run, tmp_path, capsys):
  """Fields eval does not use (an id, a title, the sample's label) are ignored and counted,
  and the records score as without them."""
  with open(WIKI) as f:
    records = [json.loads(line) for line in f][:3]
  corpus, plain = tmp_path / 'corpus.jsonl', tmp_path / 'plain.jsonl'
  corpus.write_text(''.join(json.dumps({'id': i, 'title': f't{i}', **r}) + '\n' for i, r in enumerate(records)))
  plain.write_text(''.join(json.dumps({'text': r['text']}) + '\n' for r in records))
  results = []
  for path in (corpus, plain):
    assert main(['eval', '--workdir', str(memory_run[3]), '--data', str(path), '--json', '--no-progress']) == 0
    results.append(_last_json(capsys))
  with_fields, without = results
  assert with_fields['documents'] == 3 and with_fields['skipped'] == {}
  assert with_fields['ignored_fields'] == {'id': 3, 'title': 3, 'label': 3} and without['ignored_fields'] == {}
  assert {k: v for k, v in with_fields.items() if k != 'ignored_fields'} == \
      {k: v for k, v in without.items() if k != 'ignored_fields'}


def test_an_imported_run_evaluates_and_generates_without_memory(imported_run, tmp_path, capsys):
  """A run made by `hmem import` (no memory, no tree) reads text with its own tokenizer:
  eval scores it in mode none as a direct computation does, generate continues a prompt."""
  from hmem.infer.decoder import generate
  texts = [t[:300] for t in _texts(3)]
  path = tmp_path / 'eval.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  assert main(['eval', '--workdir', str(imported_run), '--data', str(path), '--json', '--no-progress']) == 0
  result = _last_json(capsys)
  assert set(result) == {'documents', 'tokens', 'ppl_none', 'skipped', 'ignored_fields'}
  source = open_source(workdir=str(imported_run))
  assert source.router is None and source.tokenizer.vocab_size == 96
  ppl, _ = _direct(source, texts, [], np.zeros(len(texts), np.int64), 'none')
  np.testing.assert_allclose(result['ppl_none'], ppl, rtol=1e-5)
  prompt = 'Classical music of the'
  assert main(['generate', '--workdir', str(imported_run), '--prompt', prompt, '--max-new-tokens', '5',
               '--no-progress']) == 0
  path_line, text = capsys.readouterr().out.splitlines()[:2]
  ids = source.tokenizer.encode([prompt])
  new = generate(source.model, ids, None, eot_id=source.tokenizer.eot_id, max_new_tokens=5)[0]
  assert path_line == 'path: none (the run has no memory)' and text == prompt + source.tokenizer.decode(new)
