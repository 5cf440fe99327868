"""A completion's text as its tokens arrive: incremental detokenization and stop strings.

Decoding all of a completion again at each new token costs the square of its length (1.4 s
of CPU for a 3.3k-token completion). `Detokenizer` decodes each token with the few tokens
since the last complete character instead (the prefix-offset method of Hugging Face TGI
and vLLM): a token costs the same whatever came before it, and a token that ends inside a
UTF-8 character yields nothing until the next one completes it. `Completion` cuts the text
at the first stop string; it searches only the text not yet handed out, which holds the
longest stop string's length (minus one) besides the new piece, so a token's stop check
costs the same however long the completion.
"""

from __future__ import annotations

from collections.abc import Sequence

_PARTIAL = '\ufffd'  # what a decoder shows for an unfinished UTF-8 character


class Detokenizer:
  """Text of a growing token sequence, piece by piece; `''.join(pieces)` equals
  `tokenizer.decode(tokens)` once flushed."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.tokens: list[int] = []
    self._prefix = self._read = 0  # tokens[_prefix:_read] decode to text already handed out

  def add(self, token: int) -> str:
    """The new text this token completes ('' while a character is unfinished)."""
    self.tokens.append(token)
    return self._new(final=False)

  def flush(self) -> str:
    """Whatever is left (an unfinished character comes out as U+FFFD)."""
    return self._new(final=True)

  def _new(self, final: bool) -> str:
    before = self.tokenizer.decode(self.tokens[self._prefix:self._read])
    text = self.tokenizer.decode(self.tokens[self._prefix:])
    if len(text) > len(before) and (final or not text.endswith(_PARTIAL)):
      self._prefix, self._read = self._read, len(self.tokens)
      return text[len(before):]
    return ''


def pieces(tokenizer, tokens: Sequence[int]) -> list[str]:
  """Each token's share of the decoded text (echoed prompts' logprobs tokens)."""
  detokenizer = Detokenizer(tokenizer)
  out = [detokenizer.add(int(t)) for t in tokens]
  if out:
    out[-1] += detokenizer.flush()
  return out


class Completion:
  """One choice's text as its tokens arrive, cut before the first of `stop`; text that
  might still begin a stop string is held back until it cannot."""

  def __init__(self, tokenizer, stop: Sequence[str] = ()):
    self._detokenizer = Detokenizer(tokenizer)
    self.stop = list(stop)
    self._hold = max(map(len, self.stop), default=1) - 1
    self._pending = ''  # decoded, not handed out
    self.pieces: list[str] = []  # each token's share of the decoded text
    self.length = 0  # characters handed out
    self.stopped = False

  @property
  def tokens(self) -> list[int]:
    return self._detokenizer.tokens

  def add(self, token: int) -> str:
    """The text to hand out now (after it, `stopped` tells whether a stop string ended it)."""
    piece = self._detokenizer.add(token)
    self.pieces.append(piece)
    return self._release(piece, final=False)

  def finish(self) -> str:
    """The text still held, at the end of the tokens."""
    piece = self._detokenizer.flush()
    if self.pieces:
      self.pieces[-1] += piece
    return self._release(piece, final=True)

  def _release(self, piece: str, final: bool) -> str:
    if self.stopped:
      return ''
    before = len(self._pending)
    self._pending += piece
    # A stop string not found before ends in the new piece, if anywhere.
    found = [i for s in self.stop if (i := self._pending.find(s, max(0, before - len(s) + 1))) >= 0]
    if found:
      out, self._pending, self.stopped = self._pending[:min(found)], '', True
    else:
      keep = 0 if final else min(self._hold, len(self._pending))
      out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
    self.length += len(out)
    return out

  def kept_tokens(self) -> int:
    """How many tokens the handed-out text covers: all of them, or after a stop string those
    that start before the cut."""
    if not self.stopped:
      return len(self.pieces)
    start = 0
    for n, piece in enumerate(self.pieces):
      if start >= self.length:
        return n
      start += len(piece)
    return len(self.pieces)
