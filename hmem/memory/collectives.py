"""The check of the bank sharding (docs/DESIGN.md): the largest collective in the compiled step over
B_local x fetch bytes. Compiles only (no data, no run), on whatever devices are present."""

from __future__ import annotations

from hmem import hlo, sharding, sizes


def largest_collective_over_local_fetch(cfg) -> dict:
  """Compiles `cfg`'s train step and returns its largest collective (op, bytes), the bytes of
  B_local x fetch (fp32), and their ratio. Use the post-hoc regime (`train.freeze_anchor`)
  to leave out the anchor's own data-parallel gradient all-reduce."""
  from hmem.train.step import fresh_train_step
  mesh = sharding.make_mesh(cfg.mesh)
  batch = cfg.train.batch_size
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    spec, _, step = fresh_train_step(cfg, mesh, init=False)
    text = step.lower(spec.abstract, sharding.abstract_batch(mesh, batch, cfg.data.seq_len)).compile().as_text()
  op, size = hlo.largest_collective(text)
  local_fetch = batch // (mesh.shape['data'] * mesh.shape['fsdp']) * sizes.memory_param_counts(cfg)['fetch_params'] * 4
  return {'largest_op': op, 'largest_bytes': size, 'local_fetch_bytes': local_fetch, 'ratio': size / local_fetch}
