"""Fact capacity: how many facts a dense model and anchor + memory store, as N grows.

  python benchmarks/knowledge.py [--quick] [--entities 100 200 400 800] [--config configs/facts.py]
                                 [--workdir runs/knowledge] [--probes 512] [--config.KEY=VALUE ...]

For each N: `hmem.corpora.facts` writes N synthetic biographies (4 facts each, 16 candidate
values per attribute, chance 1/16) -> `hmem prepare` -> the dense anchor, trained for
--anchor-epochs over the corpus -> from it, for the same --epochs more on the same batches:
  dense       the anchor's size, no memory;
  dense wide  FLOP-matched to anchor + fetch: every FFN widened by the fetched width
              (sum of memory.levels), trained from scratch for the anchor's and the extra
              steps together (it sees every token the memory pipeline saw, at a per-step
              cost no lower than either stage);
  memory      anchor + memory co-trained (`train.init_from`), exported, then scored with
              the fetched rows, the generic block, no memory, and each probe's own
              level-1 subtree blocked (`--block-best`).
Scored by `hmem eval` on --probes probes ("The birth city of NAME is", trained phrasing), the
same questions in a held-out phrasing, and the perplexity of held-out paraphrases of the
biographies. Prints one table per N as it finishes, the accuracy table (N x mode), saves
accuracy against N as WORKDIR/knowledge.png, and last one JSON object (with each stage's
wall seconds per N).

Every stage is reused when rerun (runs resume, evaluations are cached per checkpoint), so
an interrupted run picks up where it stopped. --quick: 32 entities, 2 + 4 epochs, 64
probes, a depth-2 tree with the same fetched width, no dense wide (a smoke test of the
other stages; its accuracies mean little). Steps follow the corpus: an epoch is
ceil(sequences / batch_size) steps.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import sys
import time

from hmem.config import load_config
from hmem.corpora.facts import write_facts
from hmem.data.prepare import prepare
from hmem.infer.bundle import open_bundle, read_manifest
from hmem.infer.source import open_source
from hmem.quickstart import evaluate_cached, export_latest, latest_step
from hmem.train.trainer import train

MODES = ('dense', 'dense_wide', 'fetched', 'generic', 'none', 'blocked')
STAGES = ('anchor', 'memory', 'dense', 'dense_wide')
SETS = ('probes', 'probes_heldout', 'heldout')  # eval files: trained phrasing, held-out phrasing, paraphrase ppl


def stage_configs(cfg, data: str, sequences: int, runs: dict, anchor_epochs: float, epochs: float) -> dict:
  """{run: config} of the four trainings of one N."""
  def steps(e):
    return max(1, math.ceil(e * sequences / cfg.train.batch_size))

  base = copy.deepcopy(cfg)
  base.data.path = data
  base.train.checkpoint_every = 10 ** 9  # the trainer saves the final step anyway
  anchor = copy.deepcopy(base)
  anchor.memory.levels = (0,) * cfg.memory.depth
  anchor.train.steps = steps(anchor_epochs)
  memory = copy.deepcopy(base)
  memory.train.update(init_from=runs['anchor'], steps=steps(epochs))
  dense = copy.deepcopy(anchor)
  dense.train.update(init_from=runs['anchor'], steps=steps(epochs))
  wide = copy.deepcopy(anchor)
  wide.model.ffn = cfg.model.ffn + sum(cfg.memory.levels)
  wide.train.steps = anchor.train.steps + dense.train.steps
  return {'anchor': anchor, 'memory': memory, 'dense': dense, 'dense_wide': wide}


def run_n(cfg, root: str, n: int, args) -> dict:
  """Every stage for N entities; returns {acc_<set>_<mode>, ppl_heldout_<mode>, ...}."""
  d = os.path.join(root, f'n{n}')
  seconds, clock = {}, time.perf_counter()

  def lap(stage):  # wall seconds of each stage (near 0 where a rerun reused it)
    nonlocal clock
    seconds[stage], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

  files = write_facts(d, n, seed=cfg.train.seed, probes=args.probes)
  data = os.path.join(d, 'data')
  # In this process: a corpus of hundreds of documents takes seconds, less than starting
  # Beam's worker processes (12 s -> 7 s at N=32).
  manifest = prepare(cfg, files['train'], data, workers=1, progress=False)
  lap('prepare')
  runs = {name: os.path.join(d, name) for name in STAGES}
  configs = {name: c for name, c in stage_configs(cfg, data, manifest['sequences'], runs, args.anchor_epochs,
                                                 args.epochs).items() if name in args.stages}
  for name, stage_cfg in configs.items():
    if train(stage_cfg, runs[name], progress=args.progress)['stopped_by_signal']:
      sys.exit(f'stopped by a signal while training {name}; run again to resume')
    lap(f'train_{name}')
  bundle = os.path.join(d, 'bundle')
  export_latest(runs['memory'], bundle, args.progress)
  lap('export')
  models = {'memory': (lambda: open_bundle(bundle), read_manifest(bundle)['step'], True)}
  for name in (n for n in ('dense', 'dense_wide') if n in configs):
    models[name] = (lambda w=runs[name]: open_source(workdir=w), latest_step(runs[name]), False)
  out = {'entities': n, 'sequences': manifest['sequences'], 'steps_anchor': configs['anchor'].train.steps,
         'steps_extra': configs['memory'].train.steps}
  for name, (open_model, step, block) in models.items():
    open_model = functools.cache(open_model)  # opened (and compiled) once for its three sets, if not cached
    for s in SETS:
      r = evaluate_cached(open_model, step, files[s], os.path.join(d, f'eval_{name}_{s}.json'), block, False)
      key = 'ppl' if s == 'heldout' else 'acc'
      for mode in (('fetched', 'generic', 'none', 'blocked') if block else ('none',)):
        out[f'{key}_{s}_{name if not block else mode}'] = r[f'{key}_{mode}']
    lap(f'eval_{name}')
  out['seconds'] = seconds
  out['minutes'] = round(sum(seconds.values()) / 60, 2)
  return out


def table(results: list[dict]) -> str:
  head = f'{"":<30}' + ''.join(f'{m:>12}' for m in MODES)
  lines = [head]
  for r in results:
    for s, label in (('probes', 'acc, trained phrasing'), ('probes_heldout', 'acc, held-out phrasing'),
                     ('heldout', 'ppl, held-out paraphrases')):
      key = 'ppl' if s == 'heldout' else 'acc'
      name = f'N={r["entities"]} {label}'
      lines.append(f'{name:<30}'
                   + ''.join(_cell(r.get(f'{key}_{s}_{m}'), key) for m in MODES))
  return '\n'.join(lines)


def _cell(value, key: str) -> str:
  return f'{"-":>12}' if value is None else f'{value:>12{".3f" if key == "acc" else ".1f"}}'


def plot(results: list[dict], path: str) -> None:
  """Probe accuracy (trained phrasing solid, held-out dashed) against N, one line per mode."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  ns = [r['entities'] for r in results]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for j, mode in enumerate(m for m in MODES if f'acc_probes_{m}' in results[0]):
    ax.plot(ns, [r[f'acc_probes_{mode}'] for r in results], 'o-', color=f'C{j}', label=mode)
    ax.plot(ns, [r[f'acc_probes_heldout_{mode}'] for r in results], 'x--', color=f'C{j}', alpha=0.6)
  ax.axhline(1 / 16, color='grey', lw=0.8, ls=':', label='chance (1/16)')
  ax.set_xscale('log', base=2)
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.minorticks_off()
  ax.set_xlabel('entities N (4 facts each)')
  ax.set_ylabel('probe accuracy')
  ax.set_title('facts stored vs facts shown (solid: trained phrasing, dashed: held-out)', fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true')
  p.add_argument('--config', default=os.path.join(os.path.dirname(__file__), '..', 'configs', 'facts.py'))
  p.add_argument('--workdir', default='runs/knowledge')
  p.add_argument('--entities', type=int, nargs='+', default=[100, 200, 400, 800])
  p.add_argument('--anchor-epochs', type=float, default=None, help='default: the config module\'s ANCHOR_EPOCHS')
  p.add_argument('--epochs', type=float, default=None, help='extra epochs; default: the config module\'s EPOCHS')
  p.add_argument('--probes', type=int, default=512, help='probed (entity, attribute) pairs per N')
  p.add_argument('--progress', action='store_true', help='progress bars of the trainings')
  args, overrides = p.parse_known_args(argv)
  cfg = load_config(args.config, overrides)
  args.stages = STAGES
  if args.quick:  # no dense wide: from scratch like the anchor, scored like the dense model
    args.entities, args.probes, args.stages = [32], 64, STAGES[:3]
    args.anchor_epochs, args.epochs = 2, 4
    # 64 leaves for 32 entities, the same fetched width: a bank (and checkpoints) 8x smaller.
    cfg.memory.update(depth=2, levels=(32, sum(cfg.memory.levels) - 32))
  defaults = _epochs(args.config)
  args.anchor_epochs = defaults[0] if args.anchor_epochs is None else args.anchor_epochs
  args.epochs = defaults[1] if args.epochs is None else args.epochs
  os.makedirs(args.workdir, exist_ok=True)
  start = time.perf_counter()
  results = []
  for n in args.entities:
    results.append(run_n(cfg, args.workdir, n, args))
    print(table(results[-1:]), flush=True)
  print('\n' + table(results))
  png = os.path.join(args.workdir, 'knowledge.png')
  plot(results, png)
  print(f'plot: {png}')
  summary = {'results': results, 'anchor_epochs': args.anchor_epochs, 'epochs': args.epochs,
             'overrides': overrides, 'minutes': round((time.perf_counter() - start) / 60, 2),
             'machine': f'{platform.machine()} {os.cpu_count()} cpus'}
  print(json.dumps(summary))
  return summary


def _epochs(config_path: str) -> tuple[float, float]:
  """(ANCHOR_EPOCHS, EPOCHS) of the config module: the recipe's passes over the corpus."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('facts_recipe', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.ANCHOR_EPOCHS, module.EPOCHS


if __name__ == '__main__':
  main()
