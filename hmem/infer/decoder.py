"""Batched generation from the anchor, widened by a per-prompt memory block.

Prompts of different lengths are left-padded to one length (padding is segment 0, so no
token attends to it and RoPE positions start at 0 at each prompt's first token); one
jitted prefill fills the KV cache, then one jitted step per token samples the next token
of every row and feeds it back. A row stops at EOT; the loop stops when every row has, or
after `max_new_tokens`. The memory block stays fixed for the whole generation (it is
routed by the prompt). Prompt and cache lengths are rounded up to a few buckets, so new
prompts rarely compile anew. `complete_all` routes and decodes many text prompts, batched
by leaf (`hmem generate` and the lm-evaluation-harness model use it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from hmem.errors import UserError

_BUCKET = 32  # prompt and cache lengths are multiples of this


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Greedy when temperature == 0; else a draw at `temperature` from the smallest set of
  most likely tokens whose probability reaches `top_p` (nucleus sampling)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_p < 1:
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is kept when the tokens more likely than it hold less than top_p.
    kept_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
    cutoff_B = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1)
    logits_BxV = jnp.where(logits_BxV >= cutoff_B[:, None], logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames='graphdef', donate_argnames='cache')
def _prefill(graphdef, params, tokens_BxT, segment_ids_BxT, memory, cache):
  logits_BxTxV, cache = nnx.merge(graphdef, params)(tokens_BxT, segment_ids_BxT, memory, cache)
  return logits_BxTxV[:, -1], cache


@functools.partial(jax.jit, static_argnames=('graphdef', 'temperature', 'top_p', 'eot_id'), donate_argnames='cache')
def _step(graphdef, params, logits_BxV, memory, cache, done_B, key, *, temperature, top_p, eot_id):
  """Samples each row's next token from `logits` and runs it through the model."""
  token_B = jnp.where(done_B, eot_id, sample(logits_BxV, key, temperature, top_p))
  done_B = done_B | (token_B == eot_id)
  logits_Bx1xV, cache = nnx.merge(graphdef, params)(token_B[:, None], jnp.ones_like(token_B)[:, None], memory, cache)
  return token_B, done_B, logits_Bx1xV[:, 0], cache


def generate(model, prompts: Sequence[Sequence[int]], memory: dict | None = None, *, eot_id: int,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             progress: bool = False) -> list[np.ndarray]:
  """Continues every prompt (token ids); returns each row's new tokens, EOT excluded.

  `memory`: the model's memory argument for the B prompts (None: the dense anchor).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError('every prompt needs at least one token; got an empty prompt')
  if temperature < 0 or not 0 < top_p <= 1:
    raise UserError(f'temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1')
  B, P = len(prompts), _round_up(max(map(len, prompts)), _BUCKET)
  tokens_BxP = np.full((B, P), eot_id, np.int32)
  segment_ids_BxP = np.zeros((B, P), np.int32)
  for b, prompt in enumerate(prompts):
    tokens_BxP[b, P - len(prompt):] = prompt
    segment_ids_BxP[b, P - len(prompt):] = 1

  graphdef, params = nnx.split(model)
  cache = model.init_cache(B, P + _round_up(max_new_tokens, _BUCKET))
  logits_BxV, cache = _prefill(graphdef, params, tokens_BxP, segment_ids_BxP, memory, cache)
  done_B = jnp.zeros((B,), bool)
  key = jax.random.key(seed)
  out = []
  for i in tqdm(range(max_new_tokens), desc='generate', unit='tok', leave=False, disable=not progress):
    token_B, done_B, logits_BxV, cache = _step(graphdef, params, logits_BxV, memory, cache, done_B,
                                               jax.random.fold_in(key, i), temperature=float(temperature),
                                               top_p=float(top_p), eot_id=int(eot_id))
    out.append(token_B)
    if bool(jnp.all(done_B)):
      break
  tokens_BxN = np.asarray(jnp.stack(out, axis=1)) if out else np.zeros((B, 0), np.int32)
  return [row[:np.argmax(row == eot_id)] if (row == eot_id).any() else row for row in tokens_BxN]


def complete(source, prompt: str, *, mode: str = 'fetched', block=(), block_best: bool = False,
             **sampling) -> tuple[np.ndarray | None, str]:
  """Routes `prompt` (around `block`ed nodes), fetches its memory in `mode` and continues
  it; returns (the routed path [depth] or None when nothing was routed, the new text)."""
  paths, texts = complete_all(source, [prompt], mode=mode, block=block, block_best=block_best, **sampling)
  return None if paths is None else paths[0], texts[0]


def complete_all(source, prompts: Sequence[str], *, mode: str = 'fetched', block=(), block_best: bool = False,
                 batch_size: int = 16, context: int | None = None, progress: bool = False,
                 **sampling) -> tuple[np.ndarray | None, list[str]]:
  """`complete` for many prompts, decoded `batch_size` at a time in batches sorted by leaf
  (a batch shares its path rows); returns (the routed paths [N, depth] or None, the new
  texts in prompt order). A prompt longer than `context` (default: the model's seq_len)
  minus the new tokens keeps its last tokens. A run without memory decodes with the anchor
  alone, untouched by `mode`."""
  tokenizer = source.tokenizer
  if tokenizer is None:
    raise UserError('this run trained on synthetic tokens: it has no tokenizer for a text prompt; generate from '
                    'a run trained on a prepared dataset (data.source=prepared) or one made by hmem import')
  if (block or block_best) and mode != 'fetched':
    raise UserError(f'--block / --block-best route around nodes, so they need --memory fetched (got {mode})')
  new, context = sampling.get('max_new_tokens', 64), context or source.config.data.seq_len
  keep = context - new
  if keep < 1:
    raise UserError(f'max_new_tokens={new} leaves no room for the prompt in the {context}-token context; '
                    'ask for fewer tokens')
  paths, leaf_N = None, np.zeros(len(prompts), np.int64)
  if mode == 'fetched' and source.has_memory:
    if source.router is None:
      raise UserError('this run trained its memory on synthetic data: it has no tree to route a text prompt; '
                      'use --memory generic or none, or a run trained on a prepared dataset')
    routes = source.router.route(prompts, block, block_best)
    paths, leaf_N = routes.path, routes.leaf
  ids = [p[-keep:] for p in tokenizer.encode(prompts)]
  order = np.argsort(leaf_N, kind='stable')
  B = min(batch_size, len(prompts))
  texts = [''] * len(prompts)
  for lo in tqdm(range(0, len(prompts), B), desc='generate', unit='batch', disable=not progress or B == len(prompts)):
    batch = np.resize(order[lo:lo + B], B)  # the last batch repeats rows: one shape, one compile
    out = generate(source.model, [ids[i] for i in batch], source.memory(leaf_N[batch], mode),
                   eot_id=tokenizer.eot_id, progress=progress and B == len(prompts), **sampling)
    for i, row in zip(order[lo:lo + B], out):
      texts[i] = tokenizer.decode(row)
  return paths, texts
