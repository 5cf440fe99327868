"""Collecting a sweep: one row per run, power-law fits, plots.

Per run: its state, final train loss, last held-out losses (fetched, generic block,
anchor alone), the sweep file's own metrics (`evaluate`, finished runs only), parameter
counts (`hmem.sizes`) and training compute

    FLOPs = flops_per_token(cfg) * train.steps * train.batch_size * data.seq_len

(`hmem.sizes.flops_per_token`: 6 * (non-embedding + LM head + fetched memory parameters)
plus causal attention). Runs that failed or did not finish stay in the table with their
state and whatever they logged; only finished runs enter the fits and plots.

Fits, per memory size: L = E + A * (X / X0)^-alpha for X = training FLOPs over the compute
frontier (the runs no cheaper or equally cheap run beats: the best loss each budget buys,
as scaling-law fits take it; an over-sized model on a small budget lies above the curve)
and X = active parameters (anchor + fetched; the runs of the largest token budget), with X0
the geometric mean of X (so A is the loss above E at a typical X), by scipy's bounded
least squares (E <= the smallest loss, A >= 0, 0 <= alpha <= 5).
"""

from __future__ import annotations

import csv
import json

import numpy as np
from etils import epath
from tqdm import tqdm

from hmem import sizes
from hmem.errors import ConfigError
from hmem.memory.spec import memory_spec
from hmem.sweep.launch import run_state
from hmem.sweep.spec import Run, evaluate_hook, run_config

LOSS_KEYS = ('loss', 'eval_loss', 'eval_loss_generic', 'eval_loss_anchor')
MIN_FIT_POINTS = 4  # three parameters plus at least one residual degree of freedom


