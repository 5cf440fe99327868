"""Test setup: 8 fake CPU devices (set before jax is imported), a persistent compile cache,
and shared fixtures.

The expensive fixtures (the tiny run, the memory run and its float32 bundle) are built
once per test session, not once per xdist worker: the first worker to ask builds them in
a directory every worker sees, under a lock, and the others wait and reuse it. Tests copy
what they change (these directories are read by the other worker at the same time).
"""

import fcntl
import json
import os
import pathlib
import shutil

# LLVM at -O0: the tests' models are tiny, so compiling, not running, is most of their time,
# and -O0 halves the CPU seconds of a compile (docs/PERFORMANCE.md, "The test suite").
# Tests that give a subprocess its own XLA_FLAGS add FAST_COMPILE to them.
FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count=8 {FAST_COMPILE}'
                           ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = pathlib.Path(__file__).resolve().parents[1]
WIKI = REPO / 'tests' / 'data' / 'wiki_sample.jsonl'
# Through the environment, so `hmem` subprocesses started by tests share the cache.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(REPO / '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def repo() -> pathlib.Path:
  return REPO


def tiny_config(*overrides: str):
  """configs/tiny.py with `a.b=value` overrides."""
  from hmem.config import load_config
  return load_config(str(REPO / 'configs' / 'tiny.py'), overrides)


@pytest.fixture(scope='session')
def make_config():
  return tiny_config


def build_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """The directory `name`, shared by every xdist worker of this session, filled by
  `build(directory)` the first time any worker asks; the others block until it is done.
  A build that raised is tried again by the next to ask."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base  # workers' base dirs are siblings
  target, done = root / 'shared' / name, root / 'shared' / f'{name}.done'
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(root / 'shared' / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(target, ignore_errors=True)
      target.mkdir()
      build(target)
      done.touch()
  return target


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """configs/tiny.py trained for its 20 steps once per test session: (config, workdir, summary)."""
  def build(root):
    from hmem.train.trainer import train
    (root / 'summary.json').write_text(json.dumps(train(tiny_config(), str(root / 'run'), progress=False)))

  root = build_once(tmp_path_factory, 'tiny_run', build)
  return tiny_config(), root / 'run', json.loads((root / 'summary.json').read_text())


# configs/tiny.py with FFN memory (and a generic block) on a k=4, depth-2 tree of the wiki sample.
MEMORY_RUN = ('model.vocab_size=512', 'memory.levels=(8, 4)', 'data.source=prepared', 'data.tokenizer_sample=400',
              'data.tree_sample=400', 'data.kmeans_samples=256', 'data.kmeans_steps=5', 'data.tfidf_dim=32',
              'data.eval_fraction=0.1', 'train.steps=6', 'train.checkpoint_every=6', 'train.eval_every=0',
              'train.log_every=6', 'train.warmup_steps=2')


@pytest.fixture(scope='session')
def memory_run(tmp_path_factory):
  """(config, prepared dataset, manifest, run directory): a few steps of tiny + memory on the
  wiki sample, shared by the inference tests."""
  def build(root):
    from hmem.data.prepare import prepare
    from hmem.train.trainer import train
    cfg = tiny_config(*MEMORY_RUN, f'data.path={root / "data"}')
    prepare(cfg, str(WIKI), str(root / 'data'), workers=1, progress=False)  # in this process: fast
    train(cfg, str(root / 'run'), progress=False)

  root = build_once(tmp_path_factory, 'memory_run', build)
  manifest = json.loads((root / 'data' / 'manifest.json').read_text())
  return tiny_config(*MEMORY_RUN, f'data.path={root / "data"}'), root / 'data', manifest, root / 'run'


@pytest.fixture(scope='session')
def memory_bundle(memory_run, tmp_path_factory):
  """The memory run exported as a float32 bundle by the CLI (`hmem export`), once per session."""
  def build(root):
    from hmem.cli import main
    assert main(['export', '--workdir', str(memory_run[3]), '--out', str(root / 'bundle'), '--dtype', 'float32',
                 '--no-progress']) == 0

  return build_once(tmp_path_factory, 'memory_bundle', build) / 'bundle'


def rolling_task(root, name: str, texts) -> None:
  """A local lm-eval task `name` in `root`: rolling perplexity (word_perplexity) over `texts`."""
  (root / f'{name}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  (root / f'{name}.yaml').write_text(json.dumps({  # JSON is YAML
      'task': name, 'dataset_path': 'json', 'test_split': 'test',
      'dataset_kwargs': {'data_files': {'test': str(root / f'{name}.jsonl')}}, 'output_type': 'loglikelihood_rolling',
      'doc_to_text': '', 'doc_to_target': '{{text}}', 'metric_list': [{'metric': 'word_perplexity'}]}))


def saved_items(workdir, step=None, items=('params',)):
  """{item: numpy tree} of a run's checkpoint (the latest if `step` is None), read without
  a target mesh, so runs on different meshes compare leaf by leaf."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step() if step is None else step
  metadata = manager.item_metadata(step)
  like = lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype')
  args = {name: ocp.args.StandardRestore(jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata[name],
                                                      is_leaf=like))
          for name in items}
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  manager.close()
  return {name: jax.tree.map(np.asarray, restored[name]) for name in items}


