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
