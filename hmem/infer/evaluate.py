"""Scoring a JSONL file of new texts and multiple-choice questions under each memory mode.

Records (one JSON object a line; other fields, such as a corpus's id or title, are ignored
and counted by name; the lines and texts `hmem prepare` would skip are skipped, counted by
the same reasons):
  {"text": ..., "context": ...?}  perplexity: the text's tokens followed by EOT, as in
      training; every token after the first is predicted. Token-weighted over the file.
  {"prompt": ..., "candidates": [...], "answer": ..., "context": ...?}  multiple choice:
      the candidate with the highest summed log-likelihood of " " + candidate after the
      prompt wins; `answer` is the right candidate's index or text.
A record is routed by its `context` when it has one, else by its text or prompt.

Modes: `fetched` (the routed leaf's path), `generic` (the generic block, when the run
trained one), `none` (the dense anchor) and, when nodes are blocked, `blocked`: routed
around the given nodes (`block`) and/or around each record's own level-1 subtree
(`block_best`: the record is served by the best remaining subtree).

A text longer than the model's `data.seq_len` is scored in windows of seq_len tokens that
overlap by one token, so each window starts from fresh context and every token is still
predicted exactly once; a multiple-choice sequence longer than seq_len keeps the prompt's
last tokens. Sequences are scored in batches of fixed shape (a few bucket lengths), so a
file compiles a handful of programs whatever its size. `score` is that batcher on its own;
the lm-evaluation-harness model (hmem/infer/harness.py) scores its requests with it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from hmem.data import inputs
from hmem.errors import DataError, UserError
from hmem.files import as_path, atomic_write

TEXT_FIELDS = {'text', 'context'}
CHOICE_FIELDS = {'prompt', 'candidates', 'answer', 'context'}
_MIN_BUCKET = 32


@dataclasses.dataclass
class Records:
  """A file's usable records and the skipped lines counted by reason."""
  texts: list[str] = dataclasses.field(default_factory=list)
  text_routes: list[str] = dataclasses.field(default_factory=list)
  prompts: list[str] = dataclasses.field(default_factory=list)
  candidates: list[list[str]] = dataclasses.field(default_factory=list)
  answers: list[int] = dataclasses.field(default_factory=list)
  choice_routes: list[str] = dataclasses.field(default_factory=list)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  ignored: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # field -> records


def _parse(line: bytes) -> tuple[str | None, tuple[str, dict] | None]:
  """(skip reason, None) or (None, the record as (kind, fields)). A line or a text that
  `hmem prepare` would skip is skipped here for the same reason (`inputs.skip_reason`)."""
  reason, record = inputs.jsonl_record(line)
  if reason:
    return reason, None
  kind = 'text' if 'text' in record else 'choice' if 'prompt' in record else None
  if kind is None:
    return 'missing_field', None
  for field in ('text' if kind == 'text' else 'prompt', 'context'):
    if field in record and (reason := inputs.skip_reason(record[field])):
      return reason, None
  if kind == 'choice':
    candidates = record.get('candidates')
    if not isinstance(candidates, list) or not candidates or any(inputs.skip_reason(c) for c in candidates):
      return 'bad_candidates', None
    answer = record.get('answer')
    if isinstance(answer, str) and answer in candidates:
      record['answer'] = candidates.index(answer)
    elif not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(candidates)):
      return 'bad_answer', None
  return None, (kind, record)


