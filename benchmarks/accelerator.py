"""Every benchmark that needs an accelerator, in one call: the train step (throughput, MFU),
the memory's overhead and collectives, fetch latency and decode, and serving, on whatever
devices this host has (a GPU or TPU host, else the CPU), into one JSON file with the device.

    python benchmarks/accelerator.py [--quick] [--out runs/accelerator.json]

Each benchmark runs as its own process (as when run alone: benchmarks/step.py, memory.py,
fetch.py, serve.py), within a time limit that keeps the whole under 8 minutes (none with
--quick); one that fails or runs out of time is recorded with its error and the rest
still run. The device
is read in a process of its own as well, so this one never holds an accelerator the
benchmarks need. --quick runs each in its smallest form (a smoke test: under 2 minutes on
an idle 2-core CPU). Prints a table, then the JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# (name, script, arguments, --quick arguments, seconds allowed: 8 minutes in all)
BENCHMARKS = (
    ('step', 'step.py', [], ['--quick', '--pairs', '1'], 120),
    ('memory', 'memory.py', [], ['--quick'], 150),
    ('fetch', 'fetch.py', [], ['--quick', '--samples', '2', '--repeats', '1', '--decode-tokens', '4'], 120),
    ('serve', 'serve.py', [], ['--quick', '--models', 'quickstart'], 90),
)
_DEVICE = ('import json, jax; d = jax.devices(); print(json.dumps({"platform": d[0].platform, "device_kind": '
           'd[0].device_kind, "devices": len(d), "processes": jax.process_count(), "jax": jax.__version__}))')


def _last_json(stdout: str):
  for line in reversed(stdout.strip().splitlines()):
    try:
      return json.loads(line)
    except json.JSONDecodeError:
      continue
  return None


def run_one(script: str, args: list[str], limit_s: float | None) -> dict:
  """{'result': the benchmark's JSON, 'wall_s'} or {'error', 'wall_s'}."""
  start = time.perf_counter()
  try:
    out = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                         timeout=limit_s)
  except subprocess.TimeoutExpired:
    return {'error': f'ran past its {limit_s:.0f} s', 'wall_s': round(time.perf_counter() - start, 1)}
  wall_s = round(time.perf_counter() - start, 1)
  result = _last_json(out.stdout) if out.returncode == 0 else None
  if result is None:
    return {'error': f'exit {out.returncode}: {out.stderr.strip()[-500:]}', 'wall_s': wall_s}
  return {'result': result, 'wall_s': wall_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='each benchmark in its smallest form (< 2 min on CPU)')
  parser.add_argument('--out', default='runs/accelerator.json', help='the JSON file written')
  parser.add_argument('--only', nargs='*', choices=[b[0] for b in BENCHMARKS], help='run only these')
  args = parser.parse_args()
  start = time.perf_counter()
  device = subprocess.run([sys.executable, '-c', _DEVICE], capture_output=True, text=True, timeout=120)
  summary = {'device': _last_json(device.stdout) or {'error': device.stderr.strip()[-500:]}, 'quick': args.quick,
             'benchmarks': {}}
  for name, script, full, quick, limit_s in BENCHMARKS:
    if args.only and name not in args.only:
      continue
    # --quick is a smoke test: no limit, so that a loaded machine slows it rather than fails it.
    summary['benchmarks'][name] = run_one(script, quick if args.quick else full, None if args.quick else limit_s)
    print(f'accelerator: {name} done', file=sys.stderr, flush=True)
  summary['wall_s'] = round(time.perf_counter() - start, 1)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(summary, f, indent=1)
  d = summary['device']
  print(f'device: {d.get("devices")} x {d.get("device_kind")} ({d.get("platform")}), jax {d.get("jax")}')
  for name, r in summary['benchmarks'].items():
    print(f'{name:<8} {r["wall_s"]:7.1f} s  ' + ('ok' if 'result' in r else r['error'][:120]))
  print(f'written: {args.out}')
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
