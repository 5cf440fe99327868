"""lm-evaluation-harness through `hmem serve`: `lm_eval --model local-completions` with
`tokenizer_backend=remote` (what it sends: token ids, echo, logprobs, max_tokens 1; what it
reads: /tokenizer_info, /tokenize) scores a local multiple-choice task as `lm_eval --model
hmem` does, per memory mode picked by the model id, with no hub access.

Modes none and generic: the harness model routes a choice by its context, which the
completions API cannot tell from the continuation (one token list), so the server routes
the whole text in mode fetched and the two differ there by design."""

import json
import os

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # the task reads local JSONL; no hub here

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import WIKI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from serving import randomize_bank, running  # noqa: E402

from hmem.bundle.export import export  # noqa: E402
from hmem.infer.server import CompletionServer  # noqa: E402
from hmem.infer.source import open_source  # noqa: E402

NAME = 'tiny'
TASK = {'task': 'hmem_mc', 'output_type': 'multiple_choice', 'doc_to_text': '{{prompt}}',
        'doc_to_choice': 'candidates', 'doc_to_target': 'answer', 'metric_list': [{'metric': 'acc'}]}


@pytest.fixture(scope='module')
def task_manager(tmp_path_factory):
  root = tmp_path_factory.mktemp('tasks')
  texts = [json.loads(line)['text'] for line in WIKI.read_text().splitlines()[:16]]
  records = [{'prompt': t[:60].rsplit(' ', 1)[0], 'candidates': [t[60:].split()[0], 'the', 'music'], 'answer': 0}
             for t in texts]
  (root / 'hmem_mc.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  spec = {**TASK, 'dataset_path': 'json', 'dataset_kwargs': {'data_files': {'test': str(root / 'hmem_mc.jsonl')}},
          'test_split': 'test'}
  (root / 'hmem_mc.yaml').write_text(json.dumps(spec))  # JSON is YAML
  return TaskManager(include_path=str(root))


@pytest.fixture(scope='module')
def bundle(memory_run, tmp_path_factory):
  out = tmp_path_factory.mktemp('serve_harness') / 'bundle'
  export(str(memory_run[3]), str(out), dtype='float32', progress=False)
  randomize_bank(out)  # memory modes must differ to mean something
  return out


def _evaluate(model, model_args, task_manager):
  out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=['hmem_mc'], task_manager=task_manager,
                                batch_size=4, log_samples=True, verbosity='WARNING')
  samples = sorted(out['samples']['hmem_mc'], key=lambda s: s['doc_id'])
  return out['results']['hmem_mc']['acc,none'], np.array([[r[0][0] for r in s['resps']] for s in samples])


def test_local_completions_through_the_server_equals_the_harness_model(bundle, task_manager):
  server = CompletionServer(open_source(bundle=str(bundle)), name=NAME, slots=4)
  with running(server) as (_, _, base):
    results = {}
    for mode in ('none', 'generic'):
      args = (f'base_url={base}/v1/completions,model={NAME}:{mode},tokenizer_backend=remote,'
              f'tokenized_requests=True,max_length={server.context}')
      remote = _evaluate('local-completions', args, task_manager)
      local = _evaluate('hmem', f'bundle={bundle},memory={mode}', task_manager)
      np.testing.assert_allclose(remote[1], local[1], rtol=1e-4, atol=1e-4, err_msg=mode)
      assert remote[0] == local[0], mode  # accuracy, exactly
      results[mode] = local
  assert not np.allclose(results['none'][1], results['generic'][1], rtol=1e-3)  # the modes differ
