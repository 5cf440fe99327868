"""The paper's Table 1 from lm-evaluation-harness: tasks x memory modes, for one source.

`run_modes` runs lm-eval's `simple_evaluate` once per memory mode with the harness model
(hmem.infer.harness) over one open MemorySource, so the model is loaded once: `hmem eval
--tasks` prints the result as a table (`format_table`) and the training callback
(hmem.infer.live) logs it. Modes: `fetched`, `generic`, `none` (the harness model's
memory) and `blocked` (fetched, routed around the given nodes or, when none are given,
around each request's own level-1 subtree).

Tasks are names lm-eval knows (its own, hmem's offline tasks in hmem/tasks, those under
`include_paths`) or task YAML files. The result:
  {'results': {task: {metric: {mode: value}}}, 'stderr': (the same, where lm-eval gives a
   standard error), 'samples': {task: documents scored}, 'seconds': {mode: wall seconds}}
with a metric named `metric` for lm-eval's filter `none`, else `metric.filter`.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import time

from hmem.errors import UserError

MODES = ('fetched', 'generic', 'none', 'blocked')


def task_manager(tasks, include_paths=()):
  """lm-eval's TaskManager over hmem's offline tasks, `include_paths` and the directories of
  the task files among `tasks`; lm-eval's own tasks are added (indexing them takes tens of
  seconds) only when a name in `tasks` is not found there."""
  from lm_eval.tasks import TaskManager

  from hmem.tasks import DIR
  for path in include_paths:
    if not os.path.isdir(path):
      raise UserError(f'include path {path!r} is not a directory; pass a directory of task YAML files')
  files = [t for t in tasks if t.endswith(('.yaml', '.yml'))]
  for path in files:
    if not os.path.isfile(path):
      raise UserError(f'task file {path!r} not found; pass the path of an lm-eval task YAML file')
  paths = [str(DIR), *map(str, include_paths), *sorted({os.path.dirname(os.path.abspath(t)) for t in files})]
  manager = TaskManager(include_path=paths, include_defaults=False)
  if any(not manager.match_tasks([t]) for t in tasks if t not in files):
    manager = TaskManager(include_path=paths)
  return manager


def resolve_tasks(manager, tasks) -> list[str]:
  """Task names for lm-eval: each name as given, each YAML file as the name it declares
  (its directory must be in the manager's include paths). Raises one UserError naming every
  unknown task, with the closest names."""
  index = manager.task_index
  by_path = {os.path.realpath(e.yaml_path): name for name, e in index.items() if e.yaml_path is not None}
  out, unknown = [], []
  for task in tasks:
    if task.endswith(('.yaml', '.yml')):
      name = by_path.get(os.path.realpath(task))
      if name is None:
        raise UserError(f'task file {task!r} declares no task lm-eval can read (no `task:` key?); pass an lm-eval '
                        'task YAML file')
      out.append(name)
    elif manager.match_tasks([task]):
      out.append(task)
    else:
      unknown.append(task)
  if unknown:
    hints = [f'{t} (did you mean {", ".join(close)}?)' if (close := difflib.get_close_matches(t, index, n=3))
             else t for t in unknown]
    raise UserError(f'unknown task(s): {"; ".join(hints)}. Name tasks lm-eval knows, hmem\'s (hmem_capital, '
                    'hmem_atomic_number, hmem_wiki_heldout, hmem_knowledge) or YAML files; --include-path adds '
                    'a directory of task YAML')
  return out


def check_modes(tables: dict, modes, block=()) -> list[str]:
  """The modes, checked against a run's bank tables (`MemorySource.tables`); raises
  UserError naming the first that cannot run."""
  modes = list(modes)
  for mode in modes:
    if mode not in MODES:
      raise UserError(f'memory mode {mode!r}; choose among {", ".join(MODES)}')
    if mode != 'none' and not tables:
      raise UserError(f'mode {mode}: this run has no memory; use --modes none')
    if mode == 'generic' and 'generic' not in tables:
      raise UserError('mode generic: this run trained no generic block (memory.generic_prob=0); leave it out')
  if not modes:
    raise UserError('no memory mode given; pass e.g. --modes fetched,generic,none,blocked')
  if block and 'blocked' not in modes:
    raise UserError('--block routes the `blocked` mode around nodes; add blocked to --modes')
  return modes


def default_modes(tables: dict) -> list[str]:
  """Every mode a run with these bank tables can run: the paper's four with a generic
  block, none without memory."""
  if not tables:
    return ['none']
  return [m for m in MODES if m != 'generic' or 'generic' in tables]


def _metric(key: str) -> str | None:
  """lm-eval's 'acc,none' -> 'acc', 'exact_match,strict-match' -> 'exact_match.strict-match';
  None for its stderr keys and other fields."""
  if ',' not in key or '_stderr,' in key:
    return None
  metric, filter_name = key.split(',', 1)
  return metric if filter_name == 'none' else f'{metric}.{filter_name}'


def run_modes(source, tasks, modes, *, manager, block=(), limit=None, batch_size: int = 16,
              progress: bool = False) -> dict:
  """Runs the harness on `tasks` under each mode (module doc). `tasks`: names as
  `resolve_tasks` returns them; `manager`: `task_manager(...)`."""
  import lm_eval

  from hmem.infer.harness import HarnessLM
  out = {'results': {}, 'stderr': {}, 'samples': {}, 'seconds': {}}
  for mode in modes:
    blocked = mode == 'blocked'
    lm = HarnessLM(source=source, memory='fetched' if blocked else mode, block=list(block) if blocked else (),
                   block_best=blocked and not block, batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    evaluated = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                        log_samples=False, verbosity='ERROR')
    out['seconds'][mode] = time.perf_counter() - start
    for task, values in evaluated['results'].items():
      for key, value in values.items():
        if (metric := _metric(key)) is None:
          continue
        out['results'].setdefault(task, {}).setdefault(metric, {})[mode] = float(value)
        stderr = values.get(key.replace(',', '_stderr,', 1))
        if isinstance(stderr, (int, float)):
          out['stderr'].setdefault(task, {}).setdefault(metric, {})[mode] = float(stderr)
    for task, counts in evaluated.get('n-samples', {}).items():
      out['samples'][task] = counts['effective']
  return out


def per_request(results: dict) -> dict:
  """{(task, doc, choice): loglikelihood} from lm-eval's logged samples (`log_samples=True`),
  to set one model's scores beside another's request by request."""
  out = {}
  for task, samples in results['samples'].items():
    for s in samples:
      for i, resp in enumerate(s['resps']):
        value = resp[0]
        out[task, s['doc_id'], i] = float(value[0] if isinstance(value, (list, tuple)) else value)
  return out


def rows(result: dict) -> list[tuple[str, str, str, float, float | None]]:
  """(task, metric, mode, value, stderr or None) for every cell."""
  return [(task, metric, mode, value, result['stderr'].get(task, {}).get(metric, {}).get(mode))
          for task, metrics in result['results'].items() for metric, values in metrics.items()
          for mode, value in values.items()]


def format_table(result: dict, modes) -> str:
  """Tasks (and their metrics) down, modes across, `value ± stderr` where lm-eval gives one."""
  def cell(task, metric, mode):
    value = result['results'][task][metric].get(mode)
    if value is None:
      return ''
    stderr = result['stderr'].get(task, {}).get(metric, {}).get(mode)
    return f'{value:.4f}' + (f' ± {stderr:.4f}' if stderr is not None else '')

  label = lambda task: f'{task} ({n})' if (n := result['samples'].get(task)) is not None else task
  lines = [[label(task), metric, *(cell(task, metric, m) for m in modes)]
           for task, metrics in result['results'].items() for metric in metrics]
  header = ['task (documents)', 'metric', *modes]
  widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
  fmt = lambda r: '  '.join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  seconds = ', '.join(f'{m} {s:.1f}' for m, s in result['seconds'].items())
  return '\n'.join([fmt(header), *map(fmt, lines), f'seconds per mode: {seconds}'])


def to_csv(result: dict) -> str:
  """One row per cell: task, metric, mode, value, stderr (empty where lm-eval gives none)."""
  f = io.StringIO()
  writer = csv.writer(f, lineterminator='\n')
  writer.writerow(['task', 'metric', 'mode', 'value', 'stderr'])
  for task, metric, mode, value, stderr in rows(result):
    writer.writerow([task, metric, mode, repr(value), '' if stderr is None else repr(stderr)])
  return f.getvalue()
