"""The bank streamed out of checkpoints: export in row ranges within --buffer-mb (byte-equal
to one range, on one process or two), rows caught up to dense AdamW, --workdir inference
reading only the rows a batch needs, int8 bundles, and --format hf never reading the bank."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FAST_COMPILE

from hmem.bundle import edit, stored
from hmem.bundle.export import export
from hmem.cli import main
from hmem.data.source import Position
from hmem.errors import BundleError, CheckpointError
from hmem.infer.source import open_source
from hmem.memory import bank as memory_bank
from hmem.memory import optimizer as memory_optimizer
from hmem.memory.spec import memory_spec
from hmem.train.checkpoint import Checkpoints
from hmem.train.params import restore_params
from hmem.train.state import TrainState

SMALL_MB = 0.13  # one level-1 or generic row of the tiny run (~0.1 MB while caught up), three level-2 rows
TEXTS = ('The French Revolution was a period of political and societal change in France.',
         'Photosynthesis is the process by which plants turn light into chemical energy.',
         'Jazz is a music genre that originated in the African-American communities of New Orleans.',
         'DNA is a polymer that carries genetic instructions for all known organisms.')


def _files(root) -> dict[str, bytes]:
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
          for d, _, names in os.walk(root) for f in names}


@pytest.fixture(scope='module')
def exports(memory_run, memory_bundle, tmp_path_factory):
  """float32 (one range per table), float32 within SMALL_MB (ranges recorded), bfloat16, int8."""
  _, _, _, workdir = memory_run
  root = tmp_path_factory.mktemp('stream')
  (root / 'f32').symlink_to(memory_bundle, target_is_directory=True)  # the session's, one range per table
  ranges = []
  rows = stored.StoredBank.rows
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(stored.StoredBank, 'rows', lambda self, table, index: (
        ranges.append((table, index.stop - index.start, self.row_bytes(table))), rows(self, table, index))[1])
    export(str(workdir), str(root / 'small'), dtype='float32', buffer_mb=SMALL_MB, progress=False)
  export(str(workdir), str(root / 'bf16'), progress=False)
  export(str(workdir), str(root / 'int8'), dtype='int8', progress=False)
  return root, ranges


def test_export_in_small_ranges_is_byte_equal_to_one_range(memory_run, exports):
  cfg = memory_run[0]
  root, ranges = exports
  tables = memory_spec(cfg).tables
  for table, rows, row_bytes in ranges:  # never more rows than the buffer holds while caught up and cast
    assert rows * row_bytes * (stored.ROW_COPIES + 1) <= SMALL_MB * 2**20, (table, rows)
  assert len(ranges) > 2 * len(tables)  # really many ranges
  assert {t: sum(n for u, n, _ in ranges if u == t) for t in tables} == {t: rows for t, (rows, _) in tables.items()}
  whole, small = _files(root / 'f32'), _files(root / 'small')
  assert whole.keys() == small.keys() and all(whole[f] == small[f] for f in whole)


def _logits(source, leaf_B, mode='fetched'):
  tokens_BxT = (np.arange(len(leaf_B) * 16, dtype=np.int32).reshape(len(leaf_B), 16) * 7) % 300
  return np.asarray(jax.jit(lambda m, t, mem: m(t, jnp.ones_like(t), mem))(
      source.model, tokens_BxT, source.memory(leaf_B, mode)), np.float32)


def test_workdir_inference_reads_only_the_rows_it_needs(memory_run, exports):
  cfg, _, _, workdir = memory_run
  root, _ = exports
  source, bundle = open_source(workdir=str(workdir)), open_source(bundle=str(root / 'f32'))
  leaf_B = bundle.router.route(TEXTS).leaf
  for mode in ('fetched', 'generic'):
    np.testing.assert_array_equal(_logits(source, leaf_B, mode), _logits(bundle, leaf_B, mode), err_msg=mode)
  k = cfg.memory.k
  path_rows = {('level1', int(leaf) // k) for leaf in leaf_B} | {('level2', int(leaf)) for leaf in leaf_B}
  assert dict(source.rows.reads) == {key: 1 for key in path_rows | {('generic', 0)}}
  _logits(source, leaf_B)
  assert sum(source.rows.reads.values()) == len(path_rows) + 1  # served from the cache


def _path_chunks(root, manifest, leaf: int, k: int) -> list[str]:
  """The chunk files one root-to-leaf path reads."""
  rows = {'level1': leaf // k, 'level2': leaf}
  return [os.path.join(root, meta['path'], 'c', str(rows[key.split('/')[0]]), '0', '0', '0')
          for key, meta in manifest['bank'].items() if key.split('/')[0] in rows]


def test_int8_bundles_halve_the_bytes_of_a_path_and_keep_the_logits(memory_run, exports, tmp_path, capsys):
  """A path's int8 rows come in as many chunks as bfloat16's (each unit's scale stored after
  its values), half the bytes, and stay packed on the host (cached so: twice the rows in the
  same budget) until the device dequantizes them. (Scales in chunks of their own and the
  dequantization on the host made int8 reads slower than bfloat16's.)"""
  cfg, _, _, workdir = memory_run
  root, _ = exports
  f32, bf16, int8 = (open_source(bundle=root / name) for name in ('f32', 'bf16', 'int8'))
  assert int8.manifest['dtype'] == 'int8' and int8.manifest['anchor_dtype'] == 'bfloat16'
  chunks = {name: _path_chunks(root / name, s.manifest, 5, cfg.memory.k) for name, s in (('bf16', bf16),
                                                                                           ('int8', int8))}
  assert len(chunks['int8']) == len(chunks['bf16'])
  ratio = sum(map(os.path.getsize, chunks['int8'])) / sum(map(os.path.getsize, chunks['bf16']))
  assert 0.5 < ratio < 0.56, ratio  # int8 + one float32 scale per 64 features
  leaf_B = f32.router.route(TEXTS).leaf
  want, half, quarter = _logits(f32, leaf_B), _logits(bf16, leaf_B), _logits(int8, leaf_B)
  # int8 keeps ~7 bits of each unit's largest entry, bfloat16 8 significant bits (anchor too).
  assert np.abs(quarter - want).max() < 3e-2 and np.abs(quarter - want).max() < 3 * np.abs(half - want).max() + 1e-3
  rows = int8.rows.read({'level2': np.array([5])})['level2']
  features = cfg.model.d_model
  assert all(a.dtype == np.int8 and a.shape[-1] == features + 4 for a in rows.values())  # packed on the host
  memory = int8.memory(np.array([5]), 'fetched')
  assert all(isinstance(a, jax.Array) and a.dtype == int8.dtype and a.shape[-1] == features  # dequantized on
             for a in memory.values())  # the device, to the compute dtype
  with pytest.raises(BundleError, match="--dtype 'fp16'; choose one of bfloat16, float32, int8"):
    export(str(workdir), str(tmp_path / 'x'), dtype='fp16')
  assert main(['export', '--workdir', str(workdir), '--out', str(tmp_path / 'hf'), '--format', 'hf',
               '--dtype', 'int8']) == 2
  assert 'int8 is for bundles' in capsys.readouterr().err
  with pytest.raises(BundleError, match='int8 bank'):
    edit.drop(str(root / 'int8'), [(1, 0)])


def test_hf_export_never_reads_the_bank(memory_run, tmp_path, capsys):
  """The bank items deleted: the anchor still restores and hf export goes on to its own
  check (the tiny run's layernorm anchor is no Llama), while a bundle export names the bank."""
  _, _, _, workdir = memory_run
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  step_dir = run / 'checkpoints' / str(max(int(p) for p in os.listdir(run / 'checkpoints') if p.isdigit()))
  shutil.rmtree(step_dir / 'bank')
  shutil.rmtree(step_dir / 'bank_opt')
  _, _, params, step, _ = restore_params(str(run))
  assert step == memory_run[0].train.steps and jax.tree.leaves(params)
  assert main(['export', '--workdir', str(run), '--out', str(tmp_path / 'hf'), '--format', 'hf']) == 2
  assert "a Hugging Face Llama needs norm='rmsnorm'" in capsys.readouterr().err
  with pytest.raises(CheckpointError, match='level1.last_step cannot be opened'):
    export(str(run), str(tmp_path / 'b'), progress=False)


def test_export_catches_every_row_up_to_dense_adamw(memory_run, tmp_path):
  """300 steps of the bank optimizer on the run's bank shapes, rows fetched at rates from half
  the steps to only the first five: the exported bank equals optax.adamw applied densely
  (zero gradients for rows not fetched) within 1e-4, while the stored rows are stale."""
  cfg, _, _, workdir = memory_run
  run = tmp_path / 'run'
  run.mkdir()
  config = json.loads((workdir / 'config.json').read_text())
  config['train'].update(steps=300, warmup_steps=20)
  config['memory'].update(lr=1e-2, min_lr=1e-3, weight_decay=0.1)
  (run / 'config.json').write_text(json.dumps(config))
  cfg = cfg.copy_and_resolve_references()
  cfg.train.update(steps=300, warmup_steps=20)
  cfg.memory.update(lr=1e-2, min_lr=1e-3, weight_decay=0.1)
  _, _, params, _, _ = restore_params(str(workdir))
  bank = memory_bank.init_bank(memory_spec(cfg), jax.random.key(0))
  rng = np.random.default_rng(0)
  rate = {t: np.resize([0.5, 0.2, 0.05, 0.01], rows) for t, (rows, _) in memory_spec(cfg).tables.items()}
  rate['level2'][3] = 0  # fetched on the first five steps only
  t = cfg.train
  tx = optax.adamw(memory_optimizer.memory_schedule(memory_spec(cfg)), b1=t.b1, b2=t.b2, eps=t.eps,
                   weight_decay=cfg.memory.weight_decay)
  ours, opt, theirs, their_opt = bank, memory_optimizer.init(bank), bank, tx.init(bank)
  table = jnp.asarray(memory_optimizer.log_decay_table(memory_spec(cfg)))
  update = jax.jit(lambda b, o, ids, g, s: memory_optimizer.update(memory_spec(cfg), b, o, ids, g, s, True, table))
  dense = jax.jit(lambda p, o, g: (lambda u, o: (optax.apply_updates(p, u), o))(*tx.update(g, o, p)))
  for step in range(1, 301):
    touched = {tab: (rng.random(r.shape) < r) | (step <= 5) for tab, r in rate.items()}
    grads = {tab: {n: np.where(touched[tab][:, None, None, None], rng.normal(size=a.shape), 0).astype(np.float32)
                   for n, a in named.items()} for tab, named in bank.items()}
    ids = {tab: np.where(touched[tab], np.arange(len(touched[tab])), len(touched[tab])) for tab in bank}
    ours, opt = update(ours, opt, ids, grads, jnp.int32(step))
    theirs, their_opt = dense(theirs, their_opt, grads)
  ckpt = Checkpoints(str(run / 'checkpoints'), async_save=False)
  ckpt.save(TrainState(step=jnp.int32(300), params=params, opt_state=None, bank=ours, bank_opt=opt), Position(), {})
  ckpt.close()
  assert int(np.asarray(opt['level2']['last_step'])[3]) == 5
  export(str(run), str(tmp_path / 'b'), dtype='float32', buffer_mb=SMALL_MB, progress=False)
  reader, staleness = open_source(bundle=tmp_path / 'b').rows, []
  for tab, named in theirs.items():
    got = reader.read({tab: np.arange(next(iter(named.values())).shape[0])})[tab]
    for n, want in named.items():
      moved = np.abs(np.asarray(want) - np.asarray(bank[tab][n])).max()
      error = np.abs(got[n] - np.asarray(want)).max() / moved
      stale = np.abs(np.asarray(ours[tab][n]) - np.asarray(want)).max() / moved
      assert error <= 1e-4, (tab, n, error)
      staleness.append(stale)
  assert max(staleness) > 1e-2  # the rows as stored are far from dense AdamW's: the catch-up is what matches


@pytest.mark.slow
def test_two_processes_export_the_bundle_one_process_exports(memory_run, exports, tmp_path):
  _, _, _, workdir = memory_run
  root, _ = exports
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count=1 {FAST_COMPILE}'}
  procs = [subprocess.Popen([sys.executable, '-m', 'hmem.cli', 'export', '--workdir', str(workdir), '--out',
                             str(tmp_path / 'two'), '--dtype', 'float32', '--buffer-mb', str(SMALL_MB), '--no-progress',
                             '--coordinator', f'localhost:{port}', '--num-processes', '2', '--process-id', str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  one, two = _files(root / 'small'), _files(tmp_path / 'two')
  assert one.keys() == two.keys() and all(one[f] == two[f] for f in one)
