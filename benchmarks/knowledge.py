"""Facts stored, by N and by popularity: what a dense model and anchor + memory answer.

  python benchmarks/knowledge.py [--quick] [--entities 100 200 400 800] [--popularity uniform|zipf]
      [--zipf-exponent 1] [--max-documents 256] [--templates 4] [--seeds 1] [--baselines dense dense_wide]
      [--config configs/facts.py] [--workdir runs/knowledge] [--probes 512] [--config.KEY=VALUE ...]

For each N and seed: `hmem.corpora.facts` writes N synthetic biographies (4 facts each, 16
candidate values per attribute, chance 1/16), each entity in as many training documents as
--popularity gives it (uniform: one each; zipf: the i-th entity in max(1, round(
max_documents / i ** exponent)), a head seen hundreds of times and a long tail seen once)
and each fact in --templates phrasings -> `hmem prepare` -> the dense anchor, trained for
--anchor-epochs over the corpus -> from it, for the same --epochs more on the same batches:
  dense       the anchor's size, no memory;
  dense wide  FLOP-matched to anchor + fetch: every FFN widened by the fetched width
              (sum of memory.levels), trained from scratch for the anchor's and the extra
              steps together (it sees every token the memory pipeline saw, at a per-step
              cost no lower than either stage);
  memory      anchor + memory co-trained (`train.init_from`), exported, then scored with
              the fetched rows, the generic block, no memory, and each probe's own
              level-1 subtree blocked (`--block-best`).
Scored by `hmem eval` per popularity bucket of the probed entity (1, 2-3, 4-15, 16-63, 64+
training documents) on --probes probes shared out over the buckets ("The birth city of NAME
is", trained phrasing), the same questions in a held-out phrasing, and the perplexity of
held-out paraphrases of the biographies. --seeds K repeats everything with seeds
train.seed + 0..K-1 (the corpus's names and values and the models' initialisation), and
every figure is the mean ±standard deviation over them.

Prints per N the accuracy per bucket, the bits stored per parameter and (zipf) the paper's
popularity checks; then the accuracy table (N x mode, over all facts: buckets weighted by
their facts); saves WORKDIR/knowledge.png (accuracy against N) and, when there is more than
one bucket, WORKDIR/knowledge_popularity.png (accuracy against popularity, the largest N),
and last prints one JSON object: `results` (one summary per N, with its per-seed results),
and the largest N's `by_popularity` ({bucket: {mode: accuracy}}), `bucket_sizes` and
`checks`. benchmarks/knowledge_report.py does the arithmetic.

A run's directory is WORKDIR/n{N}[_{law}][_t{templates}][_seed{seed}] (parts at their
defaults left out, so WORKDIR/n400 is the uniform, 4-template, seed-0 run that
configs/sweeps/facts.py builds on). Every stage is reused when rerun (runs resume,
evaluations are cached per checkpoint), so an interrupted run picks up where it stopped.
--quick: 32 entities, 2 + 4 epochs, 64 probes, a depth-2 tree with the same fetched width,
no dense wide, zipf's head capped at 8 documents (a smoke test of the stages; its
accuracies mean little). Steps follow the corpus: an epoch is ceil(sequences / batch_size)
steps.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import math
import os
import platform
import sys
import time

import knowledge_report as report

from hmem.bundle.export import export_latest
from hmem.bundle.format import read_manifest
from hmem.config import load_config
from hmem.corpora import facts
from hmem.data.prepare import prepare
from hmem.errors import UserError
from hmem.infer.evaluate import evaluate_cached
from hmem.infer.source import open_source
from hmem.sizes import anchor_param_counts, memory_param_counts
from hmem.train.checkpoint import latest_step
from hmem.train.trainer import train

STAGES = ('anchor', 'memory', 'dense', 'dense_wide')
BASELINES = ('dense', 'dense_wide')


def stage_configs(cfg, data: str, sequences: int, runs: dict, anchor_epochs: float, epochs: float) -> dict:
  """{run: config} of the four trainings of one corpus."""
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


def run_dir(root: str, n: int, popularity: facts.Popularity, templates: int, seed: int) -> str:
  name = f'n{n}'
  name += '' if popularity.law == 'uniform' else f'_{popularity.tag}'
  name += '' if templates == facts.TRAIN_TEMPLATES else f'_t{templates}'
  name += '' if seed == 0 else f'_seed{seed}'
  return os.path.join(root, name)


def split_by_bucket(path: str, out_stem: str) -> dict[str, str]:
  """{bucket: JSONL of the probes whose entity is in that bucket}, as out_stem_<bucket>.jsonl."""
  groups = collections.defaultdict(list)
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      groups[facts.bucket(record['documents'])].append(record)
  paths = {}
  for b in facts.BUCKETS:
    if b in groups:
      paths[b] = f'{out_stem}_{b}.jsonl'
      facts.write_if_changed(paths[b], groups[b])
  return paths


def run_seed(cfg, d: str, n: int, args) -> dict:
  """Every stage for N entities and cfg.train.seed in directory d; returns the per-seed
  result knowledge_report reads."""
  seconds, clock = {}, time.perf_counter()

  def lap(stage):  # wall seconds of each stage (near 0 where a rerun reused it)
    nonlocal clock
    seconds[stage], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

  seed = cfg.train.seed
  files = facts.write_facts(d, n, seed=seed, probes=args.probes, popularity=args.popularity,
                            templates=args.templates)
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

  probe_files = {s: split_by_bucket(files[s], os.path.join(d, s)) for s in report.PROBE_SETS}
  models = {'memory': (lambda: open_source(bundle=bundle), read_manifest(bundle)['step'], True)}
  for name in args.baselines:
    models[name] = (lambda w=runs[name]: open_source(workdir=w), latest_step(runs[name]), False)
  acc = {s: collections.defaultdict(dict) for s in report.PROBE_SETS}
  ppl = {}
  for name, (open_model, step, block) in models.items():
    open_model = functools.cache(open_model)  # opened (and compiled) once for all its files, if not cached
    modes = ('fetched', 'generic', 'none', 'blocked') if block else ('none',)

    def score(path, out, name=name, open_model=open_model, step=step, block=block):
      return evaluate_cached(open_model, step, path, os.path.join(d, f'eval_{name}_{out}.json'), block, False)

    for s, by_bucket in probe_files.items():
      for b, path in by_bucket.items():
        r = score(path, f'{s}_{b}')
        acc[s][b].update({(mode if block else name): r[f'acc_{mode}'] for mode in modes})
    r = score(files['heldout'], 'heldout')
    ppl.update({(mode if block else name): r[f'ppl_{mode}'] for mode in modes})
    lap(f'eval_{name}')

  sizes = collections.defaultdict(collections.Counter)
  for count in args.popularity.counts(n):
    sizes[facts.bucket(count)].update(entities=1, documents=int(count))
  with open(files['probes'], encoding='utf-8') as f:
    for line in f:
      sizes[facts.bucket(json.loads(line)['documents'])]['probes'] += 1
  params = {'anchor': anchor_param_counts(configs['anchor'])['anchor_params'],
            'bank': memory_param_counts(configs['memory'])['bank_params']}
  params.update({name: anchor_param_counts(configs[name])['anchor_params'] for name in args.baselines})
  return {'seed': seed, 'entities': n, 'sequences': manifest['sequences'],
          'steps_anchor': configs['anchor'].train.steps, 'steps_extra': configs['memory'].train.steps,
          'acc': {s: dict(v) for s, v in acc.items()}, 'ppl_heldout': ppl,
          'buckets': {b: {key: sizes[b][key] for key in ('entities', 'documents', 'probes')}
                      for b in facts.BUCKETS if b in sizes},
          'params': params, 'seconds': seconds, 'minutes': round(sum(seconds.values()) / 60, 2)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true')
  p.add_argument('--config', default=os.path.join(os.path.dirname(__file__), '..', 'configs', 'facts.py'))
  p.add_argument('--workdir', default='runs/knowledge')
  p.add_argument('--entities', type=int, nargs='+', default=[100, 200, 400, 800])
  p.add_argument('--popularity', choices=facts.POPULARITY, default='uniform',
                 help='training documents per entity: one each, or Zipf over the entities\' ranks')
  p.add_argument('--zipf-exponent', type=float, default=1.0)
  p.add_argument('--max-documents', type=int, default=256, help='zipf: the most popular entity\'s documents')
  p.add_argument('--templates', type=int, default=facts.TRAIN_TEMPLATES,
                 help=f'training phrasings per fact, 1-{len(facts.TRAINABLE_TEMPLATES)} (knowledge augmentation)')
  p.add_argument('--seeds', type=int, default=1, help='seeds per N: train.seed + 0..K-1')
  p.add_argument('--baselines', nargs='*', choices=BASELINES, default=list(BASELINES),
                 help='dense models to train and score beside anchor + memory')
  p.add_argument('--anchor-epochs', type=float, default=None, help='default: the config module\'s ANCHOR_EPOCHS')
  p.add_argument('--epochs', type=float, default=None, help='extra epochs; default: the config module\'s EPOCHS')
  p.add_argument('--probes', type=int, default=512, help='probed (entity, attribute) pairs per N and seed')
  p.add_argument('--progress', action='store_true', help='progress bars of the trainings')
  args, overrides = p.parse_known_args(argv)
  cfg = load_config(args.config, overrides)
  if args.quick:  # no dense wide: from scratch like the anchor, scored like the dense model
    args.entities, args.probes, args.baselines = [32], 64, ['dense']
    args.anchor_epochs, args.epochs = 2, 4
    args.max_documents = min(args.max_documents, 8)
    # 64 leaves for 32 entities, the same fetched width: a bank (and checkpoints) 8x smaller.
    cfg.memory.update(depth=2, levels=(32, sum(cfg.memory.levels) - 32))
  if args.seeds < 1:
    raise UserError(f'--seeds {args.seeds}; give at least 1')
  # Checked here, before any work (the corpus writer would stop at the first N otherwise).
  args.popularity = facts.Popularity(args.popularity, args.zipf_exponent, args.max_documents)
  if not 1 <= args.templates <= len(facts.TRAINABLE_TEMPLATES):
    raise UserError(f'--templates {args.templates}; give 1 to {len(facts.TRAINABLE_TEMPLATES)}')
  args.stages = ('anchor', 'memory', *args.baselines)
  defaults = _epochs(args.config)
  args.anchor_epochs = defaults[0] if args.anchor_epochs is None else args.anchor_epochs
  args.epochs = defaults[1] if args.epochs is None else args.epochs
  os.makedirs(args.workdir, exist_ok=True)
  start = time.perf_counter()
  results = []
  for n in args.entities:
    per_seed = []
    for seed in range(cfg.train.seed, cfg.train.seed + args.seeds):
      seed_cfg = copy.deepcopy(cfg)
      seed_cfg.train.seed = seed
      per_seed.append(run_seed(seed_cfg, run_dir(args.workdir, n, args.popularity, args.templates, seed), n, args))
    results.append(report.summarize(per_seed))
    print(f'\nN={n}, {args.popularity.tag}, {args.templates} templates, seeds {results[-1]["seeds"]}')
    print(report.bucket_table(results[-1]), report.heldout_line(results[-1]), report.capacity_table(results[-1]),
          report.checks_table(results[-1]), sep='\n', flush=True)
  print('\n' + report.accuracy_table(results))
  png = os.path.join(args.workdir, 'knowledge.png')
  report.plot_vs_n(results, png)
  print(f'plot: {png}')
  last = results[-1]
  if len(last['bucket_sizes']) > 1:
    png = os.path.join(args.workdir, 'knowledge_popularity.png')
    report.plot_popularity(last, png)
    print(f'plot: {png}')
  summary = {'by_popularity': last['by_popularity'], 'bucket_sizes': last['bucket_sizes'], 'checks': last['checks'],
             'results': results, 'popularity': args.popularity.tag, 'templates': args.templates,
             'seeds': args.seeds, 'anchor_epochs': args.anchor_epochs, 'epochs': args.epochs,
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
