"""`hmem sweep run` and `hmem sweep collect`: their flags and what they print."""

from __future__ import annotations

import json
import shlex

from hmem import command
from hmem.sweep import collect, launch, spec


def _run(args) -> None:
  args.file = spec.sweep_file(args.file)  # a path, or a sweep that ships with hmem: what the runs load
  runs = spec.expand(args.file, args.root, args.steps_scale, args.overrides)
  states = {r.name: launch.run_state(r, spec.run_config(args.file, r).train.steps) for r in runs}
  pending = [r for r in runs if states[r.name] != 'finished']
  summary = {'runs': len(runs), 'finished': len(runs) - len(pending), 'to_run': len(pending),
             'root': args.root or spec.default_root(args.file), 'launcher': args.launcher}
  if args.dry_run:
    for r in runs:
      print(f'{r.workdir}  [{states[r.name]}]  {shlex.join(launch.train_command(args.file, r, prog=("hmem",)))}')
    print(json.dumps(summary))
    return
  if args.launcher == 'local':
    codes = launch.run_local(args.file, pending, args.max_parallel, progress=not args.no_progress)
    summary['failed'] = sorted(name for name, code in codes.items() if code != 0)
  else:
    summary['jobs'] = launch.run_slurm(args.file, pending, sbatch_args=tuple(args.sbatch_arg))
  for r in runs:
    if r.name in summary.get('failed', ()):
      print(f'{r.name}: failed, see {r.workdir}/train.log')
  print(json.dumps(summary))


def _collect(args) -> None:
  root = args.root or spec.default_root(args.file)
  runs = spec.expand(args.file, root, args.steps_scale, args.overrides)
  summary = collect.collect(args.file, runs, root)
  for row in summary['rows']:
    loss = row['eval_loss'] if row['eval_loss'] is not None else row['loss']
    extra = ''.join(f'  {m} {row[m]:.4g}' for m in summary['metrics'] if m in row)
    print(f"{row['name']:<48} {row['state']:<12} {row['flops']:.3e} FLOPs  "
          f"loss {'-' if loss is None else f'{loss:.4f}'}{extra}")
  for levels, group in summary['fits'].items():
    for name in ('loss_vs_flops', 'loss_vs_params'):
      fit = group[name]
      text = fit['error'] if 'error' in fit else (
          f"L = {fit['E']:.4f} + {fit['A']:.4f} * (X / {fit['x0']:.3e})^-{fit['alpha']:.4f}, "
          f"rmse {fit['rmse']:.2e} over {fit['n']} runs")
      print(f'memory {levels} {name}: {text}')
  del summary['rows']  # in sweep.csv / sweep.json; keep the last line short
  print(json.dumps(summary))


def _sweep(args, cfg) -> None:
  _run(args) if args.action == 'run' else _collect(args)


def register(sub) -> None:
  p = command.add(sub, 'sweep', _sweep, 'run a sweep file (one workdir per run), or collect, fit and plot it',
                  config=False, overrides=True)
  p.add_argument('action', choices=('run', 'collect'))
  p.add_argument('file', help='sweep file defining get_config() and sweep() (see configs/sweeps/); '
                 '--config.KEY=VALUE overrides apply to every run')
  p.add_argument('--root', default='', help='directory of the run workdirs (default runs/sweeps/<file name>)')
  p.add_argument('--steps-scale', type=float, default=1.0, help="multiply every run's steps (own workdirs)")
  p.add_argument('--launcher', choices=('local', 'slurm'), default='local')
  p.add_argument('--max-parallel', type=int, default=1, help='local: runs at once')
  p.add_argument('--sbatch-arg', action='append', default=[], help='slurm: extra sbatch option (repeatable)')
  p.add_argument('--dry-run', action='store_true', help='list the runs and their state, run nothing')
  command.progress_flag(p)
