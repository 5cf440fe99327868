"""Reading the next batch in a thread while the current step runs."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Hashable
from typing import Any


class Prefetcher:
  """`get(key, prefetch=next_key)` returns `read(key)` and starts reading `next_key` in a
  background thread; the next `get(next_key)` takes that result. A request for any other
  key (a resume, an evaluation) reads it directly, so results never depend on the order."""

  def __init__(self, read: Callable[[Any], Any]):
    self.read = read
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self.pending: tuple[Hashable, concurrent.futures.Future] | None = None

  def get(self, key: Hashable, prefetch: Hashable | None = None):
    pending, self.pending = self.pending, None
    out = pending[1].result() if pending is not None and pending[0] == key else self.read(key)
    if prefetch is not None:
      self.pending = (prefetch, self.pool.submit(self.read, prefetch))
    return out

  def close(self) -> None:
    self.pool.shutdown(wait=True, cancel_futures=True)
