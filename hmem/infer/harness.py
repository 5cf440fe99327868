"""hmem as an lm-evaluation-harness model: `lm_eval --model hmem --model_args bundle=B,memory=fetched`.

model_args (comma-separated KEY=VALUE):
  bundle=DIR | workdir=RUN[,step=N]   what to load (`open_source`)
  memory=fetched|generic|none         default: fetched, or none for a run without memory
  block=LEVEL:ID+LEVEL:ID             route around these nodes (memory=fetched)
  block_best=true                     route each request around its own level-1 subtree
  max_length=N                        tokens a scored window or a prompt may fill (default: data.seq_len)
  max_gen_toks=N                      generate_until's default new tokens (default 256)
The harness's --batch_size sets the rows scored or decoded at once (default 16 here).

Every request is routed by its own text: a loglikelihood request by its context (the
question of a multiple-choice item, as the paper routes; the continuation when the context
is empty), a rolling request by its document, a generation request by its prompt. Scoring
goes through `hmem eval`'s batcher (requests batched by length bucket and leaf, so a batch
shares its path rows) and generation through the KV-cached decoder, prompts batched by leaf.

Conventions, those of `hmem eval` and of training:
  loglikelihood: context and continuation are tokenized separately (the context's trailing
    whitespace moved to the continuation, as the harness does); an empty context becomes
    EOT; a context too long keeps its last tokens.
  loglikelihood_rolling: the document's tokens followed by EOT, as documents are packed in
    training; the first token is not predicted (training never predicts a document's first
    token), every later token and the EOT are, once each, in windows of max_length tokens
    overlapping by one. So a document of n tokens scores n predictions, and
    exp(-sum of its loglikelihoods / its token count) is `hmem eval`'s perplexity.
"""

from __future__ import annotations

import itertools

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from hmem.data.router import parse_node
from hmem.errors import UserError
from hmem.infer.decoder import complete_all
from hmem.infer.evaluate import check_source, choice_sequence, score, text_windows
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
  """A bundle or run directory answering the harness's three request types (module docstring)."""

  def __init__(self, bundle: str | None = None, workdir: str | None = None, step: int | None = None,
               memory: str | None = None, block: str = '', block_best: bool = False, batch_size=16,
               max_length: int | None = None, max_gen_toks: int = 256, max_batch_size=None, device=None,
               progress: bool = True):
    super().__init__()
    del max_batch_size, device  # harness-wide options: batches are fixed here, JAX picks the device
    self.source = open_source(bundle=bundle, workdir=workdir, step=None if step is None else _as_int('step', step, 0))
    memory = memory or ('fetched' if self.source.has_memory else 'none')
    if memory not in MODES:
      raise UserError(f'memory={memory!r}; choose one of {", ".join(MODES)}')
    if memory != 'none' and not self.source.has_memory:
      raise UserError(f'memory={memory}: this run has no memory; use memory=none')
    m = self.source.config.memory
    self.block = [parse_node(n, m.k, m.depth) for n in block.split('+')] if block else []
    self.block_best = block_best in (True, 'true', 'True')
    if (self.block or self.block_best) and memory != 'fetched':
      raise UserError(f'block / block_best route around nodes, so they need memory=fetched (got {memory})')
    check_source(self.source, memory == 'fetched')
    self.memory, self.tokenizer = memory, self.source.tokenizer
    self.batch_size = _as_int('batch_size', batch_size)
    self.max_length = _as_int('max_length', max_length or self.source.config.data.seq_len)
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
    out = score(self.source, seqs, leaves, seq_len=self.max_length, batch_size=self.batch_size,
                progress=self.progress and not disable_tqdm, desc='hmem')
    return out[self.memory]

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    contexts, continuations = [], []
    for context, continuation in (r.args for r in requests):
      spaces = len(context) - len(context.rstrip())  # word-boundary spaces belong to the continuation
      contexts.append(context[:len(context) - spaces])
      continuations.append(context[len(context) - spaces:] + continuation)
    leaves, routes = self._leaves([c if c.strip() else d for c, d in zip(contexts, continuations)])
    seqs = []
    for context, continuation, route in zip(self.tokenizer.encode(contexts),
                                            self.tokenizer.encode(continuations, start=False), routes):
      if len(continuation) >= self.max_length:
        raise UserError(f'a continuation of {len(continuation)} tokens does not fit max_length={self.max_length} '
                        'with any context; raise max_length')
      context = context if len(context) else np.array([self.tokenizer.eot_id], np.int32)
      seqs.append((*choice_sequence(context, continuation, self.max_length), route))
    nll_S, greedy_S = self._score(seqs, leaves, disable_tqdm)
    return [(-float(nll), bool(greedy)) for nll, greedy in zip(nll_S, greedy_S)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    documents = [r.args[0] for r in requests]
    leaves, routes = self._leaves(documents)
    seqs, owner = [], []
    for d, (ids, route) in enumerate(zip(self.tokenizer.encode(documents), routes)):
      windows = text_windows(np.append(ids, self.tokenizer.eot_id).astype(np.int32), self.max_length)
      seqs += [(tokens, weights, route) for tokens, weights in windows]
      owner += [d] * len(windows)
    nll_S, _ = self._score(seqs, leaves, disable_tqdm)
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
        stops = [text.find(s) for s in options[i][1] if s and s in text]
        out[i] = text[:min(stops)] if stops else text
    return out

  def _sampling(self, kwargs: dict) -> tuple[dict, list[str]]:
    """A request's generation kwargs -> (decoder settings, stop strings)."""
    unknown = sorted(set(kwargs) - set(_SAMPLING))
    if unknown:
      raise UserError(f'generation kwargs {unknown} are not supported; hmem takes {", ".join(_SAMPLING)}')
    until = kwargs.get('until') or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kwargs.get('temperature', 1.0 if kwargs.get('do_sample') else 0.0))
    if not kwargs.get('do_sample', temperature > 0):
      temperature = 0.0
    return {'max_new_tokens': _as_int('max_gen_toks', kwargs.get('max_gen_toks', self.max_gen_toks)),
            'temperature': temperature, 'top_p': float(kwargs.get('top_p', 1.0)),
            'seed': int(kwargs.get('seed', 0))}, until
