"""benchmarks/accelerator.py: every accelerator benchmark in one call, one JSON with the
device. Its --quick on this CPU runs each benchmark in its smallest form (step and serve:
~30 CPU-seconds each, most of it compiling); a loaded machine stretches it far beyond its
wall time on idle cores, hence the generous timeout."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow  # four benchmark processes end to end
def test_quick_writes_every_benchmark_and_the_device_to_one_json(repo, tmp_path):
  out_file = tmp_path / 'accelerator.json'
  out = subprocess.run([sys.executable, str(repo / 'benchmarks/accelerator.py'), '--quick', '--out', str(out_file)],
                       capture_output=True, text=True, timeout=1800, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out_file.read_text())
  assert json.loads(out.stdout.splitlines()[-1]) == summary
  assert summary['device']['platform'] == 'cpu' and summary['device']['devices'] >= 1 and summary['quick']
  runs = summary['benchmarks']
  assert sorted(runs) == ['fetch', 'memory', 'serve', 'step']
  failed = {name: r['error'] for name, r in runs.items() if 'error' in r}
  assert not failed, failed
  # Each benchmark's own last JSON line, as it prints it alone.
  assert runs['step']['result']['quick'] and runs['step']['result']['tokens_per_s'] > 0
  assert runs['memory']['result']['overhead_vs_flop_matched'] > 0
  assert runs['fetch']['result']['decode_ratio'] > 0
  assert runs['serve']['result']['models']['quickstart']
