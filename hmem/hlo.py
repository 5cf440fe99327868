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


_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%(\S+)\s*\(.*->\s*(.*?)\s*\{\s*$')
_WHILE = re.compile(r'\swhile\(.*?(?:condition=%([^,\s]+).*?)?body=%([^,\s]+)')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLED = re.compile(r'(?:calls|to_apply|body|condition)=%([^,\s}]+)|branch_computations=\{([^}]*)\}')
_LOOP_BOUND = re.compile(r'ROOT .*compare\([^,]*,\s*(?:s32\[\]\S*\s+)?%([^,\s)]+)\).*direction=LT')
# The TPU compiler emits a reduce-scatter as a fusion of this name around an all-reduce and
# a slice: the bytes it produces are the fusion's result.
_REDUCE_SCATTER_FUSION = 'all-reduce-scatter'


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, str], str | None]:
  """({computation: its lines}, {computation: its result type}, the entry computation)."""
  bodies: dict[str, list[str]] = {}
  results: dict[str, str] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      bodies[current], results[current] = [], m.group(2)
      entry = current if line.startswith('ENTRY') else entry
    elif current is not None:
      bodies[current].append(line)
  return bodies, results, entry


def _trip_count(line: str, bodies: dict[str, list[str]]) -> tuple[str | None, int]:
  """(body, trips) of a `while` line: the trip count XLA annotates (CPU, GPU) or, failing
  that, N of a condition `i < N` with a constant N (the TPU compiler's form of a scan; jax
  counts from 0); 1 when neither is there."""
  loop = _WHILE.search(line)
  if not loop:
    return None, 1
  known = _KNOWN_TRIPS.search(line)
  if known:
    return loop.group(2), int(known.group(1))
  condition = bodies.get(loop.group(1) or '', [])
  bound = next((m.group(1) for m in map(_LOOP_BOUND.search, condition) if m), None)
  for cond_line in condition:
    const = re.match(r'\s*%' + re.escape(bound or '') + r'\s*=\s*s32\[\]\S*\s+constant\((\d+)\)', cond_line)
    if bound and const:
      return loop.group(2), int(const.group(1))
  return loop.group(2), 1


def collective_bytes_per_step(hlo_text: str) -> dict[str, int]:
  """{op: result bytes per device per execution of the module}: like `collectives`, but a
  collective inside a loop body (a scan over layers or micro-batches) counts once per trip,
  and a TPU reduce-scatter fusion counts as one reduce-scatter of its result."""
  bodies, results, entry = _computations(hlo_text)
  memo: dict[str, dict[str, int]] = {}

  def per_run(name: str) -> dict[str, int]:
    """Collective bytes of one execution of computation `name`, callees included."""
    if name in memo:
      return memo[name]
    if name.startswith(_REDUCE_SCATTER_FUSION):
      memo[name] = {'reduce-scatter': _bytes(results[name])}
      return memo[name]
    memo[name] = totals = {}  # a (malformed) cycle contributes nothing
    for line in bodies.get(name, ()):
      op = _OP.search(line)
      if op:
        totals[op.group(2)] = totals.get(op.group(2), 0) + _bytes(op.group(1))
      loop_body, trips = _trip_count(line, bodies)
      for called, branches in _CALLED.findall(line):
        for callee in ([called] if called else [b.strip().lstrip('%') for b in branches.split(',')]):
          times = trips if callee == loop_body else 1
          for kind, nbytes in per_run(callee).items():
            totals[kind] = totals.get(kind, 0) + times * nbytes
    return totals

  return dict(per_run(entry)) if entry is not None else {}


def loop_trips(hlo_text: str) -> list[int]:
  """The trip count of every while loop in an HLO module's text (1 where unknown)."""
  bodies = _computations(hlo_text)[0]
  return [_trip_count(line, bodies)[1] for lines in bodies.values() for line in lines if _WHILE.search(line)]
