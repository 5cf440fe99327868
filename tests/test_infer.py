"""Inference: routing equals `prepare`'s, sources and bundles reproduce the trained model,
blocking, partial bundles, bank edits, every bad input of a bundle, and bundles on an object store."""

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from hmem import sharding, sizes
from hmem.bundle.export import export
from hmem.bundle.reader import Reader
from hmem.cli import main
from hmem.data import layout
from hmem.data.router import Router, parse_node
from hmem.data.tokenizer import Tokenizer
from hmem.errors import BundleError
from hmem.infer.source import open_source
from hmem.memory import bank as memory_bank
from hmem.memory import optimizer as memory_optimizer
from hmem.train.checkpoint import Checkpoints
from hmem.train.optimizer import anchor_optimizer
from hmem.train.state import state_spec
from hmem.train.trainer import train


def _documents(data, manifest):
  """(texts, leaves) of every whole document the prepared shards hold, by its packed leaf."""
  tokenizer = Tokenizer.load(str(data / 'tokenizer.json'))
  texts, leaves = [], []
  for split in layout.SPLITS:
    raw = [bytes(r) for s in manifest['splits'][split]['shards']
           for r in grain.sources.ArrayRecordDataSource(str(data / s['file']))]
    b = layout.decode_batch(raw, manifest['seq_len'])
    for leaf in np.unique(b['leaf_id']):
      rows = b['leaf_id'] == leaf
      stream = b['tokens'][rows][b['segment_ids'][rows] > 0]  # the leaf's documents end to end
      for doc in np.split(stream, np.flatnonzero(stream == manifest['eot_id']) + 1)[:-1]:
        texts.append(tokenizer.decode(doc[:-1]))
        leaves.append(int(leaf))
  return texts, np.asarray(leaves)