def read_records(path: str | os.PathLike) -> Records:
  """Parses the file (on any filesystem); raises DataError when it holds no usable record."""
  if not as_path(path).is_file():
    raise DataError(f'eval data {str(path)!r} not found; pass a JSONL file of {{"text": ...}} and '
                    '{"prompt": ..., "candidates": [...], "answer": ...} records')
  out = Records()
  with as_path(path).open('rb') as f:
    for line in f:
      reason, parsed = _parse(line)
      if reason:
        out.skipped[reason] += 1
        continue
      kind, r = parsed
      out.ignored.update(set(r) - (TEXT_FIELDS if kind == 'text' else CHOICE_FIELDS))
      if kind == 'text':
        out.texts.append(r['text'])
        out.text_routes.append(r.get('context') or r['text'])
      else:
        out.prompts.append(r['prompt'])
        out.candidates.append(r['candidates'])
        out.answers.append(r['answer'])
        out.choice_routes.append(r.get('context') or r['prompt'])
  if not out.texts and not out.prompts:
    reasons = ', '.join(f'{n} {reason}' for reason, n in out.skipped.most_common()) or 'the file is empty'
    raise DataError(f'{path}: no usable record ({reasons}); write one JSON object a line with a "text" field, '
                    'or "prompt", "candidates" and "answer"')
  return out


def text_windows(ids: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Windows of at most seq_len tokens overlapping by one; every token but the first is
  scored exactly once."""
  out, start = [], 0
  while True:
    window = ids[start:start + seq_len]
    weights = np.ones(len(window), np.float32)
    weights[0] = 0
    out.append((window, weights))
    if start + seq_len >= len(ids):
      return out
    start += seq_len - 1


def choice_sequence(prompt: np.ndarray, answer: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """prompt + answer tokens, the prompt cut from the left to fit; only the answer scored."""
  keep = max(seq_len - len(answer), 1)
  tokens = np.concatenate([prompt[-keep:], answer])[:seq_len]
  weights = np.zeros(len(tokens), np.float32)
  weights[min(keep, len(prompt)):] = 1
  return tokens, weights


@functools.partial(jax.jit, static_argnames='graphdef')
def _nll(graphdef, params, tokens_BxT, weights_BxT, memory):
  """Per row, the summed negative log-likelihood of the weighted tokens and whether each of
  them is the argmax. Rows are right-padded with token -1, which becomes segment 0: no real
  token attends to it."""
  segment_ids_BxT = (tokens_BxT >= 0).astype(jnp.int32)
  tokens_BxT = jnp.maximum(tokens_BxT, 0)
  logits_BxTxV = nnx.merge(graphdef, params)(tokens_BxT, segment_ids_BxT, memory)[:, :-1]
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_BxT = jnp.take_along_axis(logits_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  scored_BxT = weights_BxT[:, 1:] > 0
  greedy_B = jnp.all((jnp.argmax(logits_BxTxV, axis=-1) == tokens_BxT[:, 1:]) | ~scored_BxT, axis=1)
  return jnp.sum((lse_BxT - target_BxT) * weights_BxT[:, 1:], axis=1), greedy_B


def _bucket(n: int, seq_len: int) -> int:
  """The padded length of a sequence of n tokens: a power of two, at most seq_len."""
  return min(seq_len, max(_MIN_BUCKET, 1 << (n - 1).bit_length()))


def _modes(source, blocking: bool) -> list[str]:
  if not source.has_memory:
    if blocking:
      raise UserError('--block / --block-best need a model with a memory; this run has none')
    return ['none']
  modes = ['fetched'] + (['generic'] if 'generic' in source.tables else []) + ['none']
  return modes + (['blocked'] if blocking else [])


def check_source(source, routed: bool) -> None:
  """Scoring text needs a tokenizer, and routing it (`routed`: a mode that fetches) a tree."""
  if source.tokenizer is None:
    raise UserError('this run trained on synthetic tokens and has no tokenizer to read new text; evaluate a run '
                    'trained on a prepared dataset (data.source=prepared) or one made by hmem import')
  if routed and source.router is None:
    raise UserError('this run trained its memory on synthetic data: it has no tree to route new text; evaluate '
                    'a run trained on a prepared dataset (data.source=prepared)')


def score(source, seqs, leaves: dict, *, seq_len: int, batch_size: int = 16, progress: bool = True,
          desc: str = 'eval') -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Scores token sequences under memory modes.

  seqs: [(tokens [T], weights [T], route)], T <= seq_len; a token's weight says whether it
  is scored (the first never is). leaves: {mode: leaf per route, or None for `generic` and
  `none`}; `blocked` is scored like `fetched`, on its own leaves. Returns {mode: (summed NLL
  of each sequence's weighted tokens [S], whether each of them was the argmax [S])}.
  """
  # Batches of one bucket length; rows sorted by leaf, so a batch shares its path rows.
  fetched = leaves.get('fetched')
  leaf_S = fetched[[r for _, _, r in seqs]] if fetched is not None else np.zeros(len(seqs), np.int64)
  bucket = lambda s: _bucket(len(seqs[s][0]), seq_len)
  order = sorted(range(len(seqs)), key=lambda s: (bucket(s), leaf_S[s]))
  batches = []
  for _, group in itertools.groupby(order, key=bucket):
    group = list(group)
    batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]

  graphdef, params = nnx.split(source.model)
  out = {mode: (np.zeros(len(seqs)), np.zeros(len(seqs), bool)) for mode in leaves}
  generic = source.memory(np.zeros(batch_size, np.int64), 'generic') if 'generic' in leaves else None
  with tqdm(total=len(seqs), desc=desc, unit='seq', disable=not progress) as bar:
    def collect(batch, outs):
      for mode, (nll_B, greedy_B) in outs:
        out[mode][0][batch] = np.asarray(nll_B)[:len(batch)]
        out[mode][1][batch] = np.asarray(greedy_B)[:len(batch)]
      bar.update(len(batch))

    previous = None
    for batch in batches:
      T = bucket(batch[0])
      tokens_BxT = np.full((batch_size, T), -1, np.int32)
      weights_BxT = np.zeros((batch_size, T), np.float32)
      for b, s in enumerate(batch):
        tokens, weights, _ = seqs[s]
        tokens_BxT[b, :len(tokens)], weights_BxT[b, :len(tokens)] = tokens, weights
      route_B = np.array([seqs[s][2] for s in batch])
      memories = {'none': None, 'generic': generic}
      for mode in ('fetched', 'blocked'):
        if mode in leaves:  # padding rows repeat real rows' leaves: no extra reads
          memories[mode] = source.memory(np.resize(leaves[mode][route_B], batch_size), 'fetched')
      outs = [(m, _nll(graphdef, params, tokens_BxT, weights_BxT, memories[m])) for m in leaves]
      if previous:  # collected one batch late: the next batch is prepared while this one runs
        collect(*previous)
      previous = batch, outs
    if previous:
      collect(*previous)
  return out


