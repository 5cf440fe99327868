"""Batched generation from the anchor, widened by a per-prompt memory block.

Prompts of different lengths are left-padded to one length (padding is segment 0, so no
token attends to it and RoPE positions start at 0 at each prompt's first token); one
jitted prefill fills the KV cache, then one jitted step per token samples the next token
of every row and feeds it back. A row stops at EOT; the loop stops when every row has, or
after `max_new_tokens`. The memory block stays fixed for the whole generation (it is
routed by the prompt). Prompt and cache lengths are rounded up to a few buckets, so new
prompts rarely compile anew. `step` and `prefill_row` are also what the server's
continuous batching (hmem.infer.batcher) decodes with. `complete_all` routes and decodes
many text prompts, batched by leaf (`hmem generate` and the lm-evaluation-harness model).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from hmem.data.inputs import skip_reason
from hmem.errors import DataError, UserError
from hmem.infer.source import device_memory

BUCKET = 32  # prompt and cache lengths are multiples of this
MAX_TEMPERATURE = 2.0  # OpenAI's bound: hotter draws are noise
_REASONS = {'empty': 'it is empty or blank', 'invalid_unicode': 'it holds bytes that are not UTF-8 or a lone surrogate'}


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def sample(logits_BxV: jax.Array, key_B: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """Row b's next token: greedy when temperature_B[b] == 0; else a draw with key_B[b] at its
  temperature from the smallest set of most likely tokens whose probability reaches its
  top_p (nucleus sampling). Rows differ, so one batch serves requests with different settings."""
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def draw():
    hot_B = temperature_B > 0
    logits = logits_BxV / jnp.where(hot_B, temperature_B, 1.0)[:, None]
    sorted_BxV = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is kept when the tokens more likely than it hold less than top_p.
    kept_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p_B[:, None]) | (top_p_B[:, None] >= 1)
    cutoff_B = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1)
    logits = jnp.where(logits >= cutoff_B[:, None], logits, -jnp.inf)
    drawn_B = jax.vmap(jax.random.categorical)(key_B, logits).astype(jnp.int32)
    return jnp.where(hot_B, drawn_B, greedy_B)

  # All-greedy batches (the common case) skip the sort.
  return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda: greedy_B)


@flax.struct.dataclass
class Sampling:
  """Each row's sampling settings. Row b's t-th new token is drawn with the key
  fold_in(key(seed[b]), t): the draw depends on the seed and the token's position alone, not
  on the row or the other prompts, so a prompt draws the same tokens alone, in any batch,
  through `hmem generate`, the harness or the server. (Prompts given one seed share their
  random stream, as in vLLM; the server gives each prompt of an unseeded request its own.)"""

  seed: jax.Array         # [B] uint32
  temperature: jax.Array  # [B] float32
  top_p: jax.Array        # [B] float32

  @classmethod
  def rows(cls, seed, temperature, top_p) -> Sampling:
    return cls(np.asarray(seed, np.uint32), np.asarray(temperature, np.float32), np.asarray(top_p, np.float32))

  def keys(self, count_B: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(self.seed, count_B)


def check_sampling(temperature: float, top_p: float) -> None:
  if not 0 <= temperature <= MAX_TEMPERATURE or not 0 < top_p <= 1:
    raise UserError(f'temperature={temperature}, top_p={top_p}: need 0 <= temperature <= {MAX_TEMPERATURE} and '
                    '0 < top_p <= 1')


def logprobs(logits_BxV: jax.Array, token_B: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log-probability of token_B [B], the top_k token ids [B, top_k], their log-probabilities):
  the model's own distribution, before temperature and top_p."""
  logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  top_BxK, top_ids_BxK = jax.lax.top_k(logp_BxV, top_k)
  return jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0], top_ids_BxK, top_BxK


@functools.partial(jax.jit, static_argnames='graphdef', donate_argnames='cache')
def _prefill(graphdef, params, tokens_BxT, segment_ids_BxT, memory, cache):
  logits_BxTxV, cache = nnx.merge(graphdef, params)(tokens_BxT, segment_ids_BxT, memory, cache)
  return logits_BxTxV[:, -1], cache


@functools.partial(jax.jit, static_argnames=('graphdef', 'eot_id', 'top_k', 'rows'),
                   donate_argnames=('logits_BxV', 'cache'))
