"""Parameters carry logical axes, the rules shard them, and a bad mesh is explained. That
runs on several meshes match a single device is tested with memory, anchor and bank
compared together (test_memory.py)."""


import jax
import pytest
from flax import nnx

from hmem import sharding
from hmem.model import build_model


def test_every_parameter_has_logical_axes_with_rules(make_config):
  cfg = make_config()
  abstract = nnx.eval_shape(lambda: build_model(cfg))
  ruled = {name for name, _ in cfg.mesh.rules}
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var.get_value().ndim, path
    assert set(names) <= ruled, (path, names)


def test_parameters_are_sharded_by_the_rules(make_config):
  cfg = make_config('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2')
  mesh = sharding.make_mesh(cfg.mesh)
  from hmem.train.optimizer import anchor_optimizer
  from hmem.train.state import state_spec
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    spec = state_spec(cfg, anchor_optimizer(cfg.train)[0], mesh)
  gate = spec.shardings.params['blocks']['ffn']['gate']['kernel'].spec
  assert tuple(gate) == (None, 'fsdp', 'tensor')
  mu_gate = spec.shardings.opt_state[0].mu['blocks']['ffn']['gate']['kernel'].spec
  assert mu_gate == gate


@pytest.mark.parametrize('sizes, devices, message', [
    ({'data': -1, 'fsdp': 3, 'tensor': 1, 'memory': 1}, 8, 'not a multiple of 3'),
    ({'data': -1, 'fsdp': -1, 'tensor': 1, 'memory': 1}, 8, 'at most one -1'),
    ({'data': 2, 'fsdp': 2, 'tensor': 1, 'memory': 1}, 8, 'needs 4 devices'),
])
def test_bad_mesh_is_explained(sizes, devices, message):
  from hmem.errors import ConfigError
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(sizes, devices)


def test_a_logical_axis_without_a_rule_is_an_error():
  from hmem.errors import ConfigError
  rules = (('embed', 'fsdp'), ('layers', None))
  assert sharding.logical_to_spec(('layers', 'embed', None), rules) == jax.sharding.PartitionSpec(None, 'fsdp', None)
  with pytest.raises(ConfigError, match="logical axis 'emb' has no rule in mesh.rules"):
    sharding.logical_to_spec(('layers', 'emb'), rules)
