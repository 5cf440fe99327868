"""The Llama family (Llama, Mistral, Qwen2) in Hugging Face terms, mapped onto the anchor.

Every format is read into the same two things: a Hugging Face `config.json` dict and a
lookup of tensors by their Hugging Face names ([out, in] weights). This module turns
them into `cfg.model` keys and the anchor's parameter tree (and back, for export), and is
the one place that decides what the anchor can represent: anything it cannot (sliding
windows, other activations, rope scalings it does not implement, o/FFN biases) stops here
with a message naming the field, never a silently different model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from hmem.config import default_config
from hmem.errors import WeightsError

# HF architecture name -> whether q/k/v carry biases.
ARCHITECTURES = {'LlamaForCausalLM': False, 'MistralForCausalLM': False, 'Qwen2ForCausalLM': True}
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


def _field(hf: dict, name: str, where: str):
  if name not in hf or hf[name] is None:
    raise WeightsError(f'{where}: the config has no {name!r}, which a Llama-family model needs')
  return hf[name]


def model_config(hf: dict, where: str) -> dict:
  """`cfg.model` keys for a Hugging Face config dict; `where` names its source in messages."""
  archs = hf.get('architectures') or []
  arch = archs[0] if len(archs) == 1 else None
  if arch not in ARCHITECTURES:
    raise WeightsError(f'{where}: architectures={archs!r} is not supported; hmem imports '
                       f'{", ".join(sorted(ARCHITECTURES))}')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise WeightsError(f"{where}: hidden_act={hf['hidden_act']!r}; the anchor's FFN is SwiGLU (silu)")
  for flag in ('attention_bias', 'mlp_bias'):
    if hf.get(flag):
      raise WeightsError(f'{where}: {flag}=true (biases on the output / FFN projections) is not supported; '
                         'the anchor has biases only on q, k and v (model.qkv_bias)')
  if hf.get('quantization_config'):
    raise WeightsError(f"{where}: quantization_config={hf['quantization_config'].get('quant_method', '?')!r}: "
                       'pre-quantized Hugging Face checkpoints are not supported; use the unquantized '
                       'weights or a GGUF file')
  sliding = hf.get('use_sliding_window', arch == 'MistralForCausalLM') and hf.get('sliding_window')
  if sliding:
    raise WeightsError(f'{where}: sliding_window={hf["sliding_window"]} (sliding-window attention) is not '
                       'implemented; the anchor attends over the whole context')
  layer_types = set(hf.get('layer_types') or ()) - {'full_attention'}
  if layer_types:
    raise WeightsError(f'{where}: layer_types holds {sorted(layer_types)}; only full_attention layers are implemented')
  heads = int(_field(hf, 'num_attention_heads', where))
  d_model = int(_field(hf, 'hidden_size', where))
  rope = hf.get('rope_parameters') or {}  # transformers >= 5 keeps rope_theta and the scaling here
  return dict(
      vocab_size=int(_field(hf, 'vocab_size', where)),
      d_model=d_model,
      layers=int(_field(hf, 'num_hidden_layers', where)),
      heads=heads,
      kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=int(hf.get('head_dim') or d_model // heads),
      ffn=int(_field(hf, 'intermediate_size', where)),
      norm='rmsnorm',
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      qk_norm=False,
      qkv_bias=ARCHITECTURES[arch],
      rope_base=float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0))),
      rope_scaling=_rope_scaling(hf.get('rope_scaling') or rope, where),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
  )


def _rope_scaling(s: dict, where: str) -> dict:
  """`model.rope_scaling` (every key: the defaults where the type needs none)."""
  kind = s.get('rope_type', s.get('type', 'default'))
  out = dict(default_config().model.rope_scaling)
  if kind == 'default':
    return out
  if kind == 'linear':
    return {**out, 'type': 'linear', 'factor': float(s['factor'])}
  if kind == 'llama3':
    return dict(type='llama3', factor=float(s['factor']), low_freq_factor=float(s['low_freq_factor']),
                high_freq_factor=float(s['high_freq_factor']),
                original_max_positions=int(s['original_max_position_embeddings']))
  raise WeightsError(f"{where}: rope_scaling.rope_type={kind!r} is not implemented; hmem implements "
                     "'default', 'linear' and 'llama3' (model.rope_scaling)")


def hf_config(model: dict) -> dict:
  """The Hugging Face config dict of an anchor (`cfg.model`), for export; the inverse of
  `model_config` on what the anchor can represent."""
  if model['norm'] != 'rmsnorm' or model['qk_norm']:
    raise WeightsError(f"model.norm={model['norm']!r}, model.qk_norm={model['qk_norm']}: a Hugging Face Llama "
                       "needs norm='rmsnorm' and qk_norm=False; only such anchors (e.g. imported ones) export")
  scaling = dict(model['rope_scaling'])
  rope = {'none': None,
          'linear': {'rope_type': 'linear', 'factor': scaling['factor']},
          'llama3': {'rope_type': 'llama3', 'factor': scaling['factor'], 'low_freq_factor': scaling['low_freq_factor'],
                     'high_freq_factor': scaling['high_freq_factor'],
                     'original_max_position_embeddings': int(scaling['original_max_positions'])}}[scaling['type']]
  return {
      'architectures': ['Qwen2ForCausalLM' if model['qkv_bias'] else 'LlamaForCausalLM'],
      'model_type': 'qwen2' if model['qkv_bias'] else 'llama',
      'vocab_size': model['vocab_size'], 'hidden_size': model['d_model'], 'num_hidden_layers': model['layers'],
      'num_attention_heads': model['heads'], 'num_key_value_heads': model['kv_heads'], 'head_dim': model['head_dim'],
      'intermediate_size': model['ffn'], 'hidden_act': 'silu', 'rms_norm_eps': model['norm_eps'],
      'rope_theta': model['rope_base'], 'rope_scaling': rope, 'tie_word_embeddings': model['tie_embeddings'],
      'attention_bias': False,
  }


def _layer_tensors(model: dict) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """HF name (with {i} for the layer) -> (anchor parameter path, HF shape, transposed)."""
  d, f, N, K, H = model['d_model'], model['ffn'], model['heads'], model['kv_heads'], model['head_dim']
  attn, mlp = 'model.layers.{i}.self_attn', 'model.layers.{i}.mlp'
  out = {
      'model.layers.{i}.input_layernorm.weight': (('blocks', 'attn_norm', 'scale'), (d,), False),
      'model.layers.{i}.post_attention_layernorm.weight': (('blocks', 'ffn_norm', 'scale'), (d,), False),
      f'{attn}.q_proj.weight': (('blocks', 'attn', 'q', 'kernel'), (N * H, d), True),
      f'{attn}.k_proj.weight': (('blocks', 'attn', 'k', 'kernel'), (K * H, d), True),
      f'{attn}.v_proj.weight': (('blocks', 'attn', 'v', 'kernel'), (K * H, d), True),
      f'{attn}.o_proj.weight': (('blocks', 'attn', 'o', 'kernel'), (d, N * H), True),
      f'{mlp}.gate_proj.weight': (('blocks', 'ffn', 'gate', 'kernel'), (f, d), True),
      f'{mlp}.up_proj.weight': (('blocks', 'ffn', 'up', 'kernel'), (f, d), True),
      f'{mlp}.down_proj.weight': (('blocks', 'ffn', 'down', 'kernel'), (d, f), True),
  }
  if model['qkv_bias']:
    for name, width in (('q', N * H), ('k', K * H), ('v', K * H)):
      out[f'{attn}.{name}_proj.bias'] = (('blocks', 'attn', name, 'bias'), (width,), False)
  return out


def _global_tensors(model: dict) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  d, V = model['d_model'], model['vocab_size']
  out = {'model.embed_tokens.weight': (('embed', 'embedding'), (V, d), False),
         'model.norm.weight': (('final_norm', 'scale'), (d,), False)}
  if not model['tie_embeddings']:
    out['lm_head.weight'] = (('lm_head', 'kernel'), (V, d), True)
  return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def first_layers(model: dict, names: set[str], layers: int | None, where: str) -> tuple[dict, set[str]]:
  """The model and tensor names cut to the first `layers` layers (None: all), for tests and
  quick looks at a big checkpoint; the final norm and the head are kept."""
  if layers is None:
    return model, names
  if not 0 < layers <= model['layers']:
    raise WeightsError(f"{where}: cannot import the first {layers} layers of a {model['layers']}-layer model")
  kept = {n for n in names if not (n.startswith('model.layers.') and int(n.split('.')[2]) >= layers)}
  return {**model, 'layers': layers}, kept


def to_params(model: dict, names: set[str], read: Callable[[str], np.ndarray], dtype, where: str,
              progress: bool = True) -> dict:
  """The anchor's parameter tree (numpy arrays of `dtype`) from HF-named tensors.

  `names` are the tensors the checkpoint holds, `read(name)` loads one (as a float array in
  the HF [out, in] layout); tensors are read one at a time, so memory peaks at the output.
  """
  L = model['layers']
  expected = {name: spec for name, spec in _global_tensors(model).items()}
  for i in range(L):
    expected.update({name.format(i=i): spec for name, spec in _layer_tensors(model).items()})
  missing = sorted(set(expected) - names)
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise WeightsError(f'{where}: tensor {missing[0]!r}{more} is missing; the config asks for it '
                       '(is the file complete, and does config.json belong to these weights?)')
  tied_head = model['tie_embeddings'] and 'lm_head.weight' in names
  unknown = sorted(n for n in names - set(expected) if not n.endswith(_IGNORED_SUFFIXES)
                   and not (tied_head and n == 'lm_head.weight'))
  if unknown:
    raise WeightsError(f'{where}: tensor {unknown[0]!r} ({len(unknown)} unexpected in all) has no place in a '
                       f'{L}-layer Llama-family anchor; is this a different architecture?')

  params: dict = {}
  for name in tqdm(sorted(expected), disable=not progress, desc='import', unit='tensor'):
    path, shape, transposed = expected[name]
    x = np.asarray(read(name))
    if x.shape != shape:
      raise WeightsError(f'{where}: tensor {name!r} has shape {list(x.shape)} but the config implies {list(shape)}')
    x = (x.T if transposed else x).astype(dtype)
    if path[0] == 'blocks':
      i = int(name.split('.')[2])
      try:
        stacked = _get(params, path)
      except KeyError:
        stacked = np.empty((L, *x.shape), dtype)
        _set(params, path, stacked)
      stacked[i] = x
    else:
      _set(params, path, x)
  if tied_head and not np.array_equal(np.asarray(read('lm_head.weight')).astype(dtype), params['embed']['embedding']):
    raise WeightsError(f'{where}: tie_word_embeddings is true but tensor lm_head.weight differs from '
                       'model.embed_tokens.weight; set tie_word_embeddings=false in config.json')
  return params


def from_params(model: dict, params: dict) -> dict[str, np.ndarray]:
  """HF-named tensors of an anchor's parameter tree: the inverse of `to_params`."""
  out = {}
  for name, (path, _, transposed) in _global_tensors(model).items():
    x = np.asarray(_get(params, path))
    out[name] = x.T if transposed else x
  for template, (path, _, transposed) in _layer_tensors(model).items():
    stacked = np.asarray(_get(params, path))
    for i in range(model['layers']):
      out[template.format(i=i)] = stacked[i].T if transposed else stacked[i]
  return {name: np.ascontiguousarray(x) for name, x in out.items()}
