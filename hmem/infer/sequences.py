"""Text to scored token sequences, by lm-evaluation-harness's conventions or by training's.

A scored sequence is (tokens [T], weights [T]): the model reads tokens[:-1] and predicts
tokens[1:]; a token's weight says whether its prediction counts (the first never does).
A sequence holds at most max_length + 1 tokens, so the model reads at most max_length.

lm-eval's conventions (those of its `hf` model, so a number from hmem stands beside one
from any model the harness runs on the same tokenizer; tests/test_sequences.py checks
them against lm-eval's own helpers):
  `encode_pairs`: a (context, continuation) pair is encoded jointly and split at the
    context's token count, after moving the context's trailing whitespace to the
    continuation; so " Paris" after "The capital is" gets the tokens it has in running
    text, not those of " Paris" alone (a SentencePiece normalizer would prepend "▁" to it).
    An empty context becomes the prefix token (BOS, else EOT) before the continuation,
    encoded without BOS.
  `pair_sequence`: context + continuation cut from the left to max_length + 1 tokens,
    the continuation scored.
  `rolling_windows`: a document's tokens (BOS first when the tokenizer adds one) predicted
    once each after the prefix token, in windows of max_length predictions; every window
    after the first reads the max_length tokens before its last prediction.

Training's convention (`text_windows`, `hmem eval`'s default perplexity): a document is
its tokens followed by EOT, as it is packed; the first token is not predicted (training
never predicts a document's first token), every later token and the EOT are, in windows of
seq_len tokens overlapping by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hmem.errors import UserError


def prefix_id(tokenizer) -> int:
  """The token an empty context and a rolling document start from: BOS, else EOT."""
  return tokenizer.eot_id if tokenizer.bos_id is None else tokenizer.bos_id


def encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[str]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(context ids, continuation ids) of each pair, encoded as lm-eval encodes them (module doc)."""
  moved = []
  for context, continuation in zip(contexts, continuations, strict=True):
    if context == '':
      moved.append((None, continuation))
    else:
      kept = context.rstrip()  # word-boundary whitespace belongs to the continuation
      moved.append((kept, context[len(kept):] + continuation))
  joint = [i for i, (context, _) in enumerate(moved) if context is not None]
  alone = [i for i, (context, _) in enumerate(moved) if context is None]
  context_ids = tokenizer.encode([moved[i][0] for i in joint])
  whole_ids = tokenizer.encode([moved[i][0] + moved[i][1] for i in joint])
  out: list = [None] * len(moved)
  for i, context, whole in zip(joint, context_ids, whole_ids):
    if not len(context):
      raise UserError(f'the context {contexts[i]!r} is only whitespace and the tokenizer adds no BOS: nothing '
                      'is left to predict the continuation from; give a context with text, or an empty one')
    out[i] = context, whole[len(context):]
  prefix = prefix_id(tokenizer)
  for i, continuation in zip(alone, tokenizer.encode([moved[i][1] for i in alone], start=False)):
    if len(continuation) and continuation[0] == prefix:  # it starts with the prefix token already
      out[i] = continuation[:1], continuation[1:]
    else:
      out[i] = np.array([prefix], np.int32), continuation
  return out


def pair_sequence(context: np.ndarray, continuation: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """context + continuation, cut from the left to max_length + 1 tokens; the continuation scored."""
  if not 0 < len(continuation) <= max_length:
    raise UserError(f'a continuation of {len(continuation)} tokens cannot be scored with max_length={max_length}: '
                    'it needs 1 to max_length tokens (an empty one merged into its context when encoded '
                    'together); raise max_length or check the request')
  tokens = np.concatenate([context, continuation]).astype(np.int32)[-(max_length + 1):]
  weights = np.zeros(len(tokens), np.float32)
  weights[len(tokens) - len(continuation):] = 1
  return tokens, weights


def rolling_windows(ids: np.ndarray, prefix: int, max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """lm-eval's rolling windows of a document's ids (module doc): each id predicted once."""
  full = np.concatenate([[prefix], ids]).astype(np.int32)  # full[j + 1] is ids[j]
  out, done = [], 0  # ids predicted so far
  while done < len(ids):
    end = min(done + max_length, len(ids))
    tokens = full[max(end - max_length, 0):end + 1]
    weights = np.zeros(len(tokens), np.float32)
    weights[len(tokens) - (end - done):] = 1
    out.append((tokens, weights))
    done = end
  return out


def text_windows(ids: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Training's windows: at most seq_len tokens each, overlapping by one; every token but
  the first is scored exactly once."""
  out, start = [], 0
  while True:
    window = ids[start:start + seq_len]
    weights = np.ones(len(window), np.float32)
    weights[0] = 0
    out.append((window, weights))
    if start + seq_len >= len(ids):
      return out
    start += seq_len - 1
