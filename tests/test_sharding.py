"""The same run on 1 device and on 8 fake devices under several meshes gives the same
losses, gradient norms and final parameters (fp32)."""

import json

import jax
import numpy as np
import pytest
from conftest import assert_trees_close, saved_items
from flax import nnx

from hmem import sharding
from hmem.model import build_model
from hmem.train.trainer import train

MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1)]


def _run(make_config, tmp_path, mesh, devices):
  """(metrics rows, final anchor parameters) of 3 steps on `mesh`."""
  d, f, t, m = mesh
  cfg = make_config('train.steps=3', 'train.log_every=1', 'train.eval_every=0', 'train.checkpoint_every=0',
                    f'mesh.data={d}', f'mesh.fsdp={f}', f'mesh.tensor={t}', f'mesh.memory={m}')
  workdir = tmp_path / '_'.join(map(str, mesh))
  train(cfg, str(workdir), progress=False, devices=devices)
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return rows, saved_items(workdir, 3)['params']


@pytest.fixture(scope='module')
def single_device_run(make_config, tmp_path_factory):
  return _run(make_config, tmp_path_factory.mktemp('one'), (1, 1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize('mesh', MESHES, ids=lambda m: 'x'.join(map(str, m)))
def test_sharded_runs_match_a_single_device(make_config, tmp_path, single_device_run, mesh):
  """Only the fp32 summation order differs. Measured: losses and gradient norms within
  3e-7 relative, parameters after 3 AdamW steps (lr 1e-2 scale) within 6e-7 absolute;
  allowed: rtol 1e-5, and rtol 1e-4 + atol 2e-6 for parameters."""
  assert jax.device_count() == 8
  rows, params = _run(make_config, tmp_path, mesh, jax.devices())
  single_rows, single_params = single_device_run
  assert [r['step'] for r in rows] == [1, 2, 3]
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in single_rows], rtol=1e-5, err_msg=key)
  assert_trees_close(params, single_params, rtol=1e-4, atol=2e-6)


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
