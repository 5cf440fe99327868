"""The knowledge benchmark's figures from its per-seed results: means and spreads over seeds,
accuracy per popularity bucket, bits stored per parameter, the paper's popularity checks,
tables and plots (benchmarks/knowledge.py runs the trainings; this file only does arithmetic
and drawing, so it is tested without training).

A per-seed result (knowledge.run_seed) holds `acc[set][bucket][mode]` for the probe sets
('probes': trained phrasing, 'probes_heldout': held-out phrasing), `ppl_heldout[mode]`,
`buckets[bucket]` = {entities, documents, probes} and `params` = {dense, dense_wide, anchor,
bank}. Accuracies over all facts weight each bucket by its facts (entities x attributes),
not by its probes: probes are shared out equally over the buckets, so the head is probed
far more densely than it is populated.
"""

from __future__ import annotations

import math

import numpy as np

from hmem.corpora import facts

MODES = ('dense', 'dense_wide', 'fetched', 'generic', 'none', 'blocked')
PROBE_SETS = {'probes': 'trained phrasing', 'probes_heldout': 'held-out phrasing'}
CHANCE = 1 / len(facts.VALUES[facts.ATTRIBUTES[0]])
BITS_PER_FACT = math.log2(len(facts.VALUES[facts.ATTRIBUTES[0]]))  # 4: one of 16 values
TAIL, HEAD = ('1', '2-3'), ('64+',)  # the tail (1-3 documents) and head buckets


def pooled(acc_by_bucket: dict, buckets: dict, names=None) -> dict:
  """{mode: accuracy} over the facts of the named buckets (all by default), each bucket's
  accuracy weighted by its facts; {} when none of them is present."""
  names = [b for b in (names or buckets) if b in acc_by_bucket and buckets[b]['entities']]
  if not names:
    return {}
  weight = {b: buckets[b]['entities'] for b in names}
  total = sum(weight.values())
  modes = [m for m in MODES if all(m in acc_by_bucket[b] for b in names)]
  return {m: sum(acc_by_bucket[b][m] * weight[b] for b in names) / total for m in modes}


def facts_known(acc: float, n_facts: int) -> float:
  """Facts a model knows, from its accuracy on n_facts 16-way questions: a fact it does not
  know is a guess right 1/16 of the time, so acc = known + (1 - known) / 16."""
  return (acc - CHANCE) / (1 - CHANCE) * n_facts


