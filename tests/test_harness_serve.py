"""A second implementation agrees with the harness model: the same local tasks scored by
`lm_eval --model hmem` and by lm-eval's `local-completions` model through `hmem serve`
(token-id prompts, `echo` and `logprobs`, the remote tokenizer endpoints; issue 25's server)
give the same loglikelihood per request (1e-5 relative) and the same accuracies, in the
modes the completions API can ask for by model id (`NAME:none`, `NAME:generic`; `fetched`
routes by the whole prompt there, by the context in the harness model)."""

import json
import os
import shutil

import lm_eval
import numpy as np
import pytest
from conftest import WIKI, rolling_task
from serving import NAME, randomize_bank, running

from hmem.infer import table
from hmem.infer.server import CompletionServer
from hmem.infer.source import open_source

MAX_LENGTH = 32  # tokens the model reads: rolling documents span several windows


@pytest.fixture(scope='module')
def served(memory_bundle, tmp_path_factory):
  """(bundle, base URL) of `hmem serve`'s app on a thread, over a copy of the shared bundle
  with random bank rows (the memory modes must differ to mean something)."""
  bundle = tmp_path_factory.mktemp('agree') / 'bundle'
  shutil.copytree(memory_bundle, bundle)
  randomize_bank(bundle)
  server = CompletionServer(open_source(bundle=str(bundle)), name=NAME, slots=4)
  with running(server) as (_, _, url):
    yield bundle, url


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  """Multiple choice over 12 capitals and rolling perplexity over 3 documents longer than
  MAX_LENGTH tokens."""
  root = tmp_path_factory.mktemp('agree_tasks')
  with open(WIKI) as f:
    texts = [json.loads(line)['text'][:400] for line in f][40:43]
  rolling_task(root, 'agree_docs', texts)
  return root


@pytest.mark.parametrize('mode', ['none', 'generic'])
def test_local_completions_through_hmem_serve_equal_the_harness_model(served, task_dir, mode):
  bundle, url = served
  tasks = ['hmem_capital', 'agree_docs']
  manager = table.task_manager(tasks, [str(task_dir)])
  common = dict(tasks=tasks, task_manager=manager, limit=12, log_samples=True)
  ours = lm_eval.simple_evaluate(model='hmem', model_args=f'bundle={bundle},memory={mode},max_length={MAX_LENGTH}',
                                 batch_size=4, **common)
  # local-completions reads max_length - 1 tokens at once; lm-eval's hf model (and hmem) max_length.
  os.environ.setdefault('OPENAI_API_KEY', 'unused')
  theirs = lm_eval.simple_evaluate(
      model='local-completions', batch_size=1, **common,
      model_args=f'base_url={url}/v1/completions,model={NAME}:{mode},tokenizer_backend=remote,'
                 f'max_length={MAX_LENGTH + 2},num_concurrent=1,max_retries=1')
  a, b = table.per_request(ours), table.per_request(theirs)
  assert a.keys() == b.keys() and len(a) == 12 * 4 + 3
  np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=1e-5)
  assert theirs['results']['hmem_capital']['acc,none'] == ours['results']['hmem_capital']['acc,none']
  np.testing.assert_allclose(theirs['results']['agree_docs']['word_perplexity,none'],
                             ours['results']['agree_docs']['word_perplexity,none'], rtol=1e-5)
