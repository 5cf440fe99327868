"""`hmem plan` (the train step compiled for N fake devices), the collective count of a
compiled program, and the persistent compilation cache."""

import json
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hmem import compile_cache, hlo, sizes
from hmem.config import load_config
from hmem.errors import ConfigError
from hmem.plan import plan


def test_collectives_in_a_loop_count_once_per_trip():
  mesh = jax.make_mesh((8,), ('x',))

  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=P('x'), out_specs=P('x'))
  def f(a):
    return jax.lax.scan(lambda c, _: (c + jax.lax.psum(c, 'x'), None), a, None, length=7)[0]

  x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(mesh, P('x')))
  text = f.lower(x).compile().as_text()
  listed = hlo.collectives(text)
  assert listed and len(listed) < 7  # the loop was not unrolled: one all-reduce in its body
  assert hlo.collective_bytes_per_step(text) == {'all-reduce': 7 * 128 * 4}


def test_compile_cache_directory_precedence(make_config, monkeypatch, tmp_path):
  cfg = make_config()
  monkeypatch.delenv('HMEM_CACHE', raising=False)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  assert compile_cache.cache_dir(cfg, str(tmp_path / 'runs' / 'a')) == str(tmp_path / 'runs' / 'jax_cache')
  assert compile_cache.cache_dir(cfg, 'gs://bucket/runs/a/') == 'gs://bucket/runs/jax_cache'
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/jax')
  assert compile_cache.cache_dir(cfg, 'runs/a') == '/jax'
  monkeypatch.setenv('HMEM_CACHE', '/hmem')
  assert compile_cache.cache_dir(cfg, 'runs/a') == '/hmem'
  assert compile_cache.cache_dir(make_config('train.compile_cache=/key'), 'runs/a') == '/key'
  assert compile_cache.cache_dir(make_config('train.compile_cache=off'), 'runs/a') is None


def test_plan_on_fake_devices_fills_the_compile_cache(repo, tmp_path):
  """A fresh process: --devices sets 4 fake CPU devices before jax starts; the compiled step
  lands in $HMEM_CACHE."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  env['HMEM_CACHE'] = str(tmp_path / 'cache')
  overrides = ['--config.memory.levels=(8,4)', '--config.mesh.fsdp=2']
  out = subprocess.run([sys.executable, '-m', 'hmem.cli', 'plan', '--config', str(repo / 'configs/tiny.py'),
                        '--devices', '4', *overrides], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.splitlines()[-1])
  cfg = load_config(str(repo / 'configs/tiny.py'), overrides)
  counts = sizes.sizes(cfg)
  assert plan['devices'] == 4 and plan['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1, 'memory': 1}
  per_device = plan['bytes_per_device']
  # The bank (its levels plus the generic block, one row as wide as a fetch) is split on
  # its feature axis over data x fsdp = 4 devices; Adam keeps two moments per value plus
  # one int32 step per row.
  assert per_device['bank'] == (counts['bank_params'] + counts['fetch_params']) * 4 // 4
  rows = sum(cfg.memory.k ** level for level in (1, 2)) + 1  # + the generic block
  assert per_device['bank_opt'] == 2 * per_device['bank'] + 4 * rows
  # fsdp=2 splits the anchor's embed axis: between half and all of the fp32 parameters.
  assert counts['anchor_params'] * 2 <= per_device['params'] < counts['anchor_params'] * 4
  assert per_device['total'] >= per_device['temporaries'] > 0 and plan['fits_80gb']
  assert plan['flops_per_step'] == sizes.flops_per_token(cfg, counts) * 8 * 64
  assert plan['collective_bytes'].get('all-gather', 0) + plan['collective_bytes'].get('all-reduce', 0) > 0
  assert os.listdir(tmp_path / 'cache')


@pytest.fixture
def fake_plans(monkeypatch):
  """plan.plan without compiling: a state of 96 units split by FSDP plus temporaries each
  remat policy shrinks; a layout whose batch does not split is a ConfigError. Records each
  call's (fsdp, remat)."""
  calls = []

  def fake(cfg, devices, budget_bytes):
    calls.append((cfg.mesh.fsdp, cfg.model.remat))
    assert cfg.mesh.data * cfg.mesh.fsdp == len(devices)
    if cfg.mesh.fsdp == 2:
      raise ConfigError('train.batch_size does not split')
    total = 96 // cfg.mesh.fsdp + {'none': 40, 'dots': 20, 'full': 4}[cfg.model.remat]
    return {'mesh': {'data': cfg.mesh.data, 'fsdp': cfg.mesh.fsdp}, 'remat': cfg.model.remat,
            'bytes_per_device': {'total': total}, 'fits': total <= budget_bytes}

  monkeypatch.setattr(plan, 'plan', fake)
  return calls


@pytest.mark.parametrize('budget, fsdp, remat', [
    (200, 1, 'none'),   # data parallel fits
    (64, 4, 'none'),    # 96/4 + 40; fsdp 2 is refused, 1 is too big
    (50, 4, 'dots'),    # no FSDP fits without remat (12 + 40 > 50); 'dots' at 4: 24 + 20
    (29, 4, 'full'),    # only 'full' fits at 8 (12 + 4); fewer shards: 4 (24 + 4), not 2 (refused)
])
def test_search_prefers_less_remat_then_fewer_shards(make_config, fake_plans, budget, fsdp, remat):
  best, tried = plan.search(make_config(), jax.devices()[:8], budget)
  assert (best['mesh']['fsdp'], best['remat']) == (fsdp, remat)
  assert best['flags'] == [f'--config.mesh.data={8 // fsdp}', f'--config.mesh.fsdp={fsdp}',
                           f'--config.model.remat={remat}']
  # Brute force over every layout agrees: no cheaper policy fits, nor fewer shards with it.
  totals = {(f, r): 96 // f + {'none': 40, 'dots': 20, 'full': 4}[r] for f in (1, 4, 8) for r in plan.REMATS}
  cheaper = [(f, r) for (f, r), t in totals.items() if t <= budget
             and (plan.REMATS.index(r), f) < (plan.REMATS.index(remat), fsdp)]
  assert cheaper == []
  assert len(fake_plans) <= 3 * 3 and len(tried) == len(fake_plans)


def test_search_with_no_fit_tries_each_policy_once(make_config, fake_plans):
  best, tried = plan.search(make_config(), jax.devices()[:8], 1)
  assert best is None and fake_plans == [(8, 'none'), (8, 'dots'), (8, 'full')]
  assert [t['total'] for t in tried] == [52, 32, 16]
