"""The dataset's tokenizer: a byte-level BPE trained on the corpus, or a given tokenizer.json.

Byte-level BPE encodes any text without unknown tokens and decodes it back exactly. The
end-of-text token (EOT) ends every packed document. Text that happens to spell a special
token is encoded as plain text, so a document can never fake an EOT.

A model trained with a beginning-of-sequence token (BOS: Llama 2/3, Mistral) sees it before
every document. Whether a tokenizer adds one is stored in the tokenizer file itself, as its
post-processor (Hugging Face's own place for it: a template "<bos> $A"), so every copy of
the file (a run's, a prepared dataset's, a bundle's, a Hugging Face export's) carries it,
and its identity hash tells a dataset packed with BOS from one packed without. `hmem
import` writes it there from the checkpoint's metadata (`set_bos`); `Tokenizer.encode` is
the one place text becomes ids, for prepare, eval and generate alike.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from hmem.errors import DataError
from hmem.files import as_path, atomic_write

EOT = '<|endoftext|>'
# End-of-text spellings of common pretrained tokenizers, tried before adding EOT.
_EOT_ALIASES = (EOT, '<|end_of_text|>', '</s>', '<eos>')
_MIN_VOCAB = 257  # the 256 byte symbols and EOT


class Tokenizer:
  """A `tokenizers.Tokenizer` with a known EOT id and BOS id (None: the model takes no BOS)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    eot = next((t for t in _EOT_ALIASES if tokenizer.token_to_id(t) is not None), None)
    if eot is None:
      tokenizer.add_special_tokens([EOT])
      eot = EOT
    self.bos_id = _bos_id(tokenizer, eot)
    tokenizer.encode_special_tokens = True  # not stored in tokenizer.json; set on every load
    self._tokenizer = tokenizer
    self.eot_id = tokenizer.token_to_id(eot)
    self.vocab_size = tokenizer.get_vocab_size()

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int) -> 'Tokenizer':
    """A byte-level BPE of at most `vocab_size` tokens (fewer on a small sample); EOT is id 0."""
    if vocab_size < _MIN_VOCAB:
      raise DataError(f'model.vocab_size={vocab_size} is too small for a byte-level BPE; '
                      f'use at least {_MIN_VOCAB} (256 bytes + EOT)')
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return cls(tokenizer)

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Tokenizer':
    return cls(_read(path))

  def encode(self, texts: Sequence[str], *, start: bool = True) -> list[np.ndarray]:
    """Token ids of each text: a text that starts a sequence (a document, a prompt) gets the
    BOS first when the tokenizer has one; `start=False` for a continuation (an answer after
    its prompt). No EOT: documents get theirs when packed."""
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=start)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def token(self, token_id: int) -> str:
    return self._tokenizer.id_to_token(token_id)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)

  def save(self, path: str | os.PathLike) -> None:
    with atomic_write(path, encoding='utf-8') as f:
      f.write(self._tokenizer.to_str(pretty=True))  # what tokenizers' own save writes

  @property
  def identity(self) -> str:
    """A hash of the whole tokenizer (vocabulary, merges, pre-tokenizer, special tokens): two
    tokenizers with the same vocabulary size but different ids differ here."""
    return hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()[:20]


def _bos_id(tokenizer: tokenizers.Tokenizer, eot: str) -> int | None:
  """The id the tokenizer's post-processor puts before every text, or None. Probed on the
  EOT's text; a post-processor that adds anything else (an EOS after the text, two tokens)
  is refused: packing ends each document with the EOT itself."""
  encoding = tokenizer.encode(eot, add_special_tokens=True)
  added = [i for i, sequence in enumerate(encoding.sequence_ids) if sequence is None]  # not from the text
  if not added:
    return None
  if added == [0]:
    return encoding.ids[0]
  raise DataError(f'the tokenizer\'s post-processor adds {[encoding.tokens[i] for i in added]} at positions {added} '
                  f'of a text; hmem adds at most one BOS before a text, and the EOT itself: set post_processor '
                  'to null, or to a template "<bos> $A", in tokenizer.json')


def set_bos(path: str | os.PathLike, bos: str | None) -> None:
  """Rewrites the tokenizer.json at `path` to put the token `bos` before every text (None:
  nothing), as its post-processor."""
  tokenizer = _read(path)
  if bos is None:
    tokenizer.post_processor = None
  elif (bos_id := tokenizer.token_to_id(bos)) is None:
    raise DataError(f'the BOS token {bos!r} is not in the vocabulary of {os.fspath(path)}; pass the tokenizer.json '
                    'the checkpoint was trained with')
  else:
    tokenizer.post_processor = processors.TemplateProcessing(single=f'{bos} $A', special_tokens=[(bos, bos_id)])
  with atomic_write(path, encoding='utf-8') as f:
    f.write(tokenizer.to_str(pretty=True))


def _read(path: str | os.PathLike) -> tokenizers.Tokenizer:
  name = os.fspath(path)
  path = as_path(path)
  if not path.is_file():
    raise DataError(f'tokenizer {name!r} not found; set data.tokenizer to a tokenizer.json, '
                    "or to '' to train one on the corpus")
  try:
    return tokenizers.Tokenizer.from_str(path.read_text(encoding='utf-8'))
  except Exception as e:  # tokenizers raises a bare Exception for a malformed file
    raise DataError(f'tokenizer {name!r} cannot be loaded ({e}); pass a tokenizer.json '
                    'written by the `tokenizers` library') from None


def tokenizer_file(run_or_file: str) -> str:
  """A tokenizer.json, or the one inside a directory (a run made by `hmem import`, a
  prepared dataset); local or on an object store."""
  path = as_path(run_or_file)
  if path.is_dir():
    path = path / 'tokenizer.json'
  if not path.is_file():
    raise DataError(f'no tokenizer at {run_or_file!r}; pass a tokenizer.json or a directory holding one '
                    '(e.g. a run written by hmem import)')
  return str(path)