def evaluate(source, path: str, *, block=(), block_best: bool = False, batch_size: int = 16,
             progress: bool = True) -> dict:
  """Scores the file's records under every mode (see the module docstring). Returns
  {documents, tokens, ppl_<mode>} for text records, {examples, acc_<mode>} for
  multiple-choice records (keys of an absent kind omitted), `skipped` by reason and
  `ignored_fields` (records carrying each field eval does not use)."""
  records = read_records(path)
  blocking = bool(block) or block_best
  modes = _modes(source, blocking)
  check_source(source, source.has_memory)
  router, tokenizer, seq_len = source.router, source.tokenizer, source.config.data.seq_len
  n_text, n_choice = len(records.texts), len(records.prompts)

  leaves, fallbacks = dict.fromkeys(modes), 0
  if source.has_memory:
    emb_NxD = router.embed(records.text_routes + records.choice_routes)
    routes = router.route_embeddings(emb_NxD)
    leaves['fetched'], fallbacks = routes.leaf, routes.fallbacks
    if blocking:
      leaves['blocked'] = router.route_embeddings(emb_NxD, block, block_best).leaf

  seqs = []  # (tokens, weights, routed record)
  for i, ids in enumerate(tokenizer.encode(records.texts)):
    seqs += [(t, w, i) for t, w in text_windows(np.append(ids, tokenizer.eot_id).astype(np.int32), seq_len)]
  answers = iter(tokenizer.encode([' ' + c for cands in records.candidates for c in cands], start=False))
  for j, (prompt, cands) in enumerate(zip(tokenizer.encode(records.prompts), records.candidates)):
    seqs += [(*choice_sequence(prompt, next(answers), seq_len), n_text + j) for _ in cands]
  nll = {mode: nll_S for mode, (nll_S, _) in
         score(source, seqs, leaves, seq_len=seq_len, batch_size=batch_size, progress=progress).items()}
  weight_S = np.array([w.sum() for _, w, _ in seqs])

  result = {}
  is_text_S = np.array([r < n_text for _, _, r in seqs], bool)
  if n_text:
    tokens = weight_S[is_text_S].sum()
    result.update(documents=n_text, tokens=int(tokens))
    result.update({f'ppl_{m}': math.exp(nll[m][is_text_S].sum() / tokens) for m in modes})
  if n_choice:
    bounds = np.cumsum([0] + [len(c) for c in records.candidates])
    result['examples'] = n_choice
    for m in modes:
      scores = nll[m][~is_text_S]  # candidates in file order
      picks = [int(np.argmin(scores[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:])]
      result[f'acc_{m}'] = float(np.mean(np.array(picks) == np.array(records.answers)))
  if fallbacks:
    result['fallbacks'] = fallbacks
  result['skipped'] = dict(records.skipped.most_common())
  result['ignored_fields'] = dict(records.ignored.most_common())
  return result


def evaluate_cached(open_model, step: int, data: str, out: str, block_best: bool, progress: bool) -> dict:
  """`evaluate(open_model(), data)`, cached in `out` for this checkpoint step and this version
  of the file (path and modification time): the quickstart, benchmarks and sweeps rerun
  without scoring again."""
  key = {'step': step, 'data': os.path.abspath(data), 'data_mtime_ns': os.stat(data).st_mtime_ns}
  if os.path.exists(out):
    with open(out) as f:
      cached = json.load(f)
    if all(cached.get(k) == v for k, v in key.items()):
      return cached
  result = {**key, **evaluate(open_model(), data, block_best=block_best, progress=progress)}
  with atomic_write(out) as f:
    json.dump(result, f)
  return result


def table(result: dict) -> str:
  """The result as a table: one row per mode, perplexity and/or accuracy."""
  modes = [m for m in ('fetched', 'generic', 'none', 'blocked')
           if f'ppl_{m}' in result or f'acc_{m}' in result]
  columns = [(f'ppl ({result["documents"]} texts)', 'ppl', '.3f')] if 'documents' in result else []
  if 'examples' in result:
    columns.append((f'accuracy ({result["examples"]} questions)', 'acc', '.3f'))
  lines = ['mode     ' + ''.join(f'{title:>28}' for title, _, _ in columns)]
  for m in modes:
    lines.append(f'{m:<9}' + ''.join(f'{result[f"{key}_{m}"]:>28{fmt}}' for _, key, fmt in columns))
  skipped = result['skipped']
  lines.append('skipped: ' + (', '.join(f'{n} {reason}' for reason, n in skipped.items()) if skipped else 'none'))
  if result.get('ignored_fields'):
    ignored = result['ignored_fields'].items()
    lines.append('ignored fields: ' + ', '.join(f'{name} ({n} records)' for name, n in ignored))
  return '\n'.join(lines)


def plot(result: dict, path: str | os.PathLike) -> None:
  """A bar chart per record kind, one bar per mode, saved as a PNG (on any filesystem)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = [(key, label) for key, label in (('ppl', 'perplexity (lower is better)'), ('acc', 'accuracy'))
            if any(k.startswith(key + '_') for k in result)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    modes = [k.split('_', 1)[1] for k in result if k.startswith(key + '_')]
    values = [result[f'{key}_{m}'] for m in modes]
    ax.bar(modes, values, color=['C0', 'C1', 'C2', 'C3'][:len(modes)])
    ax.set_title(label)
    for x, v in enumerate(values):
      ax.annotate(f'{v:.3g}', (x, v), ha='center', va='bottom')
  fig.tight_layout()
  with atomic_write(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=120)
  plt.close(fig)