def step(graphdef, params, logits_BxV, memory, cache, done_R, sampling: Sampling, count_R, *, eot_id, top_k=0,
         rows=None):
  """One decode step of a batch: samples each row's next token from `logits` (rows already
  `done` get EOT) and runs it through the model. `count_R`: tokens each row has made so
  far. `rows`: step only the first `rows` rows of the buffers (the server sizes its step to
  the requests in flight), the others kept as they are; `done_R`, `sampling` and `count_R`
  cover those rows. Returns (token_R, done_R, next logits, cache, and with top_k > 0 the
  tokens' `logprobs`, else None). `hmem generate` and the server's continuous batching both
  decode with it."""
  B = logits_BxV.shape[0]
  R = B if rows is None else rows
  head = (lambda a: a) if R == B else (lambda a: a[:R])
  logits_RxV = head(logits_BxV)
  token_R = jnp.where(done_R, eot_id, sample(logits_RxV, sampling.keys(count_R), sampling.temperature,
                                             sampling.top_p))
  scores = logprobs(logits_RxV, token_R, top_k) if top_k else None
  done_R = done_R | (token_R == eot_id)
  model = nnx.merge(graphdef, params)
  logits_Rx1xV, part = model(token_R[:, None], jnp.ones_like(token_R)[:, None], jax.tree.map(head, memory),
                             cache if R == B else cache.head(R))
  if R == B:
    return token_R, done_R, logits_Rx1xV[:, 0], part, scores
  logits_BxV = jax.lax.dynamic_update_slice_in_dim(logits_BxV, logits_Rx1xV[:, 0], 0, 0)
  return token_R, done_R, logits_BxV, cache.put_row(0, part), scores


@functools.partial(jax.jit, static_argnames=('graphdef', 'top_k'), donate_argnames=('cache', 'memory', 'logits_BxV'))
def prefill_row(graphdef, params, tokens_1xP, segment_ids_1xP, row_memory, cache, memory, logits_BxV, b, *,
                top_k=0):
  """Starts a new sequence in row `b` of a running batch: prefills its (left-padded) prompt
  in that row alone, and sets the row's memory and next-token logits. The other rows are
  untouched, so they go on decoding at the next step. `row_memory`: [1, ...] as stored
  (`hmem.infer.source.device_memory` turns it into the compute dtype here, on the device),
  or None for no memory (the row's memory is zeroed). With top_k > 0 also returns the
  `logprobs` of each prompt token after the one before it ([P - 1] and [P - 1, top_k])."""
  if memory is not None:
    dtype = jax.tree.leaves(memory)[0].dtype
    row_memory = (jax.tree.map(lambda a: jnp.zeros((1, *a.shape[1:]), a.dtype), memory) if row_memory is None
                  else device_memory(row_memory, dtype))
    memory = jax.tree.map(lambda all_B, one: jax.lax.dynamic_update_slice_in_dim(all_B, one, b, 0), memory, row_memory)
  logits_1xPxV, row = nnx.merge(graphdef, params)(tokens_1xP, segment_ids_1xP, row_memory, cache.row(b))
  scores = logprobs(logits_1xPxV[0, :-1], tokens_1xP[0, 1:], top_k) if top_k else None
  logits_BxV = jax.lax.dynamic_update_slice_in_dim(logits_BxV, logits_1xPxV[:, -1], b, 0)
  return cache.put_row(b, row), memory, logits_BxV, scores


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, segment ids) [B, length]: each prompt right-aligned after padding of segment 0,
  so no token attends to the padding and RoPE positions start at each prompt's first token."""
  tokens_BxP = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids_BxP = np.zeros((len(prompts), length), np.int32)
  for b, prompt in enumerate(prompts):
    tokens_BxP[b, length - len(prompt):] = prompt
    segment_ids_BxP[b, length - len(prompt):] = 1
  return tokens_BxP, segment_ids_BxP


def generate(model, prompts: Sequence[Sequence[int]], memory: dict | None = None, *, eot_id: int,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             progress: bool = False) -> list[np.ndarray]:
  """Continues every prompt (token ids); returns each row's new tokens, EOT excluded.

  `memory`: the model's memory argument for the B prompts (None: the dense anchor).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError('every prompt needs at least one token; got an empty prompt')
  check_sampling(temperature, top_p)
  B, P = len(prompts), round_up(max(map(len, prompts)), BUCKET)
  tokens_BxP, segment_ids_BxP = left_pad(prompts, P, eot_id)
  graphdef, params = nnx.split(model)
  cache = model.init_cache(B, P + round_up(max_new_tokens, BUCKET))
  logits_BxV, cache = _prefill(graphdef, params, tokens_BxP, segment_ids_BxP, memory, cache)
  done_B = jnp.zeros((B,), bool)
  sampling = Sampling.rows(np.full(B, seed), np.full(B, temperature), np.full(B, top_p))
  out = []
  for i in tqdm(range(max_new_tokens), desc='generate', unit='tok', leave=False, disable=not progress):
    token_B, done_B, logits_BxV, cache, _ = step(graphdef, params, logits_BxV, memory, cache, done_B, sampling,
                                              np.full(B, i, np.int32), eot_id=int(eot_id))
    out.append(token_B)
    if bool(jnp.all(done_B)):
      break
  tokens_BxN = np.asarray(jnp.stack(out, axis=1)) if out else np.zeros((B, 0), np.int32)
  return [row[:np.argmax(row == eot_id)] if (row == eot_id).any() else row for row in tokens_BxN]


def check_prompt(prompt: str) -> None:
  """Refuses a prompt `hmem prepare` would skip as a document (for the same reason): such
  text cannot be tokenized, or holds nothing to continue."""
  if reason := skip_reason(prompt):
    raise DataError(f'the prompt cannot be used ({reason}: {_REASONS.get(reason, reason)}); pass UTF-8 text')


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
  for prompt in prompts:
    check_prompt(prompt)
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