def capacity(acc: dict, n_facts: int, params: dict) -> dict:
  """Bits stored per parameter (the knowledge-capacity literature's measure: facts known x
  log2(16) over parameters): each dense model over its parameters; anchor + memory over the
  anchor's and the whole bank's; the bank alone: the facts fetched rows add to the
  co-trained anchor without memory, over the bank's parameters."""
  known = {m: max(0.0, facts_known(a, n_facts)) for m, a in acc.items()}
  out = {}
  for model, mode, count in (('dense', 'dense', params.get('dense')),
                             ('dense_wide', 'dense_wide', params.get('dense_wide')),
                             ('anchor+bank', 'fetched', params['anchor'] + params['bank'])):
    if mode in known and count:
      out[model] = {'facts_known': round(known[mode], 1), 'params': count,
                    'bits_per_param': known[mode] * BITS_PER_FACT / count}
  if 'fetched' in known and 'none' in known:
    added = max(0.0, known['fetched'] - known['none'])
    out['bank'] = {'facts_known': round(added, 1), 'params': params['bank'],
                   'bits_per_param': added * BITS_PER_FACT / params['bank']}
  return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for one value)."""
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _cells(per_seed: list[dict], get) -> tuple[dict, dict]:
  """Means and spreads over seeds of a nested {key: {mode: value}} read by `get`."""
  mean, std = {}, {}
  first = get(per_seed[0])
  for key, by_mode in first.items():
    mean[key], std[key] = {}, {}
    for mode in by_mode:
      mean[key][mode], std[key][mode] = _mean_std([get(r)[key][mode] for r in per_seed])
  return mean, std


def summarize(per_seed: list[dict]) -> dict:
  """One N's figures over its seeds (same N, law and templates; buckets are the same for
  every seed, since the law ranks entities, not names)."""
  buckets = per_seed[0]['buckets']
  n_facts = sum(b['entities'] for b in buckets.values()) * len(facts.ATTRIBUTES)
  out = {'entities': per_seed[0]['entities'], 'seeds': [r['seed'] for r in per_seed], 'bucket_sizes': buckets,
         'sequences': per_seed[0]['sequences'], 'steps_anchor': per_seed[0]['steps_anchor'],
         'steps_extra': per_seed[0]['steps_extra']}
  flat = [{**{f'acc_{s}': pooled(r['acc'][s], buckets) for s in PROBE_SETS}, 'ppl_heldout': r['ppl_heldout']}
          for r in per_seed]
  mean, std = _cells(flat, lambda r: r)
  out.update({f'{key}_{m}': v for key, by_mode in mean.items() for m, v in by_mode.items()})
  out['std'] = {f'{key}_{m}': v for key, by_mode in std.items() for m, v in by_mode.items()}
  for s, suffix in (('probes', ''), ('probes_heldout', '_heldout')):
    out[f'by_popularity{suffix}'], out[f'by_popularity{suffix}_std'] = _cells(per_seed, lambda r, s=s: r['acc'][s])
  cap = [capacity(f['acc_probes'], n_facts, r['params']) for f, r in zip(flat, per_seed)]
  out['capacity'] = {}
  for model, c in cap[0].items():
    bits, bits_std = _mean_std([x[model]['bits_per_param'] for x in cap])
    known = float(np.mean([x[model]['facts_known'] for x in cap]))
    out['capacity'][model] = {'params': c['params'], 'facts_known': known, 'bits_per_param': bits,
                              'bits_per_param_std': bits_std}
  out['checks'] = checks(out['by_popularity'], buckets)
  trained, heldout = pooled(out['by_popularity'], buckets), pooled(out['by_popularity_heldout'], buckets)
  if trained.get('fetched'):
    out['heldout_over_trained_fetched'] = {
        'all': heldout['fetched'] / trained['fetched'],
        **{b: out['by_popularity_heldout'][b]['fetched'] / out['by_popularity'][b]['fetched']
           for b in out['by_popularity'] if out['by_popularity'][b]['fetched']}}
  out['per_seed'] = per_seed
  return out


def checks(by_popularity: dict, buckets: dict) -> dict:
  """The issue's targets for what the paper predicts, where the buckets they compare exist:
  the tail (1-3 documents) answered by fetched memory (>= 50%, >= 4x each dense model), the
  head (64+) by the anchor alone (generic >= 0.8x fetched), and blocking an entity's own
  subtree costing >= 5x more accuracy in the tail than in the head (and the same for the
  generic block in place of the fetched rows). {name: {value, target, met}}."""
  tail, head = pooled(by_popularity, buckets, TAIL), pooled(by_popularity, buckets, HEAD)
  out = {}
  if tail and 'fetched' in tail:
    out['tail_fetched'] = (tail['fetched'], 0.5)
    for dense in ('dense', 'dense_wide'):
      if dense in tail:
        out[f'tail_fetched_over_{dense}'] = (tail['fetched'] / max(tail[dense], 1e-9), 4.0)
  if head and tail and 'generic' in head:
    out['head_generic_over_fetched'] = (head['generic'] / max(head['fetched'], 1e-9), 0.8)
  # Blocked serves a probe from another subtree's rows; generic from none of the bank's:
  # the second loss is the memory's share alone, without another entity's rows in the way.
  for mode in ('blocked', 'generic'):
    if head and tail and mode in head:
      tail_loss, head_loss = tail['fetched'] - tail[mode], head['fetched'] - head[mode]
      # A head that loses nothing (or gains) meets it whenever the tail loses anything.
      ratio = tail_loss / head_loss if head_loss > 0 else (math.inf if tail_loss > 0 else 0.0)
      out[f'{mode}_loss_tail_over_head'] = (ratio, 5.0)
  return {name: {'value': value, 'target': target, 'met': bool(value >= target)}
          for name, (value, target) in out.items()}


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
  if mean is None:
    return '-'
  return f'{mean:{fmt}}' + (f' ±{std:{fmt}}' if std is not None else '')


def accuracy_table(results: list[dict]) -> str:
  """Per N: probe accuracy over all facts (both phrasings) and held-out paraphrase
  perplexity, one column per mode (mean ±std over seeds)."""
  modes = [m for m in MODES if any(f'acc_probes_{m}' in r for r in results)]
  lines = [f'{"":<30}' + ''.join(f'{m:>16}' for m in modes)]
  for r in results:
    rows = [(f'acc_{s}', f'acc, {label}', '.3f') for s, label in PROBE_SETS.items()]
    rows.append(('ppl_heldout', 'ppl, held-out paraphrases', '.1f'))
    for key, label, fmt in rows:
      cells = (_pm(r.get(f'{key}_{m}'), r['std'].get(f'{key}_{m}'), fmt) for m in modes)
      lines.append(f'{"N=" + str(r["entities"]) + " " + label:<30}' + ''.join(f'{c:>16}' for c in cells))
  return '\n'.join(lines)


def bucket_table(summary: dict) -> str:
  """Accuracy per popularity bucket (rows) and mode (columns), both phrasings."""
  by = summary['by_popularity']
  modes = [m for m in MODES if m in next(iter(by.values()))]
  lines = [f'{"documents (entities, probes)":<30}' + ''.join(f'{m:>16}' for m in modes)]
  for s, label in PROBE_SETS.items():
    suffix = '' if s == 'probes' else '_heldout'
    lines.append(label)
    for b, size in summary['bucket_sizes'].items():
      if b in by:
        cells = (_pm(summary[f'by_popularity{suffix}'][b][m], summary[f'by_popularity{suffix}_std'][b][m], '.3f')
                 for m in modes)
        lines.append(f'  {b + " (" + str(size["entities"]) + ", " + str(size["probes"]) + ")":<28}'
                     + ''.join(f'{c:>16}' for c in cells))
  return '\n'.join(lines)


def heldout_line(summary: dict) -> str:
  """Fetched memory's held-out over trained phrasing accuracy, over all facts and per bucket."""
  ratios = summary.get('heldout_over_trained_fetched', {})
  return 'fetched, held-out / trained phrasing: ' + ', '.join(f'{b} {r:.2f}' for b, r in ratios.items())


