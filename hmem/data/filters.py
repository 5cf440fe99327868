"""`data.filter`: which records of a corpus `hmem prepare` keeps, by their other fields.

A filter is a Python-like boolean expression over a record's fields (JSONL keys, Parquet
columns) and literals, e.g. `language == 'en'`, `language_score >= 0.8 and token_count > 50`,
`dump in ('CC-MAIN-2024-10', 'CC-MAIN-2024-18')`. It allows comparisons (==, !=, <, <=, >,
>=, in, not in, chained), and, or, not and parentheses; nothing else (no calls, no
attributes), and it is parsed, never evaluated by Python, so a filter cannot run code.

A comparison is false when its field is missing or null, or when the values cannot be
compared (a string against a number): such a record is dropped as 'filtered', never an
error. Records the filter drops are counted under skipped 'filtered'.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping

from hmem.errors import ConfigError

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b}
_LITERALS = (str, int, float, bool)


class RecordFilter:
  """A parsed `data.filter`: `columns` it reads, and `keeps(record)`; pickles as its text."""

  def __init__(self, text: str):
    self.text = text
    self.columns: set[str] = set()
    try:
      body = ast.parse(text.strip(), mode='eval').body
    except SyntaxError as e:
      raise ConfigError(f'data.filter={text!r} is not an expression ({e.msg}); write e.g. '
                        "\"language == 'en' and score >= 0.5\"") from None
    self._keeps = self._compile(body)

  def __reduce__(self):
    return RecordFilter, (self.text,)

  def keeps(self, record: Mapping) -> bool:
    """Whether the record (field -> value) passes the filter."""
    return bool(self._keeps(record))

  def _compile(self, node) -> Callable[[Mapping], object]:
    if isinstance(node, ast.BoolOp):
      parts = [self._compile(v) for v in node.values]
      combine = all if isinstance(node.op, ast.And) else any
      return lambda r: combine(p(r) for p in parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
      inner = self._compile(node.operand)
      return lambda r: not inner(r)
    if isinstance(node, ast.Compare):
      return self._comparison(node)
    raise self._refuse(node)

  def _comparison(self, node: ast.Compare):
    values = [self._value(v) for v in (node.left, *node.comparators)]
    if not any(isinstance(v, ast.Name) for v in (node.left, *node.comparators)):
      raise ConfigError(f'data.filter={self.text!r}: {ast.unparse(node)!r} compares no field; '
                        'name a JSONL key or Parquet column')
    if not all(type(op) in _COMPARE for op in node.ops):
      raise self._refuse(node)
    ops = [_COMPARE[type(op)] for op in node.ops]

    def compare(record):
      operands = [v(record) for v in values]
      try:
        return all(a is not None and b is not None and op(a, b)
                   for op, a, b in zip(ops, operands, operands[1:]))
      except TypeError:  # e.g. 'en' < 3: the record does not match
        return False
    return compare

  def _value(self, node) -> Callable[[Mapping], object]:
    if isinstance(node, ast.Name):
      self.columns.add(node.id)
      return lambda r: r.get(node.id)
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, _LITERALS)):
      return lambda r: node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, _LITERALS) for e in node.elts):
      literals = frozenset(e.value for e in node.elts)
      return lambda r: literals
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)):
      negated = -node.operand.value
      return lambda r: negated
    raise self._refuse(node)

  def _refuse(self, node) -> ConfigError:
    return ConfigError(f'data.filter={self.text!r}: {ast.unparse(node)!r} is not allowed; use comparisons of '
                       'fields with literals (==, !=, <, <=, >, >=, in, not in) joined by and, or, not')


def parse_filter(text: str) -> RecordFilter | None:
  """The filter of `data.filter`, or None when it is empty (every record passes)."""
  return RecordFilter(text) if text.strip() else None
