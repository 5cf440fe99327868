"""Preemption: SIGTERM asks the run to save and stop, at a step boundary every host agrees on.

One process: a Python SIGTERM handler sets a flag, read at the next step boundary.

Several processes: a host that stops while its peers step on hangs both (its collective
save waits for them, their next step waits for it). JAX's preemption service (on by
default with `jax.distributed.initialize`) catches SIGTERM on any host, tells the others
through the coordination service, and picks the step after the furthest host's current
one as the sync point; each host learns it there from `reached_preemption_sync_point`,
a local lookup per step (no collective, no device sync). The protocol blocks those
lookups while it runs, so no host can step past the point being chosen.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

from hmem.errors import ConfigError


class Preemption:
  """`with Preemption() as p:` then `p.requested()` once per step on every host; True at the
  same step on all hosts after any of them received SIGTERM."""

  def __init__(self):
    self.flag = False
    self.calls = 0
    self.previous = None
    self.multihost = jax.process_count() > 1

  def __enter__(self):
    if self.multihost:
      if not jax.config.jax_enable_preemption_service:
        raise ConfigError('a multi-host run needs JAX\'s preemption service to stop all hosts at the same step; '
                          'unset jax_enable_preemption_service=False (JAX_ENABLE_PREEMPTION_SERVICE)')
    elif threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.flag = True

  def requested(self) -> bool:
    if not self.multihost:
      return self.flag
    # Counting calls, not steps: a notice that arrives before the first call sets the sync
    # point to 1, which a count reaches; a resumed run's step numbers would have passed it.
    self.calls += 1
    return multihost_utils.reached_preemption_sync_point(self.calls)

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
