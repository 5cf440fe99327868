"""`hmem plan` (the train step compiled for N fake devices), the collective count of a
compiled program, and the persistent compilation cache."""

import json
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hmem import compile_cache, hlo, sizes
from hmem.config import load_config


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
  # The bank's feature axis is split over data x fsdp = 4 devices; Adam keeps two moments
  # per value plus one int32 step per row.
  assert per_device['bank'] == counts['bank_params'] * 4 // 4
  rows = sum(cfg.memory.k ** level for level in (1, 2)) + 1  # + the generic block
  assert per_device['bank_opt'] == 2 * per_device['bank'] + 4 * rows
  # fsdp=2 splits the anchor's embed axis: between half and all of the fp32 parameters.
  assert counts['anchor_params'] * 2 <= per_device['params'] < counts['anchor_params'] * 4
  assert per_device['total'] >= per_device['temporaries'] > 0 and plan['fits_80gb']
  assert plan['flops_per_step'] == sizes.flops_per_token(cfg, counts) * 8 * 64
  assert plan['collective_bytes'].get('all-gather', 0) + plan['collective_bytes'].get('all-reduce', 0) > 0
  assert os.listdir(tmp_path / 'cache')