def _last_logged(workdir: str) -> dict:
  """Final train loss (and its step) and the last evaluation (and its step)."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  out = {}
  if not path.exists():
    return out
  with path.open() as f:
    for row in map(json.loads, filter(str.strip, f)):
      if 'loss' in row:
        out.update(loss=row['loss'], step=row['step'])
      if 'eval_loss' in row:
        out.update({k: row[k] for k in LOSS_KEYS[1:] if k in row}, eval_step=row['step'])
  return out


def run_row(sweep_file: str, run: Run) -> dict:
  cfg = run_config(sweep_file, run)
  spec = memory_spec(cfg)
  counts = sizes.sizes(cfg)
  tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
  row = {'name': run.name, 'state': run_state(run, cfg.train.steps), 'workdir': run.workdir,
         'overrides': json.dumps(run.overrides), 'levels': str(tuple(cfg.memory.levels)) if spec.enabled
         else 'none', **counts, 'active_params': counts['anchor_params'] + counts['fetch_params'],
         'train_steps': cfg.train.steps, 'tokens': tokens, 'flops': sizes.flops_per_token(cfg, counts) * tokens}
  for key in ('step', *LOSS_KEYS, 'eval_step'):
    row[key] = None
  row.update(_last_logged(run.workdir))
  return row


def fit_power_law(x, y) -> dict:
  """L = E + A (x/x0)^-alpha by bounded least squares; the fit's parameters and residuals,
  or `error` saying why there is no fit."""
  from scipy.optimize import curve_fit
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < MIN_FIT_POINTS or len(np.unique(x)) < 3:
    return {'n': len(x), 'error': f'needs at least {MIN_FIT_POINTS} finished runs with 3 distinct x, has '
                                  f'{len(x)} with {len(np.unique(x))}'}
  x0 = float(np.exp(np.mean(np.log(x))))
  law = lambda x, E, A, alpha: E + A * (x / x0) ** -alpha
  p0 = (0.5 * y.min(), max(y.mean() - 0.5 * y.min(), 1e-3), 0.3)
  try:
    (E, A, alpha), _ = curve_fit(law, x, y, p0=p0, bounds=([0.0, 0.0, 0.0], [y.min(), np.inf, 5.0]), maxfev=20000)
  except (RuntimeError, ValueError) as e:
    return {'n': len(x), 'error': f'least squares did not converge: {e}'}
  residuals = y - law(x, E, A, alpha)
  return {'n': len(x), 'E': float(E), 'A': float(A), 'alpha': float(alpha), 'x0': x0,
          'residuals': residuals.tolist(), 'rmse': float(np.sqrt(np.mean(residuals ** 2)))}


def _target(row) -> float | None:
  return row['eval_loss'] if row['eval_loss'] is not None else row['loss']


def compute_frontier(rows: list[dict]) -> list[dict]:
  """The rows whose loss is below that of every row with no more FLOPs, by FLOPs."""
  frontier = []
  for r in sorted(rows, key=lambda r: (r['flops'], _target(r))):
    if not frontier or _target(r) < _target(frontier[-1]):
      frontier.append(r)
  return frontier


def fits(rows: list[dict]) -> dict:
  """{levels: fits} per memory size over its finished runs (`runs`): `loss_vs_flops` over
  their compute frontier (`frontier_runs`), `loss_vs_params` over those of the largest
  token budget (`params_tokens`). The fitted loss is the final held-out loss (the train
  loss where there was no evaluation)."""
  out = {}
  for levels in dict.fromkeys(r['levels'] for r in rows):
    done = [r for r in rows if r['levels'] == levels and r['state'] == 'finished' and _target(r) is not None]
    frontier = compute_frontier(done)
    tokens = max((r['tokens'] for r in done), default=0)
    longest = [r for r in done if r['tokens'] == tokens]
    out[levels] = {'runs': [r['name'] for r in done], 'frontier_runs': [r['name'] for r in frontier],
                   'loss_vs_flops': fit_power_law([r['flops'] for r in frontier], [_target(r) for r in frontier]),
                   'params_runs': [r['name'] for r in longest], 'params_tokens': tokens,
                   'loss_vs_params': fit_power_law([r['active_params'] for r in longest],
                                                   [_target(r) for r in longest])}
  return out


def _save(fig, path: epath.Path) -> str:
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  return str(path)


def plot(rows: list[dict], fitted: dict, root: str) -> list[str]:
  """loss_vs_flops.png, loss_vs_params.png (per memory size, with the fits) and
  memory_modes.png (fetched vs generic vs anchor-only held-out loss); returns the paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  for xkey, fitkey, runskey, xlabel in (
      ('flops', 'loss_vs_flops', 'runs', 'training FLOPs (fit: compute frontier)'),
      ('active_params', 'loss_vs_params', 'params_runs', 'active parameters (anchor + fetch), largest budget')):
    fig, ax = plt.subplots(figsize=(6, 4))
    for levels, group in fitted.items():
      done = [r for r in rows if r['name'] in group[runskey]]
      if not done:
        continue
      xs = np.array([r[xkey] for r in done], float)
      points = ax.scatter(xs, [_target(r) for r in done], label=f'memory {levels}')
      fit = group[fitkey]
      if 'error' not in fit:
        grid = np.geomspace(xs.min(), xs.max(), 50)
        ax.plot(grid, fit['E'] + fit['A'] * (grid / fit['x0']) ** -fit['alpha'], color=points.get_facecolor()[0],
                label=f'E={fit["E"]:.3f}, alpha={fit["alpha"]:.3f}')
    ax.set(xscale='log', xlabel=xlabel, ylabel='final loss (held-out)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, epath.Path(root) / f'{fitkey}.png'))
    plt.close(fig)

  with_memory = [r for r in rows if r['state'] == 'finished' and r['eval_loss_anchor'] is not None]
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, marker in (('eval_loss', 'fetched', 'o'), ('eval_loss_generic', 'generic block', 's'),
                             ('eval_loss_anchor', 'anchor only', 'x')):
    pts = [(r['flops'], r[key]) for r in with_memory if r[key] is not None]
    if pts:
      ax.scatter(*zip(*pts), marker=marker, label=label)
  ax.set(xscale='log', xlabel='training FLOPs', ylabel='held-out loss', title='memory modes')
  if with_memory:
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(_save(fig, epath.Path(root) / 'memory_modes.png'))
  plt.close(fig)
  return paths


def plot_metrics(rows: list[dict], metrics: list[str], root: str) -> str:
  """evaluate.png: the sweep file's metrics, one group of bars per finished run."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  done = [r for r in rows if r['state'] == 'finished']
  fig, ax = plt.subplots(figsize=(7, 0.5 + 0.3 * len(done) * max(1, len(metrics) / 2)))
  height = 0.8 / max(1, len(metrics))
  for j, metric in enumerate(metrics):
    ax.barh(np.arange(len(done)) + j * height, [r.get(metric, np.nan) for r in done], height, label=metric)
  ax.set_yticks(np.arange(len(done)) + 0.4 - height / 2, [r['name'] for r in done], fontsize=7)
  ax.invert_yaxis()
  ax.legend(fontsize=7, ncol=min(4, len(metrics)), loc='lower left', bbox_to_anchor=(0, 1))  # above the bars
  fig.tight_layout()
  path = _save(fig, epath.Path(root) / 'evaluate.png')
  plt.close(fig)
  return path


def collect(sweep_file: str, runs: list[Run], root: str) -> dict:
  """Writes ROOT/sweep.csv, ROOT/sweep.json and the plots; returns the JSON summary."""
  evaluate = evaluate_hook(sweep_file)
  rows, metrics = [], []
  for run in tqdm(runs, desc='evaluate', unit='run', disable=evaluate is None):
    row = run_row(sweep_file, run)
    if evaluate is not None and row['state'] == 'finished':
      values = evaluate(run_config(sweep_file, run), run.workdir)
      if clash := sorted(set(values) & set(row)):
        raise ConfigError(f'{sweep_file}: evaluate() returned {clash}, names the collected rows already use; '
                          'rename those metrics')
      row.update(values)
      metrics += [k for k in values if k not in metrics]
    rows.append(row)
  columns = list(dict.fromkeys(k for r in rows for k in r))  # a metric only finished runs have: blank elsewhere
  epath.Path(root).mkdir(parents=True, exist_ok=True)
  with (epath.Path(root) / 'sweep.csv').open('w') as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval='')
    writer.writeheader()
    writer.writerows(rows)
  fitted = fits(rows)
  plots = plot(rows, fitted, root) + ([plot_metrics(rows, metrics, root)] if metrics else [])
  summary = {'sweep': sweep_file, 'root': root, 'runs': len(rows),
             'finished': sum(r['state'] == 'finished' for r in rows),
             'incomplete': {r['name']: r['state'] for r in rows if r['state'] != 'finished'},
             'metrics': metrics, 'fits': fitted, 'plots': plots, 'rows': rows}
  with (epath.Path(root) / 'sweep.json').open('w') as f:
    json.dump(summary, f, indent=2)
  return summary
