"""`hmem plan` (the train step compiled for N fake devices, or for a TPU topology with the
TPU compiler), the collective count of a compiled program, and the persistent compilation
cache.

The TPU tests need libtpu (`pip install '.[tpu]'`; CI installs it) and skip only without
it; each compiles tiny programs for a 4-chip v5e (10-40 s on 2 cores)."""

import importlib.util
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
from hmem.plan import plan, targets
from hmem.train import hardware

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="libtpu is not installed (pip install '.[tpu]'): no TPU compiler")


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


@needs_libtpu
def test_tpu_collectives_in_a_loop_and_reduce_scatters_count_per_step():
  """The TPU compiler annotates no trip count on a scan's loop (its condition is i < 7), and
  emits the reduce-scatter of an FSDP gradient as a fusion around an all-reduce: both still
  count per step, the reduce-scatter by the shard it produces."""
  mesh = jax.make_mesh((4,), ('x',), devices=targets.tpu_devices('v5e:2x2'))

  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=P('x'), out_specs=P('x'))
  def loop(a):
    return jax.lax.scan(lambda c, _: (c * jax.lax.psum(c, 'x'), None), a, None, length=7)[0]

  text = loop.lower(jax.ShapeDtypeStruct((4 * 8, 128), jnp.float32, sharding=NamedSharding(mesh, P('x')))
                    ).compile().as_text()
  assert '"known_trip_count"' not in text and 7 in hlo.loop_trips(text)
  assert hlo.collective_bytes_per_step(text) == {'all-reduce': 7 * 8 * 128 * 4}

  grad = jax.jit(jax.grad(lambda w_DxF, x_BxD: jnp.sum(jnp.tanh(x_BxD @ w_DxF))))
  text = grad.lower(jax.ShapeDtypeStruct((128, 256), jnp.float32, sharding=NamedSharding(mesh, P('x'))),
                    jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P('x')))
                    ).compile().as_text()
  per_step = hlo.collective_bytes_per_step(text)
  assert per_step['reduce-scatter'] == 128 * 256 * 4 // 4 and 'all-reduce' not in per_step  # not its inner all-reduce


@pytest.mark.slow
@needs_libtpu
def test_plan_target_compiles_the_step_for_a_tpu_topology(repo):
  """`hmem plan --target v5e:2x2`: the tiny step with memory compiled by the TPU compiler for
  4 compile-only v5e chips (building it runs nothing on them), checked against the chip's
  HBM, with the TPU cost model's step time from a program whose loops are unrolled."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  overrides = ['--config.memory.levels=(8,4)', '--config.mesh.fsdp=2']
  out = subprocess.run([sys.executable, '-m', 'hmem.cli', 'plan', '--target', 'v5e:2x2', '--config',
                        str(repo / 'configs/tiny.py'), *overrides], env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert plan.MODELED in out.stdout
  got = json.loads(out.stdout.splitlines()[-1])
  cfg = load_config(str(repo / 'configs/tiny.py'), overrides)
  counts = sizes.sizes(cfg)
  assert (got['platform'], got['device_kind'], got['devices'], got['hosts']) == ('tpu', 'TPU v5 lite', 4, 1)
  assert got['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1, 'memory': 1}
  assert got['budget_bytes'] == hardware.TPUS['TPU v5 lite'].hbm_bytes and got['fits']
  per_device = got['bytes_per_device']
  assert per_device['bank'] == (counts['bank_params'] + counts['fetch_params']) * 4 // 4
  assert per_device['total'] >= per_device['temporaries'] > 0
  assert got['collective_bytes']['all-to-all'] > 0  # the memory's fetched blocks move to their sequences

  modeled = got['modeled']
  assert modeled['source'] == plan.MODELED and modeled['loops_counted_once'] == []
  # Every layer counted: a loop counted once would leave XLA fewer FLOPs than the model's.
  assert modeled['flops_per_chip'] >= got['flops_per_step'] / 4
  step_s = modeled['step_s']
  assert step_s >= max(modeled['compute_s'], modeled['memory_s']) * 0.5 > 0
  assert modeled['tokens_per_s_per_chip'] == pytest.approx(8 * 64 / step_s / 4)
  assert modeled['mfu'] == pytest.approx(got['flops_per_step'] / 4 / step_s / 197e12)


@needs_libtpu
def test_plan_target_reports_a_step_the_tpu_compiler_refuses(make_config):
  """A step too large for a v5e's 15.75 GiB: the TPU compiler refuses to compile it, and the
  plan says it does not fit, with the compiler's figure, instead of raising."""
  out = plan.plan(make_config('train.batch_size=65536', 'data.seq_len=256'), targets.tpu_devices('v5e:2x2'))
  assert not out['fits'] and out['compiler_error'].startswith('RESOURCE_EXHAUSTED')
  assert out['bytes_per_device']['total'] > out['bytes_per_device']['temporaries'] > out['budget_bytes']


def test_target_errors_name_the_fix(monkeypatch):
  if importlib.util.find_spec('libtpu') is not None:
    with pytest.raises(ConfigError, match=r"v9x:2x2.*give a TPU kind \(v4, v5e, v5p, v6e\)"):
      targets.tpu_devices('v9x:2x2')
    with pytest.raises(ConfigError, match=r'v5e:1x1: the TPU compiler refuses it .*spans whole hosts'):
      targets.tpu_devices('v5e:1x1')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
  with pytest.raises(ConfigError, match=r"libtpu\), which is not installed: pip install '.\[tpu\]'"):
    targets.tpu_devices('v5e:2x2')


