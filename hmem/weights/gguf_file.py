"""GGUF files (llama.cpp): metadata -> a Hugging Face config dict, tensors -> HF names
(dequantized by the `gguf` package), the embedded tokenizer -> a `tokenizers` tokenizer.

llama.cpp's converter permutes the q and k rows of 'llama' models so that RoPE rotates
adjacent pairs (2i, 2i+1); the anchor rotates (i, i + H/2) like Hugging Face, so those rows
are permuted back here. 'qwen2' files keep the Hugging Face order.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from hmem.errors import WeightsError
from hmem.weights import llama

# GGUF architecture -> (HF architecture, q/k rows permuted for adjacent-pair RoPE).
ARCHITECTURES = {'llama': ('LlamaForCausalLM', True), 'qwen2': ('Qwen2ForCausalLM', False)}
Q = gguf.GGMLQuantizationType
DEQUANTIZED = frozenset((Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                         Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K))

_GLOBAL_NAMES = {'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
                 'output.weight': 'lm_head.weight'}
_LAYER_NAMES = {
    'attn_norm.weight': 'input_layernorm.weight', 'ffn_norm.weight': 'post_attention_layernorm.weight',
    'attn_q.weight': 'self_attn.q_proj.weight', 'attn_k.weight': 'self_attn.k_proj.weight',
    'attn_v.weight': 'self_attn.v_proj.weight', 'attn_output.weight': 'self_attn.o_proj.weight',
    'attn_q.bias': 'self_attn.q_proj.bias', 'attn_k.bias': 'self_attn.k_proj.bias',
    'attn_v.bias': 'self_attn.v_proj.bias',
    'ffn_gate.weight': 'mlp.gate_proj.weight', 'ffn_up.weight': 'mlp.up_proj.weight',
    'ffn_down.weight': 'mlp.down_proj.weight',
}
# `tokenizer.ggml.pre` -> the pre-tokenizer of the original tokenizer.json.
_PRE_TOKENIZERS = {
    'gpt2': lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    'smollm': lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
}


def is_gguf(path: str) -> bool:
  if not os.path.isfile(path):
    return False
  with open(path, 'rb') as f:
    return f.read(4) == b'GGUF'


def _hf_name(name: str) -> str:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  parts = name.split('.', 2)
  if len(parts) == 3 and parts[0] == 'blk' and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f'model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}'
  return name  # unknown: llama.to_params names it


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation: rows (head, i, pair) -> (head, pair, i)."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:

  def __init__(self, path: str):
    self.path = path
    try:
      self.reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
      raise WeightsError(f'{path} is not a readable GGUF file ({e})') from None
    self.tensors = {t.name: t for t in self.reader.tensors}
    self.hf_names = {_hf_name(name): name for name in self.tensors}

  def field(self, key: str, default=None):
    f = self.reader.fields.get(key)
    return default if f is None else f.contents()

  def hf_config(self) -> tuple[dict, bool]:
    """(Hugging Face config dict, whether q/k rows are permuted)."""
    arch = self.field('general.architecture')
    if arch not in ARCHITECTURES:
      raise WeightsError(f'{self.path}: general.architecture={arch!r} is not supported; hmem imports GGUF '
                         f'architectures {sorted(ARCHITECTURES)}')
    hf_arch, permuted = ARCHITECTURES[arch]
    key = lambda name: f'{arch}.{name}'
    if self.field(key('expert_count'), 0):
      raise WeightsError(f"{self.path}: {key('expert_count')}={self.field(key('expert_count'))}: mixture-of-experts "
                         'models are not supported')
    if self.field(key('attention.sliding_window')):
      raise WeightsError(f"{self.path}: {key('attention.sliding_window')}={self.field(key('attention.sliding_window'))}"
                         ': sliding-window attention is not implemented')
    if 'rope_freqs.weight' in self.tensors:
      raise WeightsError(f'{self.path}: tensor rope_freqs.weight (per-frequency RoPE factors, e.g. Llama 3.1 '
                         'scaling) is not supported from GGUF; import the Hugging Face checkpoint instead')
    scaling = self.field(key('rope.scaling.type'), 'none')
    if scaling not in ('none', 'linear'):
      raise WeightsError(f"{self.path}: {key('rope.scaling.type')}={scaling!r} is not implemented; "
                         "hmem implements 'none' and 'linear' from GGUF")
    heads = self.field(key('attention.head_count'))
    d_model = self.field(key('embedding_length'))
    head_dim = self.field(key('attention.key_length'), d_model // heads if heads else None)
    rope_dim = self.field(key('rope.dimension_count'), head_dim)
    if rope_dim != head_dim:
      raise WeightsError(f"{self.path}: {key('rope.dimension_count')}={rope_dim} differs from the head size "
                         f'{head_dim}: partial rotary embeddings are not implemented')
    tokens = self.field('tokenizer.ggml.tokens')
    hf = {
        'architectures': [hf_arch],
        'vocab_size': self.field(key('vocab_size'), len(tokens) if tokens else None),
        'hidden_size': d_model,
        'num_hidden_layers': self.field(key('block_count')),
        'num_attention_heads': heads,
        'num_key_value_heads': self.field(key('attention.head_count_kv'), heads),
        'head_dim': head_dim,
        'intermediate_size': self.field(key('feed_forward_length')),
        'rms_norm_eps': self.field(key('attention.layer_norm_rms_epsilon'), 1e-5),
        'rope_theta': self.field(key('rope.freq_base'), 10_000.0),
        'rope_scaling': ({'rope_type': 'linear', 'factor': self.field(key('rope.scaling.factor'))}
                         if scaling == 'linear' else None),
        'tie_word_embeddings': 'output.weight' not in self.tensors,
    }
    return hf, permuted

  def read(self, hf_name: str, model: dict, permuted: bool) -> np.ndarray:
    t = self.tensors[self.hf_names[hf_name]]
    if t.tensor_type not in DEQUANTIZED:
      raise WeightsError(f'{self.path}: tensor {t.name!r} is of type {t.tensor_type.name}, which hmem does not '
                         f'dequantize; supported: {", ".join(sorted(q.name for q in DEQUANTIZED))}')
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    if permuted and hf_name.endswith(('q_proj.weight', 'k_proj.weight', 'q_proj.bias', 'k_proj.bias')):
      heads = model['heads'] if 'q_proj' in hf_name else model['kv_heads']
      if x.shape[0] % (2 * heads):
        raise WeightsError(f'{self.path}: tensor {t.name!r} has {x.shape[0]} rows, not a multiple of 2 x {heads} '
                           'heads; the config does not match the weights')
      x = _unpermute(x, heads)
    return x

  def load(self, dtype, progress: bool = True, layers: int | None = None) -> tuple[dict, dict]:
    """(cfg.model keys, anchor parameters of `dtype`), of the first `layers` layers if given."""
    hf, permuted = self.hf_config()
    model, names = llama.first_layers(llama.model_config(hf, self.path), set(self.hf_names), layers, self.path)
    params = llama.to_params(model, names, lambda n: self.read(n, model, permuted), dtype, self.path, progress)
    return model, params

  def bos(self) -> tuple[bool, str | None]:
    """(whether the file states its BOS policy, the token put before every text or None):
    `tokenizer.ggml.add_bos_token`, and `bos_token_id` when it is true."""
    add = self.field('tokenizer.ggml.add_bos_token')
    if add is None or not add:
      return add is not None, None
    bos_id, tokens = self.field('tokenizer.ggml.bos_token_id'), self.field('tokenizer.ggml.tokens') or []
    if bos_id is None or not 0 <= bos_id < len(tokens):
      raise WeightsError(f'{self.path}: tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id='
                         f'{bos_id} names no token of the {len(tokens)}; the file is incomplete')
    return True, tokens[bos_id]

  def tokenizer(self) -> tokenizers.Tokenizer:
    """The embedded tokenizer (a byte-level BPE) as a `tokenizers` tokenizer."""
    kind = self.field('tokenizer.ggml.model')
    if kind != 'gpt2':
      raise WeightsError(f'{self.path}: tokenizer.ggml.model={kind!r}: only byte-level BPE (gpt2) tokenizers are '
                         'converted; pass the original tokenizer.json with --tokenizer')
    pre = self.field('tokenizer.ggml.pre', 'gpt2')
    if pre not in _PRE_TOKENIZERS:
      raise WeightsError(f'{self.path}: tokenizer.ggml.pre={pre!r} is not known to hmem (known: '
                         f'{sorted(_PRE_TOKENIZERS)}); pass the original tokenizer.json with --tokenizer')
    tokens = self.field('tokenizer.ggml.tokens')
    merges = [tuple(m.split(' ', 1)) for m in self.field('tokenizer.ggml.merges', [])]
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    types = self.field('tokenizer.ggml.token_type', [])
    special = [i for i, kind in enumerate(types) if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    return tok
