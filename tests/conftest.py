"""Test setup: 8 fake CPU devices (set before jax is imported), a persistent compile cache,
and shared fixtures."""

import os
import pathlib

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
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


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """configs/tiny.py trained for its 20 steps once per test session: (config, workdir, summary)."""
  from hmem.train.trainer import train
  cfg = tiny_config()
  workdir = tmp_path_factory.mktemp('tiny_run')
  summary = train(cfg, str(workdir), progress=False)
  return cfg, workdir, summary


# configs/tiny.py with FFN memory (and a generic block) on a k=4, depth-2 tree of the wiki sample.
MEMORY_RUN = ('model.vocab_size=512', 'memory.levels=(8, 4)', 'data.source=prepared', 'data.tokenizer_sample=400',
              'data.tree_sample=400', 'data.kmeans_samples=256', 'data.kmeans_steps=5', 'data.tfidf_dim=32',
              'data.eval_fraction=0.1', 'train.steps=6', 'train.checkpoint_every=6', 'train.eval_every=0',
              'train.log_every=6', 'train.warmup_steps=2')


@pytest.fixture(scope='session')
def memory_run(tmp_path_factory):
  """(config, prepared dataset, manifest, run directory): a few steps of tiny + memory on the
  wiki sample, shared by the inference tests."""
  from hmem.data.prepare import prepare
  from hmem.train.trainer import train
  data = tmp_path_factory.mktemp('infer_data')
  cfg = tiny_config(*MEMORY_RUN, f'data.path={data}')
  manifest = prepare(cfg, str(WIKI), str(data), workers=1, progress=False)  # in this process: fast
  workdir = tmp_path_factory.mktemp('infer_run')
  train(cfg, str(workdir), progress=False)
  return cfg, data, manifest, workdir


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