@needs_libtpu
def test_meshes_on_tpu_topologies_split_physical_axes_and_join_slices_over_data(make_config):
  """data 8 x fsdp 8 on a 4x4x4 v5p needs an axis split across physical ones; two v5e
  slices are joined over the data axis only (each fsdp group stays within a slice)."""
  from hmem import sharding
  mesh = sharding.make_mesh(make_config('mesh.data=8', 'mesh.fsdp=8').mesh, targets.tpu_devices('v5p:4x4x4'))
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 8, 'tensor': 1, 'memory': 1}
  devices = targets.tpu_devices('v5e:2x4', slices=2)
  mesh = sharding.make_mesh(make_config('mesh.data=4', 'mesh.fsdp=4').mesh, devices)
  slice_of = {d.id: d.slice_index for d in devices}
  for row in mesh.devices.reshape(4, 4):  # an fsdp group per data index
    assert len({slice_of[d.id] for d in row}) == 1
  assert sorted(slice_of[row[0].id] for row in mesh.devices.reshape(4, 4)) == [0, 0, 1, 1]
  with pytest.raises(ConfigError, match='give mesh.data a multiple of 2'):
    sharding.make_mesh(make_config('mesh.data=1', 'mesh.fsdp=16').mesh, devices)


def test_chip_table_matches_device_kinds():
  """jax calls a v5p "TPU v5" and a v5e "TPU v5 lite": a substring match gave a v5p the
  v5e's peak. GPU kinds match by name, the 40 GB A100 before the 80 GB one."""
  assert hardware.chip('NVIDIA H100 80GB HBM3').name == 'H100'
  assert hardware.chip('NVIDIA A100-SXM4-40GB').hbm_bytes == 40 * 10 ** 9
  assert hardware.chip('NVIDIA A100-SXM4-80GB').hbm_bytes == 80 * 10 ** 9
  assert hardware.chip('cpu') is None and hardware.peak_flops_per_device(5.0) == 5.0
  if importlib.util.find_spec('libtpu') is not None:  # the kinds as libtpu names its devices
    kinds = {name: targets.tpu_devices(topology)[0].device_kind
             for name, topology in (('v5e', 'v5e:2x2'), ('v5p', 'v5p:2x2x1'), ('v6e', 'v6e:2x2'))}
    assert {name: hardware.chip(kind).name for name, kind in kinds.items()} == {'v5e': 'v5e', 'v5p': 'v5p',
                                                                               'v6e': 'v6e'}
    assert hardware.peak_flops_per_device(device=targets.tpu_devices('v5p:2x2x1')[0]) == 459e12


_ALL_TO_ALLS = """
import json, re, sys
from hmem.config import load_config
from hmem.plan import plan, targets
out = {}
for dtype in ('float32', 'bfloat16'):
  cfg = load_config(sys.argv[1], ['memory.levels=(8,4)', 'mesh.data=4', 'train.batch_size=16',
                                  'train.freeze_anchor=true', f'model.dtype={dtype}'])
  compiled = plan._compile(cfg, targets.devices('v5e:2x2'))[3]
  out[dtype] = re.findall(r'= (\\w+)\\[[^]]*\\][^ ]* all-to-all\\(', compiled.as_text())
print(json.dumps(out))
"""


@pytest.mark.slow
@needs_libtpu
def test_fetched_rows_and_their_gradients_move_in_the_compute_dtype(repo):
  """The TPU compiler's train step (post-hoc regime: no anchor all-reduce) with bf16 compute
  moves every all-to-all in bf16 (the fetched rows to their sequences, their gradients back
  to the bank's shards); with fp32 compute the memory's all-to-alls are fp32. (XLA's CPU
  compiler widens bf16 collectives to f32, so this needs the TPU's.)"""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', _ALL_TO_ALLS, str(repo / 'configs/tiny.py')], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  kinds = json.loads(out.stdout.splitlines()[-1])
  assert kinds['bfloat16'] and set(kinds['bfloat16']) == {'bf16'}, kinds
  assert 'f32' in kinds['float32'], kinds


def test_a_cost_model_time_that_is_not_a_time_is_an_error_with_the_roofline_kept():
  """The TPU cost model returned -4.6 s for the 1b step with its 21B bank on v5p:4x4x4: that
  is reported as an error (no tokens/s, no MFU), the roofline terms stay; a positive time
  gives tokens/s per chip and MFU."""
  chip = hardware.chip('TPU v5')
  planned = {'flops_per_step': 64 * 459e12, 'collective_bytes': {'all-to-all': 600e9}}
  cost = {'flops': 459e12, 'bytes accessed': 2765e9, 'optimal_seconds': -4.6}
  bad = plan.modeled_times(cost, planned, chip, chips=64, tokens=1 << 20)
  assert 'step_s' not in bad and 'mfu' not in bad and '-4.6 s' in bad['error']
  assert bad['compute_s'] == pytest.approx(1.0) and bad['memory_s'] == pytest.approx(1.0)
  assert bad['ideal_s'] == pytest.approx(1.0) and bad['collective_s'] == pytest.approx(1.0)
  good = plan.modeled_times({**cost, 'optimal_seconds': 2.0}, planned, chip, chips=64, tokens=1 << 20)
  assert 'error' not in good and good['step_s'] == 2.0
  assert good['mfu'] == pytest.approx(0.5) and good['tokens_per_s_per_chip'] == pytest.approx((1 << 20) / 2.0 / 64)
