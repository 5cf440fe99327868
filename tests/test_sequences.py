"""hmem's token sequences equal lm-evaluation-harness's own, on a byte-level BPE and on a
SentencePiece-style tokenizer (a normalizer that prepends "▁", BOS before every text):
loglikelihood pairs through lm-eval's `TemplateLM.loglikelihood` and `_encode_pair`, rolling
windows through its `get_rolling_token_windows` and `make_disjoint_window`, both cut as
its `hf` model cuts them. No model runs here: a few seconds."""

import json

import numpy as np
import pytest
import tokenizers
from conftest import WIKI
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from hmem.data.tokenizer import Tokenizer
from hmem.errors import UserError
from hmem.infer import sequences


def _texts():
  with open(WIKI) as f:
    return [json.loads(line)['text'] for line in f]


def _sentencepiece_style(texts) -> Tokenizer:
  """Llama-2 / Mistral's layout: "▁" prepended and spaces replaced by the normalizer, BPE
  with byte fallback, "<s> $A" post-processor; `</s>` is its EOT."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
  tok.pre_tokenizer = pre_tokenizers.Split('▁', 'merged_with_next')  # training speed only; merges stay in words
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(' ', 1, 0)])
  alphabet = sorted({c for t in texts for c in t})
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=['<unk>', '<s>', '</s>'],
                                                     initial_alphabet=alphabet, show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  return Tokenizer(tok)


@pytest.fixture(scope='module', params=['bpe', 'sentencepiece'])
def tokenizer(request):
  texts = _texts()[:200]
  return Tokenizer.train(texts, 512) if request.param == 'bpe' else _sentencepiece_style(texts)


class _Reference(TemplateLM):
  """lm-eval's own loglikelihood request handling over our tokenizer, read as its `hf`
  model reads a tokenizer: tok_encode adds the tokenizer's special tokens unless told not
  to, the prefix token is BOS else EOS. `_loglikelihood_tokens` records what it is given."""

  backend = 'causal'

  def __init__(self, tok: Tokenizer):
    super().__init__()
    self.tok, self.seen = tok, []

  @property
  def eot_token_id(self):
    return self.tok.eot_id

  @property
  def prefix_token_id(self):
    return self.tok.eot_id if self.tok.bos_id is None else self.tok.bos_id

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    return self.tok.encode([string], start=add_special_tokens is not False)[0].tolist()

  def _loglikelihood_tokens(self, requests, **kwargs):
    self.seen += [(context, continuation) for _, context, continuation in requests]
    return [(0.0, False)] * len(requests)

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    raise NotImplementedError

  def generate_until(self, requests, disable_tqdm=False):
    raise NotImplementedError


def _pairs():
  """Multiple-choice pairs, continuations that start mid-word, trailing whitespace in the
  context, empty contexts, a long context."""
  from lm_eval.api.instance import Instance
  texts = _texts()[200:230]
  pairs = [(t[:60].rsplit(' ', 1)[0], ' ' + t[60:].split()[0]) for t in texts[:10]]
  pairs += [(t[:45], t[45:70]) for t in texts[10:20]]  # cut anywhere, mid-word included
  pairs += [(t[:40].rsplit(' ', 1)[0] + ' ', t[40:].split()[0]) for t in texts[20:25]]  # space at the end
  pairs += [('The capital of France is', ' Paris'), ('Q: 2+2?\nA:\t ', '4'), ('', ' Paris'), ('', 'Paris is'),
            (texts[25], ' and so on.')]
  return pairs, [Instance('loglikelihood', {}, pair, i) for i, pair in enumerate(pairs)]


def test_pairs_encode_as_lm_eval_encodes_them(tokenizer):
  pairs, requests = _pairs()
  reference = _Reference(tokenizer)
  reference.loglikelihood(requests, disable_tqdm=True)
  ours = sequences.encode_pairs(tokenizer, *zip(*pairs))
  assert len(ours) == len(reference.seen) == len(pairs)
  for pair, (context, continuation), (want_context, want_continuation) in zip(pairs, ours, reference.seen):
    assert context.tolist() == want_context and continuation.tolist() == want_continuation, pair
  # Some pairs split where a separate encoding would not: the test covers the joint encoding.
  apart = [tokenizer.encode([c], start=False)[0].tolist() for _, c in pairs]
  assert sum(a != list(w) for a, (_, w) in zip(apart, reference.seen)) >= 3


def test_a_sentencepiece_choice_has_no_stray_word_marker():
  """The issue's example: " Paris" alone becomes "▁" + "▁Pa..." under a "▁"-prepending
  normalizer; after its context it has the tokens of running text."""
  tok = _sentencepiece_style(_texts()[:200])
  ((context, continuation),) = sequences.encode_pairs(tok, ['The capital of France is'], [' Paris'])
  alone = tok.encode([' Paris'], start=False)[0]
  pieces = [tok.token(int(i)) for i in continuation]
  assert [tok.token(int(i)) for i in alone][:2] == ['▁', '▁P']  # a lone word marker, then the word
  assert pieces[0] == '▁P' and '▁' not in ''.join(pieces)[1:] and len(pieces) == len(alone) - 1
  assert context[0] == tok.bos_id and tok.decode(np.concatenate([context, continuation])[1:]) == \
      'The capital of France is Paris'


@pytest.mark.parametrize('max_length', [1, 2, 5, 16])
def test_rolling_windows_are_lm_evals(tokenizer, max_length):
  prefix = sequences.prefix_id(tokenizer)
  for text in _texts()[230:236]:
    for n in (0, 1, max_length - 1, max_length, max_length + 1, 2 * max_length + 3, 60):
      ids = tokenizer.encode([text])[0][:n]
      want = [make_disjoint_window(w) for w in get_rolling_token_windows(ids.tolist(), prefix, max_length, 1)]
      ours = sequences.rolling_windows(ids, prefix, max_length)
      assert len(ours) == len(want), (n, max_length)
      for (tokens, weights), (context, continuation) in zip(ours, want):
        # The hf model's cut: the last max_length + 1 tokens, the continuation scored.
        assert tokens.tolist() == (context + continuation)[-(max_length + 1):]
        assert weights.tolist() == [0.0] * (len(tokens) - len(continuation)) + [1.0] * len(continuation)
      assert sum(int(w.sum()) for _, w in ours) == len(ids)  # every token predicted once


def test_pair_sequences_are_cut_as_the_hf_model_cuts_them(tokenizer):
  pairs, _ = _pairs()
  for context, continuation in sequences.encode_pairs(tokenizer, *zip(*pairs)):
    for max_length in (len(continuation), len(continuation) + 3, 512):
      tokens, weights = sequences.pair_sequence(context, continuation, max_length)
      whole = np.concatenate([context, continuation])
      assert tokens.tolist() == whole[-(max_length + 1):].tolist()
      assert weights.sum() == len(continuation) and weights[-len(continuation):].all()
  with pytest.raises(UserError, match='a continuation of 5 tokens cannot be scored with max_length=4'):
    sequences.pair_sequence(np.arange(3), np.arange(5), 4)
