"""JAX's persistent compilation cache: compiled steps are reused across runs and restarts
(a resumed or requeued job, every run of a sweep), which matters most at pod scale where
compiling a step takes minutes."""

from __future__ import annotations

import os

import jax


def cache_dir(cfg, workdir: str | None) -> str | None:
  """`train.compile_cache`; if empty: $HMEM_CACHE, else $JAX_COMPILATION_CACHE_DIR (jax's
  own variable), else `jax_cache` beside the workdir (so runs side by side share it), else
  ~/.cache/hmem/jax. 'off' disables it."""
  key = cfg.train.compile_cache
  if key == 'off':
    return None
  if key:
    return key
  for var in ('HMEM_CACHE', 'JAX_COMPILATION_CACHE_DIR'):
    if os.environ.get(var):
      return os.environ[var]
  if workdir:
    return os.path.join(os.path.dirname(os.path.abspath(workdir.rstrip('/'))), 'jax_cache')
  return os.path.join(os.path.expanduser('~'), '.cache', 'hmem', 'jax')


def enable(cfg, workdir: str | None = None) -> str | None:
  """Points jax at `cache_dir(cfg, workdir)`; returns it (None: disabled)."""
  path = cache_dir(cfg, workdir)
  jax.config.update('jax_compilation_cache_dir', path)
  return path
