"""hmem as an lm-evaluation-harness model: `lm_eval --model hmem --model_args bundle=B,memory=fetched`.

model_args (comma-separated KEY=VALUE):
  bundle=DIR | workdir=RUN[,step=N]   what to load (`open_source`)
  memory=fetched|generic|none         default: fetched, or none for a run without memory
  block=LEVEL:ID+LEVEL:ID             route around these nodes (memory=fetched)
  block_best=true                     route each request around its own level-1 subtree
  max_length=N                        tokens the model reads at once (default: data.seq_len)
  max_gen_toks=N                      generate_until's default new tokens (default 256)
The harness's --batch_size sets the rows scored or decoded at once (default 16 here).

Every request is routed by its own text: a loglikelihood request by its context (the
question of a multiple-choice item, as the paper routes; the continuation when the context
is empty), a rolling request by its document, a generation request by its prompt. Scoring
goes through `hmem eval`'s batcher (requests batched by length bucket and leaf, so a batch
shares its path rows) and generation through the KV-cached decoder, prompts batched by leaf.

Conventions: lm-eval's, as its `hf` model applies them to the same tokenizer, so a number
from hmem stands beside one from any model the harness runs (hmem.infer.sequences):
  loglikelihood: context and continuation encoded jointly and split at the context's token
    count (the context's trailing whitespace moved to the continuation); an empty context
    is the prefix token (BOS, else EOT); too long, the sequence keeps its last tokens.
  loglikelihood_rolling: lm-eval's rolling windows: every token of the document predicted
    once, the first after the prefix token; no EOT is scored.
  generate_until: lm-eval's own handling of the generation kwargs (`until`, `max_gen_toks`
    and its aliases, `do_sample`, `temperature`), stop strings and EOT's text cut the text
    at their first occurrence; a prompt keeps its last max_length - max_gen_toks tokens.
"""

from __future__ import annotations

import itertools

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from hmem.data.router import parse_node
from hmem.errors import UserError
from hmem.infer import sequences
from hmem.infer.decoder import complete_all
from hmem.infer.evaluate import check_source, score
from hmem.infer.source import MODES, open_source

_SAMPLING = ('until', 'max_gen_toks', 'do_sample', 'temperature', 'top_p', 'seed')


def _as_int(name: str, value, least: int = 1) -> int:
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if not isinstance(value, int) or isinstance(value, bool) or value < least:
    raise UserError(f'{name}={value!r}: give an integer >= {least} (hmem batches by leaf and length itself, so '
                    'there is no "auto")')
  return value


