"""The paper's runs on TPU pods, compiled by the TPU compiler without a TPU: per-chip memory,
whether it fits, collectives, and the step time of XLA's TPU cost model (modeled, not
measured), each beside its FLOP-matched dense anchor on the same topology.

    pip install '.[tpu]'
    python benchmarks/pod.py [--quick] [--rows paper/a2.py:160m@v5p:4x4x4 ...]
    python benchmarks/pod.py --rows paper/a2.py:160m@h100:64   # with jax[cuda13]: memory only

Each row is a config as configs/ defines it (batch, sequence length, memory) on a TPU
topology of the size such a run uses. Its layout is the config's own if that fits the
chip, else the cheapest one `hmem plan --search` finds. The FLOP-matched dense anchor is
the same anchor with every FFN widened by the fetched width and no memory (trained, not
frozen), compiled on the same topology with the same layout (or its own cheapest fitting
one). Columns: per-chip GB (the TPU compiler's total), collective GB per chip per step,
the modeled step time, tokens/s per chip and MFU it implies, the memory step's time over
the dense one's, and the days the run's token budget takes at that time. --quick: the
tiny config on a 4-chip v5e (a smoke test of the pipeline, < 60 s on 2 idle cores).
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the TPU devices are compile-only; jax runs on the CPU

ROWS = (
    'paper/a2.py:160m@v5p:4x4x4',        # 64 chips (v5p-128), 1,024 x 2,048 tokens a step
    'paper/fetch_sweep.py:7@v5p:4x4x4',  # the 160m anchor (frozen, A3) with an 18.7B bank
    'paper/a2.py:410m@v5p:4x4x4',
    'paper/a2.py:160m@v5e:16x16',        # 256 chips (v5e-256)
    'paper/a2.py:1b@v5p:4x4x8',          # 128 chips (v5p-256), 2,048 x 2,048 tokens a step
)
QUICK = ('tiny.py@v5e:2x2',)
QUICK_OVERRIDES = ('memory.levels=(8,4)',)


def flop_matched_dense(cfg):
  """The anchor of `cfg` with every FFN widened by the fetched width, no memory, trained."""
  dense = copy.deepcopy(cfg)
  dense.model.ffn = cfg.model.ffn + sum(cfg.memory.levels)
  dense.memory.levels = (0,) * len(cfg.memory.levels)
  dense.train.freeze_anchor = False
  return dense


def _plan_row(cfg, devices, layout_from=None):
  """(plan, with `modeled` on a TPU, and its layout config): `layout_from`'s layout, else `cfg`'s own, when it
  fits; otherwise the cheapest fitting one."""
  from hmem.plan import plan
  if layout_from is not None:
    cfg = copy.deepcopy(cfg)
    cfg.mesh.update(data=layout_from.mesh.data, fsdp=layout_from.mesh.fsdp)
    cfg.model.remat = layout_from.model.remat
  model_time = devices[0].platform == 'tpu'  # XLA has a cost model for TPUs only
  out = plan.plan(cfg, devices, model_time=model_time)
  if out['fits']:
    return out, cfg
  best, tried = plan.search(cfg, devices, model_time=model_time)
  if best is None:
    return {**out, 'searched': tried}, cfg
  found = copy.deepcopy(cfg)
  found.mesh.update(data=best['mesh']['data'], fsdp=best['mesh']['fsdp'])
  found.model.remat = best['remat']
  return best, found


def _summary(name, topology, kind, cfg, out) -> dict:
  modeled = out.get('modeled') or {}
  step_s = modeled.get('step_s')
  tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
  return {
      'run': name, 'topology': topology, 'model': kind, 'chips': out['devices'], 'hosts': out['hosts'],
      'layout': f'data {out["mesh"]["data"]} x fsdp {out["mesh"]["fsdp"]}, remat {out["remat"]}',
      'gb_per_chip': out['bytes_per_device'].get('total', 0) / 1e9, 'fits': out['fits'],
      'collective_gb': sum(out['collective_bytes'].values()) / 1e9,
      'collective_bytes': out['collective_bytes'],
      'step_s': step_s,
      'tokens_per_s_per_chip': modeled.get('tokens_per_s_per_chip'),
      'mfu': modeled.get('mfu'),
      'days': tokens / (cfg.train.batch_size * cfg.data.seq_len) * step_s / 86400 if step_s else None,
      'tokens': tokens,
      'modeled': modeled,
      'compile_s': out['compile_s'],
  }


def run(rows, overrides=()):
  from hmem.config import load_config
  from hmem.plan import targets
  results = []
  for row in rows:
    name, topology = row.split('@')
    devices = targets.devices(topology)
    cfg = load_config(name, [f'--config.{o}' for o in overrides])
    start = time.perf_counter()
    memory, layout = _plan_row(cfg, devices)
    dense, _ = _plan_row(flop_matched_dense(cfg), devices, layout_from=layout)
    pair = [_summary(name, topology, 'memory', cfg, memory), _summary(name, topology, 'dense (FLOP-matched)',
                                                                       flop_matched_dense(cfg), dense)]
    if pair[0]['step_s'] and pair[1]['step_s']:
      pair[0]['over_dense'] = pair[0]['step_s'] / pair[1]['step_s']
    for r in pair:
      r['wall_s'] = round(time.perf_counter() - start, 1)
    results += pair
    print(f'pod: {row} done in {pair[0]["wall_s"]:.0f} s: {json.dumps(pair)}', file=sys.stderr, flush=True)
  return results


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--rows', nargs='*', help='CONFIG@TOPOLOGY rows (default: the paper runs above)')
  args = parser.parse_args()
  rows = args.rows or (QUICK if args.quick else ROWS)
  start = time.perf_counter()
  results = run(rows, QUICK_OVERRIDES if args.quick else ())
  print("modeled by XLA's TPU cost model, not measured; memory: the TPU compiler's")
  print(f'{"run":<24} {"topology":<11} {"model":<21} {"layout":<30} {"GB/chip":>8} {"fits":>4} {"coll GB":>8} '
        f'{"step s":>8} {"tok/s/chip":>10} {"MFU":>6} {"vs dense":>8} {"days":>7}')
  for r in results:
    print(f'{r["run"]:<24} {r["topology"]:<11} {r["model"]:<21} {r["layout"]:<30} {r["gb_per_chip"]:8.2f} '
          f'{"yes" if r["fits"] else "no":>4} {r["collective_gb"]:8.2f} {_fmt(r["step_s"], "8.3f")} '
          f'{_fmt(r["tokens_per_s_per_chip"], "10.0f")} {_fmt(r["mfu"], "6.1%")} '
          f'{_fmt(r.get("over_dense"), "7.3f") + "x" if r.get("over_dense") else "":>8} {_fmt(r["days"], "7.1f")}')
  print(json.dumps({'rows': results, 'quick': args.quick, 'wall_s': round(time.perf_counter() - start, 1)}))


if __name__ == '__main__':
  main()
