"""`hmem quickstart`: the method's claim, end to end, on an offline Wikipedia corpus.

corpus -> `hmem prepare` (tokenizer, embeddings, tree, packed shards) -> three runs:
  anchor  the dense anchor, pretrained for train.steps;
  memory  anchor + memory co-trained from it (`train.init_from`) for train.steps more;
  dense   the same anchor trained train.steps more without memory, on the same batches in
          the same order (same seed and data positions): equal training tokens.
-> `hmem export` of the memory run -> `hmem eval` on a seeded sample of training documents
and on the held-out documents: perplexity of the dense baseline, and of the anchor with
the generic block, the fetched memory, and the fetched memory with each document's own
level-1 subtree blocked (`--block-best`). With `--probes FILE` (multiple-choice records,
as `hmem eval` reads them; `hmem.corpora.facts` writes such files) every model is also scored
on the probes: one accuracy row per mode, each question routed by its prompt.

Every stage skips work a previous invocation finished (the trainer resumes; an export or
evaluation of the same checkpoint is reused), so a rerun picks up where one stopped.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np

from hmem.bundle.export import export_latest
from hmem.bundle.format import read_manifest
from hmem.corpora.wiki import wiki_offline, write_jsonl
from hmem.data import inputs
from hmem.data.prepare import held_out, prepare
from hmem.errors import DataError
from hmem.files import atomic_write
from hmem.infer import evaluate
from hmem.infer.evaluate import evaluate_cached
from hmem.infer.source import open_source
from hmem.train.checkpoint import latest_step
from hmem.train.trainer import train

SPLITS = ('train', 'heldout')
MODES = ('dense', 'generic', 'fetched', 'blocked')
_LABELS = {'train': 'training docs', 'heldout': 'held-out docs'}


def _eval_files(corpus: str, out_dir: str, text_field: str, eval_fraction: float, train_docs: int,
                seed: int) -> dict[str, str]:
  """{split: JSONL of {"text"}}: every held-out document of the corpus, and `train_docs`
  training documents drawn uniformly (seeded). The documents are those prepare keeps (read
  by the same reader: the same skips, `data.text_field`), and the split is prepare's: a
  document (file 0, line i) is held out by the hash of its key. Run before any training, so
  a corpus with nothing to evaluate stops in seconds."""
  stats = inputs.ReadStats()
  docs = list(inputs.read_documents(inputs.list_files(corpus)[0][0], 0, text_field, stats))
  if not docs:
    skipped = ', '.join(f'{n} {reason}' for reason, n in stats.skipped.most_common()) or 'the file is empty'
    raise DataError(f'corpus {corpus}: no usable document ({skipped}); write one JSON object a line with the text '
                    f'in {text_field!r} (data.text_field)')
  is_held_out_N = held_out(0, np.array([doc.index for doc in docs]), eval_fraction)
  train_idx = np.flatnonzero(~is_held_out_N)
  sample = np.sort(np.random.default_rng(seed).choice(train_idx, min(train_docs, len(train_idx)), replace=False))
  chosen = {'train': sample, 'heldout': np.flatnonzero(is_held_out_N)}
  if not len(chosen['heldout']):
    raise DataError(f'no held-out document among the {len(docs)} of {corpus}; raise data.eval_fraction')
  paths = {}
  for split, idx in chosen.items():
    paths[split] = os.path.join(out_dir, f'{split}_docs.jsonl')
    if not os.path.exists(paths[split]):
      with atomic_write(paths[split], encoding='utf-8') as f:
        for i in idx:
          f.write(json.dumps({'text': docs[i].text}, ensure_ascii=False) + '\n')
  return paths


def _check_probes(path: str) -> None:
  """Stops with one line when the probe file holds no multiple-choice record (run before
  any training)."""
  records = evaluate.read_records(path)
  if not records.prompts:
    raise DataError(f'probes {path}: no multiple-choice record ({len(records.texts)} text records); write one '
                    'JSON object a line with "prompt", "candidates" and "answer"')


def table(figures: dict, documents: dict) -> str:
  lines = [f'{"perplexity":<24}' + ''.join(f'{m:>10}' for m in MODES)]
  for split in SPLITS:
    lines.append(f'{f"{_LABELS[split]} ({documents[split]})":<24}'
                 + ''.join(f'{figures[f"ppl_{split}_{m}"]:>10.2f}' for m in MODES))
  if 'probes' in documents:
    label = f'probe accuracy ({documents["probes"]})'
    lines.append(f'{label:<24}'
                 + ''.join(f'{figures[f"acc_probes_{m}"]:>10.1%}' for m in MODES))
  return '\n'.join(lines)


def plot(figures: dict, documents: dict, path: str) -> None:
  """Grouped bars: per document set, the perplexity of each model/memory mode (and, with
  probes, a second panel of probe accuracy)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = [('ppl', SPLITS, 'perplexity (lower is better)', '%.1f')]
  if 'probes' in documents:
    panels.append(('acc', ('probes',), 'probe accuracy', '%.3f'))
  fig, axes = plt.subplots(1, len(panels), figsize=(7 + 2.5 * (len(panels) - 1), 3.8),
                           width_ratios=[len(sets) for _, sets, _, _ in panels], squeeze=False)
  width = 0.8 / len(MODES)
  for ax, (kind, sets, ylabel, fmt) in zip(axes[0], panels):
    for j, mode in enumerate(MODES):
      xs = np.arange(len(sets)) + (j - (len(MODES) - 1) / 2) * width
      bars = ax.bar(xs, [figures[f'{kind}_{s}_{mode}'] for s in sets], width, label=mode, color=f'C{j}')
      ax.bar_label(bars, fmt=fmt, fontsize=8)
    ax.set_xticks(np.arange(len(sets)), [f'{_LABELS.get(s, s)} ({documents[s]})' for s in sets])
    ax.set_ylabel(ylabel)
  axes[0, 0].set_title('dense baseline vs anchor + memory (generic, fetched, own subtree blocked)', fontsize=9)
  axes[0, 0].legend(fontsize=8, ncols=len(MODES), loc='lower center')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def quickstart(cfg, workdir: str, *, corpus: str = '', train_docs: int = 500, probes: str = '',
               progress: bool = True) -> dict:
  """Runs every stage (see the module docstring) in `workdir`; returns the figures:
  ppl_{train,heldout}_{dense,generic,fetched,blocked} (and acc_probes_<mode> with
  `probes`), the document counts and minutes
  (wall and this process's CPU time). A SIGTERM during training checkpoints the run and
  returns {stopped_by_signal: True, stage} without starting the next stage."""
  start, cpu_start = time.perf_counter(), time.process_time()
  os.makedirs(workdir, exist_ok=True)
  if not corpus:
    corpus = os.path.join(workdir, 'corpus.jsonl')
    if not os.path.exists(corpus):
      write_jsonl(wiki_offline(include_uncategorized=True), corpus)
  elif not os.path.isfile(corpus):
    raise DataError(f'corpus {corpus!r} is not a file; pass one JSONL, Parquet or text file of documents')
  files = _eval_files(corpus, workdir, cfg.data.text_field, cfg.data.eval_fraction, train_docs, cfg.train.seed)
  if probes:
    _check_probes(probes)
  data = os.path.join(workdir, 'data')
  manifest = prepare(cfg, corpus, data, progress=progress)
  print(f"prepared {manifest['documents_kept']:,} documents into {manifest['sequences']:,} sequences "
        f"of {cfg.data.seq_len} tokens ({manifest['skipped'] or 'none'} skipped)")

  runs = {name: os.path.join(workdir, name) for name in ('anchor', 'memory', 'dense')}
  base = copy.deepcopy(cfg)
  base.data.path = data
  anchor_cfg = copy.deepcopy(base)
  anchor_cfg.memory.levels = (0,) * cfg.memory.depth
  memory_cfg = copy.deepcopy(base)
  memory_cfg.train.init_from = runs['anchor']
  dense_cfg = copy.deepcopy(anchor_cfg)
  dense_cfg.train.init_from = runs['anchor']
  steps = cfg.train.steps
  for i, (name, stage_cfg, what) in enumerate((
      ('anchor', anchor_cfg, f'pretraining the dense anchor for {steps} steps'),
      ('memory', memory_cfg, f'co-training anchor + memory from the anchor for {steps} steps'),
      ('dense', dense_cfg, f'training the dense baseline from the anchor for the same {steps} steps'))):
    print(f'stage {i + 1}/5: {what}')
    if train(stage_cfg, runs[name], progress=progress)['stopped_by_signal']:
      print(f'stopped by a signal while training {name} (checkpoint saved); run the same command again to resume')
      return {'stopped_by_signal': True, 'stage': name}

  print('stage 4/5: exporting the memory model')
  bundle = os.path.join(workdir, 'bundle')
  export_latest(runs['memory'], bundle, progress)

  print('stage 5/5: evaluating on training and held-out documents')
  memory_step, dense_step = read_manifest(bundle)['step'], latest_step(runs['dense'])
  figures, documents = {}, {}
  for name, path in {**files, **({'probes': probes} if probes else {})}.items():
    mem = evaluate_cached(lambda: open_source(bundle=bundle), memory_step, path,
                          os.path.join(workdir, f'eval_memory_{name}.json'), True, progress)
    dense = evaluate_cached(lambda: open_source(workdir=runs['dense']), dense_step, path,
                            os.path.join(workdir, f'eval_dense_{name}.json'), False, progress)
    kind = 'acc' if name == 'probes' else 'ppl'  # probes are questions; the splits are documents
    documents[name] = mem['examples' if kind == 'acc' else 'documents']
    figures.update({f'{kind}_{name}_dense': dense[f'{kind}_none'],
                    **{f'{kind}_{name}_{m}': mem[f'{kind}_{m}'] for m in MODES[1:]}})

  print(table(figures, documents))
  png = os.path.join(workdir, 'quickstart.png')
  plot(figures, documents, png)
  print(f'plot: {png}')
  figures.update({f'documents_{s}': n for s, n in documents.items()},
                 minutes=(time.perf_counter() - start) / 60, cpu_minutes=(time.process_time() - cpu_start) / 60)
  return figures

