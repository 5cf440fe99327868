"""The server's text path (hmem.infer.text): incremental detokenization equals decoding the
whole sequence, costs the same per token however long the text, and stop strings cut the
text wherever they fall across tokens. Tokenizer-only: a BPE trained on the wiki sample and
a character-level one; about a second."""

import numpy as np
import pytest
import tokenizers
from conftest import WIKI
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers

from hmem.data.tokenizer import Tokenizer
from hmem.infer.text import Completion, Detokenizer, pieces

TEXTS = WIKI.read_text(encoding='utf-8').splitlines()[:200]


@pytest.fixture(scope='module')
def bpe():
  """A byte-level BPE (multi-byte characters span tokens) with some non-ASCII text."""
  return Tokenizer.train(TEXTS + ['naïve café ☃ 日本語 — “quotes”'] * 20, 400)


def _metaspace():
  """A SentencePiece-style tokenizer (its decoder drops the first token's leading space)."""
  vocab = {'<unk>': 0, '<|endoftext|>': 1, **{f'▁{w}': i + 2 for i, w in enumerate(('the', 'cat', 'sat', 'on'))}}
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  return Tokenizer(tokenizer)


class _Counting:
  """A tokenizer that counts the tokens it decodes."""

  def __init__(self, tokenizer):
    self.tokenizer, self.decoded = tokenizer, 0

  def decode(self, ids):
    self.decoded += len(ids)
    return self.tokenizer.decode(ids)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 399), max_size=40))
def test_pieces_join_to_the_decoded_text(bpe, ids):
  ids = [i for i in ids if i < bpe.vocab_size]
  assert ''.join(pieces(bpe, ids)) == bpe.decode(ids)


def test_pieces_wait_for_a_whole_character(bpe):
  ids = bpe.encode(['☃ 日本語'], start=False)[0].tolist()
  detokenizer = Detokenizer(bpe)
  out = [detokenizer.add(i) for i in ids]
  assert all('\ufffd' not in piece for piece in out) and ''.join(out) + detokenizer.flush() == '☃ 日本語'
  assert '' in out  # some token ended inside a character and waited for the next
  metaspace = _metaspace()
  ids = metaspace.encode(['the cat sat on the'], start=False)[0].tolist()
  assert ''.join(pieces(metaspace, ids)) == metaspace.decode(ids) == 'the cat sat on the'


def test_a_token_costs_the_same_however_long_the_text(bpe):
  """3,000 tokens decode about a token's window each: linear, where decoding the whole
  completion at every token (the old server) decodes 4.5 million."""
  ids = np.resize(bpe.encode([' '.join(TEXTS[:40])], start=False)[0], 3000).tolist()
  counting = _Counting(bpe)
  completion = Completion(counting, stop=['never appears'])
  text = ''.join(completion.add(i) for i in ids) + completion.finish()
  assert text == bpe.decode(ids)
  assert counting.decoded < 10 * len(ids), counting.decoded


@pytest.mark.parametrize('stop', [[' of the'], ['zzz', ' was'], ['e'], ['.']])
def test_stop_strings_cut_before_the_first_one_across_tokens(bpe, stop):
  text = ' '.join(TEXTS[3:6])
  ids = bpe.encode([text], start=False)[0].tolist()
  whole = bpe.decode(ids)
  cut = min(whole.find(s) for s in stop if s in whole)
  completion = Completion(bpe, stop)
  out = ''
  for i in ids:
    out += completion.add(i)
    if completion.stopped:
      break
  assert completion.stopped and out == whole[:cut]
  # The tokens that cover the text up to the cut, no more.
  kept = completion.kept_tokens()
  assert len(bpe.decode(ids[:kept])) >= cut > len(bpe.decode(ids[:kept - 1])) if cut else kept == 0


def test_text_is_held_only_while_it_could_begin_a_stop_string(bpe):
  completion = Completion(bpe, ['STOP!'])
  ids = bpe.encode(['word word word STO'], start=False)[0].tolist()
  out = ''.join(completion.add(i) for i in ids)
  assert out == 'word word word' and not completion.stopped  # the last 4 characters might begin 'STOP!'
  assert completion.finish() == ' STO' and completion.kept_tokens() == len(ids)
