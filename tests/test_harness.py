"""The lm-evaluation-harness model: the harness's own `simple_evaluate` on local task YAML
gives `hmem eval`'s accuracy and perplexity and `hmem generate`'s text, per memory mode."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # the tasks read local JSONL; no hub here

import lm_eval  # noqa: E402  (the `eval` extra; the test extra includes it)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import WIKI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hmem.errors import UserError  # noqa: E402
from hmem.infer.decoder import complete  # noqa: E402
from hmem.infer.evaluate import evaluate  # noqa: E402
from hmem.infer.harness import HarnessLM  # noqa: E402
from hmem.infer.source import ArrayBank, open_source  # noqa: E402
from hmem.memory.spec import memory_spec

TASKS = {
    'hmem_mc': {'output_type': 'multiple_choice', 'doc_to_text': '{{prompt}}', 'doc_to_choice': 'candidates',
                'doc_to_target': 'answer', 'metric_list': [{'metric': 'acc'}]},
    'hmem_ppl': {'output_type': 'loglikelihood_rolling', 'doc_to_text': '', 'doc_to_target': '{{text}}',
                 'metric_list': [{'metric': 'word_perplexity'}, {'metric': 'byte_perplexity'}]},
    'hmem_gen': {'output_type': 'generate_until', 'doc_to_text': '{{prompt}}', 'doc_to_target': '{{target}}',
                 'generation_kwargs': {'until': ['.', ','], 'max_gen_toks': 6, 'do_sample': False},
                 'metric_list': [{'metric': 'exact_match'}]},
}


def _texts():
  with open(WIKI) as f:
    return [json.loads(line)['text'] for line in f]


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
  """Task YAML over local JSONL ({name: records}) and a TaskManager that finds them."""
  root = tmp_path_factory.mktemp('tasks')
  texts = _texts()
  records = {
      'hmem_ppl': [{'text': t} for t in texts[:4]],  # the first is longer than seq_len: windows
      'hmem_mc': [{'prompt': t[:60].rsplit(' ', 1)[0], 'candidates': [t[60:].split()[0], 'the', 'music'],
                   'answer': 0} for t in texts[:16]],
      'hmem_gen': [{'prompt': t[:40].rsplit(' ', 1)[0], 'target': t[40:].split()[0]} for t in texts[4:8]],
  }
  for name, config in TASKS.items():
    data = root / f'{name}.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in records[name]))
    spec = {'task': name, 'dataset_path': 'json', 'dataset_kwargs': {'data_files': {'test': str(data)}},
            'test_split': 'test', **config}
    (root / f'{name}.yaml').write_text(json.dumps(spec))  # JSON is YAML
  return records, TaskManager(include_path=str(root)), root


@pytest.fixture(scope='module')
def lm(memory_run):
  """The run through the harness model, its bank rows randomised as in test_evaluate: a few
  training steps leave the memory almost a no-op, and modes must differ to mean something."""
  lm = HarnessLM(workdir=str(memory_run[3]), batch_size=4, progress=False)
  rng = np.random.default_rng(0)
  lm.source.rows = ArrayBank({t: {name: rng.normal(0, 0.3, shape).astype(np.float32) for name, shape in named.items()}
                              for t, named in memory_spec(lm.source.config).bank_shapes.items()})
  return lm


def _run(model, task_manager, names, **kwargs):
  return lm_eval.simple_evaluate(model=model, tasks=list(names), task_manager=task_manager, log_samples=False,
                                 verbosity='WARNING', **kwargs)['results']


def _jsonl(tmp_path, name, records):
  path = tmp_path / f'{name}.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def test_harness_scores_equal_hmem_eval_per_mode(lm, tasks, tmp_path):
  records, task_manager, _ = tasks
  ppl_records, mc_records = records['hmem_ppl'], records['hmem_mc']
  assert len(lm.tokenizer.encode([ppl_records[0]['text']])[0]) > 2 * lm.max_length  # scored in windows
  expected = evaluate(lm.source, _jsonl(tmp_path, 'eval', ppl_records + mc_records), block_best=True,
                      batch_size=4, progress=False)
  words = sum(len(re.split(r'\s+', r['text'])) for r in ppl_records)
  nbytes = sum(len(r['text'].encode()) for r in ppl_records)
  nll = {m: math.log(expected[f'ppl_{m}']) * expected['tokens'] for m in ('fetched', 'generic', 'none', 'blocked')}
  accuracy = set()
  for mode in ('fetched', 'generic', 'none', 'blocked'):
    lm.memory, lm.block_best = ('fetched', True) if mode == 'blocked' else (mode, False)
    got = _run(lm, task_manager, ['hmem_mc', 'hmem_ppl'])
    assert got['hmem_mc']['acc,none'] == expected[f'acc_{mode}'], mode  # exactly
    np.testing.assert_allclose(got['hmem_ppl']['word_perplexity,none'], math.exp(nll[mode] / words), rtol=1e-6)
    np.testing.assert_allclose(got['hmem_ppl']['byte_perplexity,none'], math.exp(nll[mode] / nbytes), rtol=1e-6)
    accuracy.add(expected[f'acc_{mode}'])
  lm.memory, lm.block_best = 'fetched', False
  # The memory matters here: modes score differently, so wrong routing would show.
  assert len({round(v, 6) for v in nll.values()}) == 4 and len(accuracy) > 1


def test_each_request_is_routed_by_its_own_context(lm):
  """A batch of requests with different contexts scores each as it scores alone, routed by
  its context alone (the continuation does not move it)."""
  from lm_eval.api.instance import Instance
  texts = _texts()[20:26]
  requests = [Instance('loglikelihood', {}, (t[:50], t[50:70]), i) for i, t in enumerate(texts)]
  together = lm.loglikelihood(requests)
  leaves = lm.source.router.route([t[:50].rstrip() for t in texts]).leaf
  assert len(set(leaves.tolist())) > 1
  for request, both in zip(requests, together):
    assert lm.loglikelihood([request]) == [pytest.approx(both, rel=1e-6)]
  # Scored with another leaf's rows, a request gets another likelihood: routing is per request.
  moved = Instance('loglikelihood', {}, (texts[1][:50], texts[0][50:70]), 0)
  assert lm.loglikelihood([moved])[0][0] != pytest.approx(together[0][0], rel=1e-6)


def test_generation_equals_hmem_generate(memory_run, tasks, capsys):
  records, task_manager, _ = tasks
  bundle = memory_run[3]
  results = lm_eval.simple_evaluate(model='hmem', model_args=f'workdir={bundle},memory=fetched', batch_size=4,
                                    tasks=['hmem_gen'], task_manager=task_manager, log_samples=True,
                                    verbosity='WARNING')
  source = open_source(workdir=str(bundle))
  samples = sorted(results['samples']['hmem_gen'], key=lambda s: s['doc_id'])
  correct = []
  for record, sample in zip(records['hmem_gen'], samples):
    _, text = complete(source, record['prompt'], max_new_tokens=6)
    cut = min([text.find(s) for s in '.,' if s in text] or [len(text)])
    assert sample['resps'][0][0] == text[:cut]
    correct.append(text[:cut].strip() == record['target'])
  assert results['results']['hmem_gen']['exact_match,none'] == pytest.approx(np.mean(correct))


def test_bad_model_args_are_one_clear_error(memory_run):
  run = str(memory_run[3])
  with pytest.raises(UserError, match='memory=.blocked.; choose one of fetched, generic, none'):
    HarnessLM(workdir=run, memory='blocked')
  with pytest.raises(UserError, match='need memory=fetched'):
    HarnessLM(workdir=run, memory='none', block_best=True)
  with pytest.raises(UserError, match='batch_size=.auto.: give an integer >= 1'):
    HarnessLM(workdir=run, batch_size='auto')


def test_lm_eval_finds_hmem_through_the_startup_hook(repo):
  """What hmem-lm-eval.pth runs at interpreter start: once lm-eval 0.4.13 loads its registry,
  `hmem` is in it as a lazy placeholder for HarnessLM (nothing of hmem's inference code is
  imported), and lm-eval's own models are still there. A fresh interpreter, as `lm_eval` is;
  the class itself resolving by name is test_generation_equals_hmem_generate."""
  code = ('import sys, hmem.lm_eval_plugin as p; p.install(); '
          'from lm_eval.api.registry import get_model, model_registry; '
          'assert get_model("dummy").__name__ == "DummyLM"; '
          'assert dict(model_registry.items())["hmem"] == "hmem.infer.harness:HarnessLM"; '
          'assert "hmem.infer" not in sys.modules; print(len(model_registry))')
  out = subprocess.run([sys.executable, '-c', code], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': str(repo)})
  assert out.returncode == 0, out.stderr
  assert int(out.stdout) > 30  # lm-eval's built-in models are all still there
  assert (repo / 'hmem-lm-eval.pth').read_text().strip() == 'import hmem.lm_eval_plugin; hmem.lm_eval_plugin.install()'


def test_memory_none_and_a_zero_bank_score_as_the_anchor(memory_bundle, tasks, tmp_path):
  """On a bundle whose bank is all zeros, fetched rows add nothing: the harness through the
  registered name gives the anchor's numbers with memory=fetched and memory=none alike,
  and they are `hmem eval`'s anchor (ppl_none) numbers."""
  from hmem.cli import main
  records, task_manager, _ = tasks
  bundle = tmp_path / 'bundle'
  shutil.copytree(memory_bundle, bundle)  # `hmem export`'s bundle, its bank zeroed below
  assert main(['bank', 'drop', '--bundle', str(bundle), '--node', '1:0', '1:1', '1:2', '1:3']) == 0
  expected = evaluate(open_source(bundle=str(bundle)), _jsonl(tmp_path, 'eval', records['hmem_ppl']),
                      progress=False)
  assert expected['ppl_fetched'] == pytest.approx(expected['ppl_none'], rel=1e-6)
  words = sum(len(re.split(r'\s+', r['text'])) for r in records['hmem_ppl'])
  anchor = math.exp(math.log(expected['ppl_none']) * expected['tokens'] / words)
  for memory in ('none', 'fetched'):
    got = _run('hmem', task_manager, ['hmem_ppl'], model_args=f'bundle={bundle},memory={memory}', batch_size=4)
    np.testing.assert_allclose(got['hmem_ppl']['word_perplexity,none'], anchor, rtol=1e-6, err_msg=memory)


def test_a_run_without_memory_or_tree_is_a_harness_model(imported_run, tmp_path):
  """A run made by `hmem import` (no memory, no tree; its checkpoint is step 0) scores with
  its own tokenizer in mode none, as `hmem eval` does; asking it for memory is an error."""
  from lm_eval.api.instance import Instance
  text = _texts()[0][:200]
  lm = HarnessLM(workdir=str(imported_run), step='0', progress=False)
  assert lm.memory == 'none'
  expected = evaluate(lm.source, _jsonl(tmp_path, 'one', [{'text': text}]), progress=False)
  (got,) = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (text,), 0)])
  assert got == pytest.approx(-math.log(expected['ppl_none']) * expected['tokens'], rel=1e-6)
  with pytest.raises(UserError, match='this run has no memory; use memory=none'):
    HarnessLM(workdir=str(imported_run), memory='fetched')