def assert_trees_close(a, b, rtol, atol):
  """Same structure, every leaf close (the failure names the leaf)."""
  import jax
  import numpy as np
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """A fake object store: `gs://bucket/...` paths live under a temporary directory
  (tests/object_store.py). Yields that directory."""
  from object_store import fake_gcs
  root = tmp_path / 'gcs'
  (root / 'bucket').mkdir(parents=True)
  with fake_gcs(root, monkeypatch):
    yield root



@pytest.fixture(scope='session')
def imported_run(tmp_path_factory):
  """tests/data/tiny_hf/llama3 through `hmem import` with a character-level tokenizer of
  its 96-token vocabulary: a run without memory or tree that has its own tokenizer."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  from hmem.cli import main
  root = tmp_path_factory.mktemp('imported')
  chars = sorted(set(WIKI.read_text(encoding='utf-8')))[:94]
  vocab = {'<unk>': 0, '<|endoftext|>': 1, **{c: i + 2 for i, c in enumerate(chars)}}
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex('.'), 'isolated')
  tokenizer.decoder = decoders.Fuse()
  tokenizer.save(str(root / 'tokenizer.json'))
  assert main(['import', '--from', str(REPO / 'tests' / 'data' / 'tiny_hf' / 'llama3'), '--out', str(root / 'run'),
               '--tokenizer', str(root / 'tokenizer.json'), '--no-progress']) == 0
  return root / 'run'


# --- Where the suite's time goes: with HMEM_TEST_DURATIONS=FILE (what .ci/run sets), every
# test's seconds (setup + call + teardown, as its worker measured them) are written to FILE,
# slowest first, with the total and the count of `slow` tests. Runs in the controller, which
# receives every worker's reports.

_DURATIONS: dict[str, list] = {}


def pytest_runtest_logreport(report):
  entry = _DURATIONS.setdefault(report.nodeid, [0.0, False])
  entry[0] += report.duration
  entry[1] = entry[1] or 'slow' in report.keywords


def pytest_sessionfinish(session):
  path = os.environ.get('HMEM_TEST_DURATIONS')
  if not path or hasattr(session.config, 'workerinput'):  # a worker: the controller writes
    return
  rows = sorted(_DURATIONS.items(), key=lambda kv: -kv[1][0])
  total, slow = sum(d for d, _ in _DURATIONS.values()), sum(d for d, s in _DURATIONS.values() if s)
  with open(path, 'w') as f:
    f.write(f'# {len(rows)} tests, {total:.0f} s of test time ({slow:.0f} s in tests marked slow), slowest first\n')
    for nodeid, (seconds, is_slow) in rows:
      f.write(f'{seconds:8.2f}  {"slow " if is_slow else "     "} {nodeid}\n')
