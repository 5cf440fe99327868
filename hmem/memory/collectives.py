"""The check of the bank's sharding (docs/DESIGN.md): the largest collective in a compiled
train step over B_local x fetch bytes. Compiles only (no data, no run), on whatever devices
are present."""

from __future__ import annotations

import jax.numpy as jnp

from hmem import hlo, sharding
from hmem.memory.spec import memory_spec


def largest_collective_over_local_fetch(cfg, hlo_text: str) -> dict:
  """The largest collective (op, bytes) in `hlo_text`, the compiled train step of `cfg` on
  all local devices, the bytes of B_local x fetch (in the compute dtype, which the fetched
  rows move in), and their ratio. Compile the post-hoc regime (`train.freeze_anchor`) to
  leave out the anchor's own data-parallel gradient all-reduce."""
  mesh = sharding.make_mesh(cfg.mesh)
  op, size = hlo.largest_collective(hlo_text)
  local_batch = cfg.train.batch_size // (mesh.shape['data'] * mesh.shape['fsdp'])
  local_fetch = local_batch * memory_spec(cfg).param_counts['fetch_params'] * jnp.dtype(cfg.model.dtype).itemsize
  return {'largest_op': op, 'largest_bytes': size, 'local_fetch_bytes': local_fetch, 'ratio': size / local_fetch}