@register_model('hmem')
class HarnessLM(LM):
  """A bundle or run directory answering the harness's three request types (module docstring).
  `source`: an open MemorySource instead of bundle/workdir (`hmem eval --tasks` and the
  training callback score one source under several modes)."""

  def __init__(self, bundle: str | None = None, workdir: str | None = None, step: int | None = None,
               memory: str | None = '', block: str = '', block_best: bool = False, batch_size=16,
               max_length: int | None = None, max_gen_toks: int = 256, max_batch_size=None, device=None,
               progress: bool = True, source=None):
    super().__init__()
    del max_batch_size, device  # harness-wide options: batches are fixed here, JAX picks the device
    if source is None:
      source = open_source(bundle=bundle, workdir=workdir, step=None if step is None else _as_int('step', step, 0))
    self.source = source
    # lm-eval's --model_args parser reads the value none as None: memory=none arrives so.
    memory = 'none' if memory is None else memory or ('fetched' if source.has_memory else 'none')
    if memory not in MODES:
      raise UserError(f'memory={memory!r}; choose one of {", ".join(MODES)}')
    if memory != 'none' and not source.has_memory:
      raise UserError(f'memory={memory}: this run has no memory; use memory=none')
    m = source.config.memory
    self.block = [parse_node(n, m.k, m.depth) for n in block.split('+')] if isinstance(block, str) and block \
        else list(block or [])
    self.block_best = block_best in (True, 'true', 'True')
    if (self.block or self.block_best) and memory != 'fetched':
      raise UserError(f'block / block_best route around nodes, so they need memory=fetched (got {memory})')
    check_source(source, memory == 'fetched')
    self.memory, self.tokenizer = memory, source.tokenizer
    self.batch_size = _as_int('batch_size', batch_size)
    self.max_length = _as_int('max_length', max_length or source.config.data.seq_len)
    self.max_gen_toks = _as_int('max_gen_toks', max_gen_toks)
    self.progress = progress

  def _leaves(self, texts: list[str]) -> tuple[dict, list[int]]:
    """({mode: leaf per distinct text}, each text's index among the distinct ones)."""
    distinct = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(distinct)}
    leaves = None
    if self.memory == 'fetched':
      leaves = self.source.router.route(distinct, self.block, self.block_best).leaf
    return {self.memory: leaves}, [index[t] for t in texts]

  def _score(self, seqs, leaves, disable_tqdm: bool) -> tuple[np.ndarray, np.ndarray]:
    out = score(self.source, seqs, leaves, max_length=self.max_length, batch_size=self.batch_size,
                progress=self.progress and not disable_tqdm, desc='hmem')
    return out[self.memory]

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    contexts, continuations = zip(*(r.args for r in requests)) if requests else ((), ())
    leaves, routes = self._leaves([c.rstrip() or d for c, d in zip(contexts, continuations)])
    pairs = sequences.encode_pairs(self.tokenizer, contexts, continuations)
    seqs = [(*sequences.pair_sequence(*pair, self.max_length), route) for pair, route in zip(pairs, routes)]
    nll_S, greedy_S = self._score(seqs, leaves, disable_tqdm)
    return [(-float(nll), bool(greedy)) for nll, greedy in zip(nll_S, greedy_S)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    documents = [r.args[0] for r in requests]
    leaves, routes = self._leaves(documents)
    prefix, seqs, owner = sequences.prefix_id(self.tokenizer), [], []
    for d, (ids, route) in enumerate(zip(self.tokenizer.encode(documents), routes)):
      windows = sequences.rolling_windows(ids, prefix, self.max_length)
      seqs += [(tokens, weights, route) for tokens, weights in windows]
      owner += [d] * len(windows)
    nll_S, _ = self._score(seqs, leaves, disable_tqdm) if seqs else (np.zeros(0), None)
    return [-float(total) for total in np.bincount(owner, weights=nll_S, minlength=len(documents))]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = [''] * len(requests)
    options = [self._sampling(r.args[1]) for r in requests]
    # Requests with the same sampling settings decode together.
    key = lambda i: tuple(sorted((k, v) for k, v in options[i][0].items()))
    for _, group in itertools.groupby(sorted(range(len(requests)), key=key), key=key):
      group = list(group)
      sampling = options[group[0]][0]
      _, texts = complete_all(self.source, [requests[i].args[0] for i in group], mode=self.memory, block=self.block,
                              block_best=self.block_best, batch_size=self.batch_size, context=self.max_length,
                              progress=self.progress and not disable_tqdm, **sampling)
      for i, text in zip(group, texts):
        out[i] = postprocess_generated_text(text, options[i][1], None)
    return out

  def _sampling(self, kwargs: dict) -> tuple[dict, list[str]]:
    """A request's generation kwargs -> (decoder settings, stop strings), read as lm-eval's
    models read them (aliases of max_gen_toks, do_sample against temperature, EOT's text a
    stop string)."""
    kwargs = normalize_gen_kwargs(kwargs, self.max_gen_toks)
    unknown = sorted(set(kwargs) - set(_SAMPLING))
    if unknown:
      raise UserError(f'generation kwargs {unknown} are not supported; hmem takes {", ".join(_SAMPLING)} '
                      '(and the aliases of max_gen_toks)')
    until = handle_stop_sequences(kwargs.get('until'), eos=self.tokenizer.decode([self.tokenizer.eot_id]))
    temperature = float(kwargs['temperature']) if kwargs['do_sample'] else 0.0
    return {'max_new_tokens': _as_int('max_gen_toks', kwargs['max_gen_toks']), 'temperature': temperature,
            'top_p': float(kwargs.get('top_p', 1.0)), 'seed': int(kwargs.get('seed', 0))}, until