def test_routing_new_text_gives_the_leaf_prepare_gave(memory_run):
  cfg, data, manifest, _ = memory_run
  texts, leaves = _documents(data, manifest)
  assert len(texts) == manifest['documents_kept'] == 400
  assert len(np.unique(leaves)) > 4  # a real spread over the 16 leaves
  routes = Router.load(str(data)).route(texts)
  np.testing.assert_array_equal(routes.leaf, leaves)
  np.testing.assert_array_equal(routes.path[:, 0], leaves // 4)
  np.testing.assert_array_equal(routes.path[:, 1], leaves)
  assert routes.fallbacks == 0 and (routes.blocked == -1).all()


TEXTS = ('The French Revolution was a period of political and societal change in France.',
         'Photosynthesis is the process by which plants turn light into chemical energy.',
         'The Roman Empire was the post-Republican state of ancient Rome.',
         'Jazz is a music genre that originated in the African-American communities of New Orleans.',
         'The Pacific Ocean is the largest and deepest of the oceanic divisions of the Earth.',
         'Mathematics is a field of study that discovers and organizes abstract objects.',
         'Football is a family of team sports that involve kicking a ball to score a goal.',
         'DNA is a polymer that carries genetic instructions for all known organisms.')


@pytest.fixture(scope='module')
def bundles(memory_run, tmp_path_factory):
  """Bundles of the run: float32 (written by the CLI), bfloat16, and float32 of subtree 1 only."""
  _, _, _, workdir = memory_run
  root = tmp_path_factory.mktemp('bundles')
  assert main(['export', '--workdir', str(workdir), '--out', str(root / 'f32'), '--dtype', 'float32',
               '--no-progress']) == 0
  export(str(workdir), str(root / 'bf16'), progress=False)
  export(str(workdir), str(root / 'part'), dtype='float32', subtrees=[1], progress=False)
  return root


def _tokens():
  tokens_BxT = (np.arange(8 * 24, dtype=np.int32).reshape(8, 24) * 7) % 300
  segment_ids_BxT = np.ones_like(tokens_BxT)
  segment_ids_BxT[:, 16:] = 2  # two packed documents
  return tokens_BxT, segment_ids_BxT


@jax.jit
def _logits(model, tokens_BxT, segment_ids_BxT, memory):
  return model(tokens_BxT, segment_ids_BxT, memory)


def _trained(cfg, workdir):
  """The run's last state as the trainer restores it (whole), its bank caught up to the last
  step (as dense AdamW holds it), and its jitted eval-time memory."""
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    spec = state_spec(cfg, anchor_optimizer(cfg.train)[0], mesh)
    ckpt = Checkpoints(str(workdir / 'checkpoints'), async_save=False, read_only=True)
    state, _, _ = ckpt.restore(ckpt.latest_step(), spec.abstract)
    ckpt.close()
  model = nnx.merge(spec.graphdef, state.params)
  caught_up = jax.jit(lambda w, o, step: memory_optimizer.caught_up(cfg, w, o['mu'], o['nu'], o['last_step'], step))
  state = state.replace(bank={t: caught_up(w, state.bank_opt[t], state.step) for t, w in state.bank.items()})

  def memory(leaf_B, mode):
    blocks = memory_bank.gather_levels(cfg, state.bank, jnp.asarray(leaf_B))
    generic = state.bank['generic'] if mode == 'generic' else None
    return memory_bank.assemble(blocks, generic, jnp.ones(len(leaf_B), bool), jnp.float32)

  return model, memory


def test_sources_reproduce_the_trained_model(memory_run, bundles):
  cfg, _, _, workdir = memory_run
  model, memory = _trained(cfg, workdir)
  tokens_BxT, segment_ids_BxT = _tokens()
  sources = {'workdir': open_source(workdir=str(workdir)), 'f32': open_source(bundle=str(bundles / 'f32')),
             'bf16': open_source(bundle=str(bundles / 'bf16'))}
  leaf_B = sources['f32'].router.route(TEXTS).leaf
  for mode in ('fetched', 'generic'):
    want = _logits(model, tokens_BxT, segment_ids_BxT, memory(leaf_B, mode))
    for name, source in sources.items():
      got = _logits(source.model, tokens_BxT, segment_ids_BxT, source.memory(leaf_B, mode))
      if name == 'bf16':
        # bfloat16 keeps 8 significant bits: logits of magnitude ~1 move by about 1e-2.
        np.testing.assert_allclose(got, want, atol=3e-2, err_msg=f'{name} {mode}')
        assert np.abs(got - want).max() > 0  # really rounded
      else:
        np.testing.assert_array_equal(got, want, err_msg=f'{name} {mode}')
  source = sources['f32']
  assert source.manifest['sizes'] == sizes.sizes(cfg) and source.step == cfg.train.steps
  none = _logits(model, tokens_BxT, segment_ids_BxT, None)
  np.testing.assert_array_equal(_logits(source.model, tokens_BxT, segment_ids_BxT, source.memory(leaf_B, 'none')), none)
  fetched = _logits(source.model, tokens_BxT, segment_ids_BxT, source.memory(leaf_B, 'fetched'))
  assert np.abs(fetched - none).max() > 1e-4  # the trained memory changes the logits


def test_a_blocked_node_is_never_read(bundles):
  source = open_source(bundle=str(bundles / 'f32'))
  free = source.router.route(TEXTS)
  busiest = int(np.bincount(free.path[:, 0]).argmax())
  routes = source.router.route(TEXTS, block=[(1, busiest)])
  source.memory(routes.leaf, 'fetched')
  read = set(source.rows.reads)
  assert read and not any((t == 'level1' and r == busiest) or (t == 'level2' and r // 4 == busiest) for t, r in read)
  assert busiest not in routes.path[:, 0]
  untouched = free.path[:, 0] != busiest
  np.testing.assert_array_equal(routes.leaf[untouched], free.leaf[untouched])  # the others go where they went
  # Blocking a leaf sends its texts to the nearest sibling leaf under the same level-1 node.
  leaf = int(free.leaf[0])
  rerouted = source.router.route(TEXTS[:1], block=[(2, leaf)])
  assert rerouted.leaf[0] != leaf and rerouted.path[0, 0] == free.path[0, 0]
  assert all(count == 1 for count in source.rows.reads.values())  # each row read once, then cached


def test_block_best_moves_every_text_to_the_best_other_subtree(bundles):
  router = open_source(bundle=str(bundles / 'f32')).router
  free = router.route(TEXTS)
  best = router.route(TEXTS, block_best=True)
  np.testing.assert_array_equal(best.blocked, free.path[:, 0])
  assert (best.path[:, 0] != free.path[:, 0]).all()
  for i, text in enumerate(TEXTS):  # the same as blocking that text's own subtree by hand
    assert router.route([text], block=[(1, int(free.path[i, 0]))]).leaf[0] == best.leaf[i]


def test_partial_bundle_serves_its_subtree_and_falls_back(bundles):
  full, part = open_source(bundle=str(bundles / 'f32')), open_source(bundle=str(bundles / 'part'))
  assert part.manifest['subtrees'] == [1]
  free, routes = full.router.route(TEXTS), part.router.route(TEXTS)
  np.testing.assert_array_equal(routes.fallback, free.path[:, 0] != 1)
  assert routes.fallbacks > 0 and (routes.path[:, 0] == 1).all()
  np.testing.assert_array_equal(routes.leaf[~routes.fallback], free.leaf[~routes.fallback])
  for table, rows in part.blocks(routes.leaf).items():
    np.testing.assert_array_equal(rows['ffn_up'], full.blocks(routes.leaf)[table]['ffn_up'])
  with pytest.raises(BundleError, match='not in this partial bundle'):
    part.blocks(np.array([0]))
  with pytest.raises(BundleError, match='no leaf to route to'):
    part.router.route(TEXTS[:1], block=[(1, 1)])


def test_dropping_a_subtree_scores_its_texts_as_without_memory(bundles, tmp_path):
  edited = tmp_path / 'edited'
  shutil.copytree(bundles / 'f32', edited)
  source = open_source(bundle=str(edited))
  leaf_B = source.router.route(TEXTS).leaf
  node = int(leaf_B[0] // 4)
  before = source.blocks(leaf_B)
  assert main(['bank', 'drop', '--bundle', str(edited), '--node', f'1:{node}']) == 0
  after = open_source(bundle=str(edited))
  dropped = leaf_B // 4 == node
  tokens_BxT, segment_ids_BxT = _tokens()
  fetched = _logits(after.model, tokens_BxT, segment_ids_BxT, after.memory(leaf_B, 'fetched'))
  none = _logits(after.model, tokens_BxT, segment_ids_BxT, None)
  np.testing.assert_array_equal(fetched[dropped], none[dropped])
  assert np.abs(fetched[~dropped] - none[~dropped]).max() > 1e-4
  for table, rows in after.blocks(leaf_B).items():  # only the subtree's rows changed
    for name, a in rows.items():
      assert not a[dropped].any()
      np.testing.assert_array_equal(a[~dropped], before[table][name][~dropped])
  # Replacing the rows from the original bundle restores them.
  assert main(['bank', 'replace', '--bundle', str(edited), '--from', str(bundles / 'f32'), '--node', f'1:{node}']) == 0
  restored = open_source(bundle=str(edited))
  for table, rows in restored.blocks(leaf_B).items():
    for name, a in rows.items():
      np.testing.assert_array_equal(a, before[table][name])
  assert [e['op'] for e in restored.manifest['edits']] == ['drop', 'replace']
  assert sorted(os.listdir(edited / 'bank' / 'level1')) == ['ffn_down.v2', 'ffn_gate.v2', 'ffn_up.v2']


_KILL_AT_COMMIT = """
import os, signal, sys
real = os.replace
def replace(src, dst):
  if dst.endswith('manifest.json') and sys.argv[1] == 'before':
    os.kill(os.getpid(), signal.SIGKILL)
  real(src, dst)
  if dst.endswith('manifest.json'):
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from hmem.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize('when', ['before', 'after'])
def test_an_edit_killed_midway_leaves_a_readable_bundle(bundles, tmp_path, repo, when):
  edited = tmp_path / 'edited'
  shutil.copytree(bundles / 'f32', edited)
  leaf = np.arange(16)
  before = open_source(bundle=str(edited)).blocks(leaf)
  proc = subprocess.run([sys.executable, '-c', _KILL_AT_COMMIT, when, 'bank', 'drop', '--bundle', str(edited),
                         '--node', '1:2'], env={**os.environ, 'PYTHONPATH': str(repo)}, capture_output=True)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  after = open_source(bundle=str(edited)).blocks(leaf)  # checksums verified on open
  in_subtree = leaf // 4 == 2
  for table, rows in after.items():
    for name, a in rows.items():
      if when == 'before':  # killed just before the commit: the old bank, whole
        np.testing.assert_array_equal(a, before[table][name])
      else:  # just after: the new one
        assert not a[in_subtree].any()
        np.testing.assert_array_equal(a[~in_subtree], before[table][name][~in_subtree])
  assert main(['bank', 'drop', '--bundle', str(edited), '--node', '1:3']) == 0  # and it edits on
  assert len(os.listdir(edited / 'bank' / 'level1')) == 3  # leftovers cleaned


def _damaged(bundles, tmp_path, name='f32'):
  damaged = tmp_path / 'damaged'
  shutil.copytree(bundles / name, damaged)
  return damaged


def _rewrite_manifest(path, change):
  manifest = json.loads((path / 'manifest.json').read_text())
  change(manifest)
  (path / 'manifest.json').write_text(json.dumps(manifest))


def test_damaged_chunks_are_errors_naming_the_row(bundles, tmp_path):
  damaged = _damaged(bundles, tmp_path)
  path = json.loads((damaged / 'manifest.json').read_text())['bank']['level2/ffn_up']['path']
  chunk = damaged / path / 'c' / '5' / '0' / '0' / '0'
  chunk.write_bytes(chunk.read_bytes()[:-10])  # truncated
  source = open_source(bundle=str(damaged))
  source.blocks(np.array([6]))  # other rows still read
  with pytest.raises(BundleError, match='row 5 of bank array level2/ffn_up cannot be read.*(Not enough|end of input)'):
    source.blocks(np.array([5]))
  data = bytearray((damaged / path / 'c' / '6' / '0' / '0' / '0').read_bytes())
  data[0] ^= 1  # a flipped bit
  (damaged / path / 'c' / '6' / '0' / '0' / '0').write_bytes(bytes(data))
  with pytest.raises(BundleError, match='row 6 of bank array level2/ffn_up cannot be read.*[Dd]igest'):
    open_source(bundle=str(damaged)).blocks(np.array([6]))
  (damaged / path / 'c' / '7' / '0' / '0' / '0').unlink()  # missing: never read as zeros
  with pytest.raises(BundleError, match='row 7 of bank array level2/ffn_up cannot be read'):
    open_source(bundle=str(damaged)).blocks(np.array([7]))


def test_bad_bundles_are_refused_on_open(bundles, tmp_path):
  damaged = _damaged(bundles, tmp_path)
  tree = bytearray((damaged / 'tree.npz').read_bytes())
  tree[-100] ^= 1
  (damaged / 'tree.npz').write_bytes(bytes(tree))
  with pytest.raises(BundleError, match='tree.npz fails its sha256 checksum'):
    open_source(bundle=str(damaged))
  shutil.copyfile(bundles / 'f32' / 'tree.npz', damaged / 'tree.npz')
  _rewrite_manifest(damaged, lambda m: m.update(version=2))
  with pytest.raises(BundleError, match='bundle format version 2, but this hmem reads version 1'):
    open_source(bundle=str(damaged))
  _rewrite_manifest(damaged, lambda m: m.update(version=1))
  open_source(bundle=str(damaged))  # whole again
  # A tokenizer that is not the run's, even with the checksum list made to match it.
  Tokenizer.train(list(TEXTS), 300).save(str(damaged / 'tokenizer.json'))
  digest = hashlib.sha256((damaged / 'tokenizer.json').read_bytes()).hexdigest()
  _rewrite_manifest(damaged, lambda m: m['files'].update({'tokenizer.json': digest}))
  with pytest.raises(BundleError, match='tokenizer.json is not the tokenizer the run was trained with'):
    open_source(bundle=str(damaged))
  with pytest.raises(BundleError, match='already exists'):
    export('unused', str(damaged))
  with pytest.raises(BundleError, match='not a bundle'):
    open_source(bundle=str(tmp_path))


def test_unknown_nodes_are_errors(bundles, capsys):
  router = open_source(bundle=str(bundles / 'f32')).router
  with pytest.raises(BundleError, match='node 1:4 does not exist: level 1 has nodes 0..3'):
    router.route(TEXTS, block=[(1, 4)])
  with pytest.raises(BundleError, match='level 3 is not in 1..2'):
    parse_node('3:0', 4, 2)
  with pytest.raises(BundleError, match='not LEVEL:ID'):
    parse_node('1-2', 4, 2)
  assert main(['bank', 'drop', '--bundle', str(bundles / 'f32'), '--node', '2:16']) == 2
  assert 'hmem: error: node 2:16 does not exist: level 2 has nodes 0..15' in capsys.readouterr().err


def test_a_dataset_whose_tokenizer_was_replaced_is_refused(memory_run, tmp_path):
  _, data, _, _ = memory_run
  copy = tmp_path / 'data'
  shutil.copytree(data, copy, ignore=shutil.ignore_patterns('*.array_record', 'embed_cache'))
  Tokenizer.train(list(TEXTS), 300).save(str(copy / 'tokenizer.json'))
  with pytest.raises(BundleError, match='tokenizer.json is not the tokenizer the run was trained with'):
    Router.load(str(copy))


def test_the_reader_reads_any_tensorstore_url(bundles):
  source = open_source(bundle=str(bundles / 'f32'))
  meta = source.manifest['bank']
  arrays = {'level2': {'ffn_up': meta['level2/ffn_up']['path']}}
  reader = Reader(f'file://{bundles / "f32"}', arrays, {'level2': np.ones(16, bool)})
  rows = reader.read({'level2': np.array([3, 9, 3])})['level2']['ffn_up']
  np.testing.assert_array_equal(rows, source.blocks(np.array([3, 9, 3]))['level2']['ffn_up'])
  assert reader.reads == {('level2', 3): 1, ('level2', 9): 1}


# --- bundles on an object store (a fake gs://, tests/object_store.py) ----------------------

def _object_files(root):
  """{relative path: bytes} of every object under a directory of the fake store."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_a_bundle_exported_to_an_object_store_is_the_local_one(memory_run, bundles, gcs):
  _, _, _, workdir = memory_run
  assert main(['export', '--workdir', str(workdir), '--out', 'gs://bucket/b', '--dtype', 'float32',
               '--no-progress']) == 0
  written, local = _object_files(gcs / 'bucket' / 'b'), _object_files(bundles / 'f32')
  assert written.keys() == local.keys() and 'anchor.safetensors' in written
  for name in local:  # anchor, router files, every bank chunk, the manifest: byte for byte
    assert written[name] == local[name], name
  remote, source = open_source(bundle='gs://bucket/b'), open_source(bundle=str(bundles / 'f32'))
  np.testing.assert_array_equal(remote.router.route(TEXTS).leaf, source.router.route(TEXTS).leaf)
  leaf_B = source.router.route(TEXTS).leaf
  tokens_BxT, segment_ids_BxT = _tokens()
  for mode in ('fetched', 'generic'):
    np.testing.assert_array_equal(_logits(remote.model, tokens_BxT, segment_ids_BxT, remote.memory(leaf_B, mode)),
                                  _logits(source.model, tokens_BxT, segment_ids_BxT, source.memory(leaf_B, mode)))
  assert set(remote.rows.reads) == set(source.rows.reads)  # rows read from the store as paths need them
  with pytest.raises(BundleError, match='already exists'):
    export(str(workdir), 'gs://bucket/b')


def test_an_export_cut_short_on_an_object_store_is_no_bundle(memory_run, bundles, gcs, monkeypatch, capsys):
  from hmem.bundle import export as bundle_module
  _, _, _, workdir = memory_run
  real = bundle_module.write_json

  def killed(path, obj):  # the manifest is written last: every other file is there already
    assert str(path) == 'gs://bucket/b/manifest.json'
    assert set(_object_files(gcs / 'bucket' / 'b')) == set(_object_files(bundles / 'f32')) - {'manifest.json'}
    raise OSError('connection lost')

  monkeypatch.setattr(bundle_module, 'write_json', killed)
  with pytest.raises(OSError, match='connection lost'):
    export(str(workdir), 'gs://bucket/b', dtype='float32', progress=False)
  assert not (gcs / 'bucket' / 'b').exists()  # what it wrote is removed
  monkeypatch.setattr(bundle_module, 'write_json', real)
  # A process killed there leaves the files without their manifest: refused, however whole.
  shutil.copytree(bundles / 'f32', gcs / 'bucket' / 'b', ignore=shutil.ignore_patterns('manifest.json'))
  refused = "manifest.json not found: 'gs://bucket/b' is not a bundle written by `hmem export` .*export it again"
  with pytest.raises(BundleError, match=refused):
    open_source(bundle='gs://bucket/b')
  assert main(['bank', 'drop', '--bundle', 'gs://bucket/b', '--node', '1:0']) == 2
  assert re.search('hmem: error: gs://bucket/b/' + refused, capsys.readouterr().err)


def test_bank_edits_on_an_object_store(bundles, gcs):
  shutil.copytree(bundles / 'f32', gcs / 'bucket' / 'b')
  source = open_source(bundle='gs://bucket/b')
  leaf_B = source.router.route(TEXTS).leaf
  node = int(leaf_B[0] // 4)
  before = source.blocks(leaf_B)
  assert main(['bank', 'drop', '--bundle', 'gs://bucket/b', '--node', f'1:{node}']) == 0
  after = open_source(bundle='gs://bucket/b')  # every file's checksum verified against the new manifest
  dropped = leaf_B // 4 == node
  for table, rows in after.blocks(leaf_B).items():
    for name, a in rows.items():
      assert not a[dropped].any()
      np.testing.assert_array_equal(a[~dropped], before[table][name][~dropped])
  level1 = gcs / 'bucket' / 'b' / 'bank' / 'level1'
  assert sorted(p.name for p in level1.iterdir()) == ['ffn_down.v1', 'ffn_gate.v1', 'ffn_up.v1']  # old removed
  assert after.manifest['bank']['level1/ffn_up']['path'] == 'bank/level1/ffn_up.v1'
  # The unchanged rows were copied, the dropped ones written anew (zeros, still stored).
  assert len(list((level1 / 'ffn_up.v1' / 'c').iterdir())) == 4
  assert main(['bank', 'replace', '--bundle', 'gs://bucket/b', '--from', str(bundles / 'f32'),
               '--node', f'1:{node}']) == 0
  restored = open_source(bundle='gs://bucket/b')
  for table, rows in restored.blocks(leaf_B).items():
    for name, a in rows.items():
      np.testing.assert_array_equal(a, before[table][name])
  assert [e['op'] for e in restored.manifest['edits']] == ['drop', 'replace']



def test_bank_arrays_on_an_object_store_use_tensorstore_drivers():
  from hmem.bundle.reader import kvstore
  for root, driver in (('gs://my-bucket/b', 'gcs'), ('gcs://my-bucket/b/', 'gcs'), ('s3://my-bucket/b', 's3')):
    spec = ts.KvStore.Spec(kvstore(root, 'bank/level1/ffn_up.v0')).to_json()
    assert spec == {'driver': driver, 'bucket': 'my-bucket', 'path': 'b/bank/level1/ffn_up.v0/'}, root
  with pytest.raises(BundleError, match='az://c/b: tensorstore cannot read or write there.*gs:// or s3://'):
    kvstore('az://c/b', 'bank/level1/ffn_up.v0')


def test_a_run_trained_on_an_object_store_exports_the_same_bundle(memory_run, bundles, gcs):
  """The whole path on gs://: train there (the dataset stays POSIX), export from there to
  there; the bundle is byte-equal to the one exported from the same run trained locally."""
  cfg, _, _, _ = memory_run
  train(cfg, 'gs://bucket/run', progress=False)
  assert main(['export', '--workdir', 'gs://bucket/run', '--out', 'gs://bucket/b', '--dtype', 'float32',
               '--no-progress']) == 0
  written, local = _object_files(gcs / 'bucket' / 'b'), _object_files(bundles / 'f32')
  assert written.keys() == local.keys()
  for name in local:
    assert written[name] == local[name], name
  remote = open_source(workdir='gs://bucket/run')
  leaf_B = remote.router.route(TEXTS).leaf
  np.testing.assert_array_equal(leaf_B, open_source(bundle='gs://bucket/b').router.route(TEXTS).leaf)


def test_concurrent_edits_wait_for_each_other_and_both_land(bundles, tmp_path, repo, monkeypatch):
  """Edit A (here, in a thread) is held just before its commit while edit B (another
  process) starts. Without a lock B removed A's new version as abandoned and both wrote
  version 1: one edit was lost."""
  from hmem.bundle import format as bundle_module
  edited = tmp_path / 'edited'
  shutil.copytree(bundles / 'f32', edited)
  paused, go = threading.Event(), threading.Event()
  write_json = bundle_module.write_json

  def held_commit(path, obj):
    if str(path).endswith('manifest.json'):
      paused.set()
      go.wait(timeout=300)
    write_json(path, obj)

  monkeypatch.setattr(bundle_module, 'write_json', held_commit)
  a = concurrent.futures.ThreadPoolExecutor(1).submit(main, ['bank', 'drop', '--bundle', str(edited), '--node', '1:1'])
  try:
    assert paused.wait(timeout=300), a.result()
    b = subprocess.Popen([sys.executable, '-m', 'hmem.cli', 'bank', 'drop', '--bundle', str(edited), '--node', '1:2'],
                         env={**os.environ, 'PYTHONPATH': str(repo)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    first = b.stderr.readline()  # B says it waits (unlocked, it finished and closed stderr)
    assert 'waiting for another edit' in first, first + b.stderr.read()
    assert b.poll() is None
  finally:
    go.set()
  assert a.result(timeout=120) == 0
  assert b.wait(timeout=120) == 0, b.stderr.read()[-2000:]
  after = open_source(bundle=str(edited))  # every checksum verified against the last manifest
  assert [e['nodes'] for e in after.manifest['edits']] == [['1:1'], ['1:2']]
  leaf = np.arange(16)
  before, blocks = open_source(bundle=str(bundles / 'f32')).blocks(leaf), after.blocks(leaf)
  dropped = np.isin(leaf // 4, [1, 2])
  for table, rows in blocks.items():
    for name, x in rows.items():
      assert not x[dropped].any()
      np.testing.assert_array_equal(x[~dropped], before[table][name][~dropped])
  assert sorted(os.listdir(edited / 'bank' / 'level1')) == ['ffn_down.v2', 'ffn_gate.v2', 'ffn_up.v2']
