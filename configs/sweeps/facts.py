"""Which settings make the memory store facts: the facts recipe (configs/facts.py) with one
setting changed per run, on the fact benchmark's N=400 corpus and anchor.

    python benchmarks/knowledge.py --entities 400     # the corpus, its dataset, the anchor
    hmem sweep run configs/sweeps/facts.py
    hmem sweep collect configs/sweeps/facts.py        # + probe accuracy per run (evaluate)

Every run co-trains the memory from the benchmark's anchor (runs/knowledge/n400/anchor) on
its dataset, as the benchmark's memory stage does; the run named `base` is that stage's
recipe. `evaluate` exports each finished run and scores the benchmark's probes: fetched,
generic block and own-subtree-blocked accuracy on the trained phrasing, fetched on the
held-out one. The tree (k, depth) is part of the dataset, so entities per leaf are varied
by the benchmark's N instead. Set KNOWLEDGE / N to use another benchmark run.
"""

import importlib.util
import json
import math
import os

from hmem.errors import ConfigError

KNOWLEDGE, N = 'runs/knowledge', 400


def _recipe():
  spec = importlib.util.spec_from_file_location('facts_recipe', os.path.join(os.path.dirname(__file__), '..',
                                                                             'facts.py'))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  return recipe


def _steps(cfg, epochs: float) -> int:
  """Steps of `epochs` passes over the dataset (as the benchmark counts them)."""
  path = os.path.join(cfg.data.path, 'manifest.json')
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found: this sweep trains on the fact benchmark\'s data and anchor; run '
                      f'`python benchmarks/knowledge.py --entities {N} --workdir {KNOWLEDGE}` first')
  with open(path) as f:
    sequences = json.load(f)['sequences']
  return max(1, math.ceil(epochs * sequences / cfg.train.batch_size))


def get_config():
  recipe = _recipe()
  c = recipe.get_config()
  root = os.path.join(KNOWLEDGE, f'n{N}')
  c.data.path = os.path.join(root, 'data')
  c.train.update(init_from=os.path.join(root, 'anchor'), steps=_steps(c, recipe.EPOCHS),
                 checkpoint_every=10 ** 9)  # the final step is saved anyway
  return c


def sweep():
  base = get_config()
  yield {}  # the recipe
  for lr in (3e-3, 3e-2):  # the anchor's lr; 3x the recipe's
    yield {'memory.lr': lr}
  yield {'memory.min_lr': 1e-2}  # no decay
  for epochs in (4, 16):
    yield {'train.steps': _steps(base, epochs)}
  for levels in ((16, 16, 32), (64, 64, 128)):  # half and twice the fetched width
    yield {'memory.levels': levels}
  for layers in ((0, 1), (1, 2)):  # memory in the first or the last layer only
    yield {'memory.layers': layers}
  for generic_prob in (0.0, 0.25):  # the recipe's default is 1/(k+1) = 0.11
    yield {'memory.generic_prob': generic_prob}


def evaluate(cfg, workdir: str) -> dict:
  from hmem.bundle.export import export_latest
  from hmem.bundle.format import read_manifest
  from hmem.infer.evaluate import evaluate_cached
  from hmem.infer.source import open_source
  bundle = os.path.join(workdir, 'bundle')
  export_latest(workdir, bundle, progress=False)
  step, probes = read_manifest(bundle)['step'], os.path.join(os.path.dirname(cfg.data.path), '{}.jsonl')
  trained, heldout = (evaluate_cached(lambda: open_source(bundle=bundle), step, probes.format(name),
                                      os.path.join(workdir, f'eval_{name}.json'), block, False)
                      for name, block in (('probes', True), ('probes_heldout', False)))
  # A run without a generic block (generic_prob 0) has no generic accuracy: left blank.
  return {**{key: trained[key] for key in ('acc_fetched', 'acc_generic', 'acc_blocked') if key in trained},
          'acc_heldout_fetched': heldout['acc_fetched']}