def capacity_table(summary: dict) -> str:
  lines = [f'{"bits per parameter":<20}{"facts known":>14}{"params":>12}{"bits/param":>22}']
  for model, c in summary['capacity'].items():
    bits = _pm(c['bits_per_param'], c['bits_per_param_std'], '.2e')
    lines.append(f'{model:<20}{c["facts_known"]:>14.1f}{c["params"]:>12,}{bits:>22}')
  return '\n'.join(lines)


def checks_table(summary: dict) -> str:
  return '\n'.join(f'{name:<34} {c["value"]:>8.3f}  target >= {c["target"]:<5g} {"met" if c["met"] else "NOT met"}'
                   for name, c in summary['checks'].items())


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_vs_n(results: list[dict], path: str) -> None:
  """Probe accuracy over all facts (trained phrasing solid, held-out dashed) against N,
  one line per mode, error bars the spread over seeds."""
  plt = _pyplot()
  ns = [r['entities'] for r in results]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for j, mode in enumerate(m for m in MODES if f'acc_probes_{m}' in results[0]):
    for s, style, alpha in (('probes', 'o-', 1.0), ('probes_heldout', 'x--', 0.6)):
      key = f'acc_{s}_{mode}'
      ax.errorbar(ns, [r[key] for r in results], yerr=[r['std'][key] or 0 for r in results], fmt=style,
                  color=f'C{j}', alpha=alpha, capsize=2, label=mode if s == 'probes' else None)
  ax.axhline(CHANCE, color='grey', lw=0.8, ls=':', label='chance (1/16)')
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


def plot_popularity(summary: dict, path: str) -> None:
  """The paper's popularity figure: accuracy per popularity bucket (documents an entity is
  in), one line per mode, trained phrasing left, held-out right; error bars over seeds."""
  plt = _pyplot()
  by = summary['by_popularity']
  names = [b for b in facts.BUCKETS if b in by]
  modes = [m for m in MODES if m in by[names[0]]]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, (s, label) in zip(axes, PROBE_SETS.items()):
    suffix = '' if s == 'probes' else '_heldout'
    for j, mode in enumerate(modes):
      ax.errorbar(range(len(names)), [summary[f'by_popularity{suffix}'][b][mode] for b in names],
                  yerr=[summary[f'by_popularity{suffix}_std'][b][mode] or 0 for b in names], fmt='o-',
                  color=f'C{j}', capsize=2, label=mode)
    ax.axhline(CHANCE, color='grey', lw=0.8, ls=':', label='chance (1/16)')
    sizes = summary['bucket_sizes']
    ax.set_xticks(range(len(names)), [f'{b}\n({sizes[b]["entities"]})' for b in names])
    ax.set_xlabel('training documents per entity (entities)')
    ax.set_title(f'{label}, N={summary["entities"]}, {len(summary["seeds"])} seed(s)', fontsize=9)
  axes[0].set_ylabel('probe accuracy')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
