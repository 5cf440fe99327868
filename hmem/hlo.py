"""Reading compiled XLA programs: the collectives a jitted step will run, and their sizes."""

from __future__ import annotations

import math
import re

COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute',
               'ragged-all-to-all')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
                'f64': 8, 's64': 8, 'u64': 8}
_SHAPE = re.compile(r'(pred|[suf]\d+|bf16)\[([\d,]*)\]')
# `%name = <result type> op(`; the result type may be a tuple with /*index=N*/ comments.
_OP = re.compile(r'^\s*%\S+\s*=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')


def _bytes(shapes: str) -> int:
  return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(',') if d)
             for dt, dims in _SHAPE.findall(shapes))


def collectives(hlo_text: str) -> list[tuple[str, int]]:
  """(op, result bytes) of every collective in an HLO module's text (per device)."""
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m:
      out.append((m.group(2), _bytes(m.group(1))))
  return out


def largest_collective(hlo_text: str) -> tuple[str, int]:
  found = collectives(hlo_text)
  return max(found, key=lambda c: c[1]) if found else ('none', 0)


_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%(\S+)\s*\(')
_WHILE = re.compile(r'\swhile\(.*?body=%([^,\s]+).*?"known_trip_count":\{"n":"(\d+)"\}')
_CALLED = re.compile(r'(?:calls|to_apply|body|condition)=%([^,\s}]+)|branch_computations=\{([^}]*)\}')


def collective_bytes_per_step(hlo_text: str) -> dict[str, int]:
  """{op: result bytes per device per execution of the module}: like `collectives`, but a
  collective inside a loop body (a scan over layers or micro-batches) counts once per trip,
  from the trip count XLA annotates on the loop."""
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      bodies[current] = []
      entry = current if line.startswith('ENTRY') else entry
    elif current is not None:
      bodies[current].append(line)

  memo: dict[str, dict[str, int]] = {}

  def per_run(name: str) -> dict[str, int]:
    """Collective bytes of one execution of computation `name`, callees included."""
    if name in memo:
      return memo[name]
    memo[name] = totals = {}  # a (malformed) cycle contributes nothing
    for line in bodies.get(name, ()):
      op = _OP.search(line)
      if op:
        totals[op.group(2)] = totals.get(op.group(2), 0) + _bytes(op.group(1))
      loop = _WHILE.search(line)
      loop_body, trips = (loop.group(1), int(loop.group(2))) if loop else (None, 1)
      for called, branches in _CALLED.findall(line):
        for callee in ([called] if called else [b.strip().lstrip('%') for b in branches.split(',')]):
          times = trips if callee == loop_body else 1
          for kind, nbytes in per_run(callee).items():
            totals[kind] = totals.get(kind, 0) + times * nbytes
    return totals

  return dict(per_run(entry)) if entry is not None else {}
