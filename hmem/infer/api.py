"""The OpenAI completions API as hmem serves it: request bodies, error replies, logprobs.

Bodies are pydantic models that refuse unknown fields (a misspelt one would otherwise be
silently ignored). OpenAI fields hmem does not implement are accepted at their no-op values
(the defaults common client libraries send: `frequency_penalty`/`presence_penalty` 0,
`logit_bias` {}, `suffix` null, `n`/`best_of` 1, any `user`) and refused otherwise, naming
the field. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from hmem.errors import UserError
from hmem.infer.batcher import MAX_TOP_K
from hmem.infer.decoder import MAX_TEMPERATURE
from hmem.infer.source import MODES

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's count; a length that keeps each token's stop check short


class _Body(BaseModel):
  model_config = ConfigDict(extra='forbid')


class StreamOptions(_Body):
  include_usage: bool = False


class CompletionRequest(_Body):
  """POST /v1/completions. `prompt`: a string, a list of strings, a list of token ids or a
  list of such lists (one choice each)."""
  model: str
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int = Field(16, ge=0)
  temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
  top_p: float = Field(1.0, gt=0, le=1)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  seed: int | None = Field(None, ge=0, lt=2**32)
  logprobs: int | None = Field(None, ge=0, le=MAX_TOP_K)
  echo: bool = False
  n: Literal[1] = 1
  best_of: Literal[1] | None = None
  frequency_penalty: float | None = None
  presence_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  suffix: str | None = None
  user: str | None = None
  memory: Literal[MODES] | None = None  # hmem's: default from the model id (fetched for NAME)
  block: list[str] = []
  block_best: bool = False


class TokenizeRequest(_Body):
  """POST /tokenize, as vLLM serves it."""
  prompt: str
  model: str | None = None
  add_special_tokens: bool = True


class DetokenizeRequest(_Body):
  """POST /detokenize, as vLLM serves it."""
  tokens: list[int]
  model: str | None = None


class Invalid(UserError):
  """A request field that cannot be served (HTTP 400, or `status`)."""

  def __init__(self, param: str | None, message: str, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


class NotFound(UserError):
  """A model this server does not serve (HTTP 404)."""


def error(status: int, message: str, param: str | None = None, kind: str = 'invalid_request_error',
          headers: dict | None = None) -> Response:
  """An OpenAI-shaped error. JSON with ASCII escapes: a message may quote text holding lone
  surrogates, which UTF-8 cannot carry."""
  body = json.dumps({'error': {'message': message, 'type': kind, 'param': param, 'code': status}})
  return Response(body, status_code=status, media_type='application/json', headers=headers)


def check_no_ops(body: CompletionRequest) -> None:
  """Raises Invalid for an OpenAI field set to something hmem does not do."""
  for name in ('frequency_penalty', 'presence_penalty'):
    if getattr(body, name) not in (None, 0):
      raise Invalid(name, f'{name}={getattr(body, name)}: hmem applies no penalties; leave it out or send 0')
  if body.logit_bias:
    raise Invalid('logit_bias', 'logit_bias is not supported; leave it out or send {}')
  if body.suffix:
    raise Invalid('suffix', 'suffix (text after the completion) is not supported; leave it out or send null')


def is_text(s: str) -> bool:
  """Whether `s` is valid text (UTF-8 cannot carry a lone surrogate such as "\\ud800")."""
  try:
    s.encode('utf-8')
  except UnicodeEncodeError:
    return False
  return True


def stop_strings(stop: str | list[str] | None) -> list[str]:
  stop = [stop] if isinstance(stop, str) else list(stop or [])
  if len(stop) > MAX_STOPS:
    raise Invalid('stop', f'{len(stop)} stop strings; give at most {MAX_STOPS}')
  for s in stop:
    if not s or len(s) > MAX_STOP_CHARS:
      raise Invalid('stop', f'a stop string of {len(s)} characters; each needs 1 to {MAX_STOP_CHARS}')
    if not is_text(s):
      raise Invalid('stop', f'stop string {s!r} is not valid text (a lone surrogate); send UTF-8 text')
  return stop


def logprobs_object(tokenizer, tokens, pieces, entries, offset: int = 0) -> dict:
  """OpenAI's logprobs of a choice: per token its text, log-probability and the most likely
  alternatives ({text: logprob}, the token itself included), and its character offset.
  `entries`: (logprob, [(id, logprob)]) per token, or None where there is none (an echoed
  prompt's first token)."""
  out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
  for token, piece, entry in zip(tokens, pieces, entries):
    out['tokens'].append(piece)
    out['text_offset'].append(offset)
    offset += len(piece)
    if entry is None:
      out['token_logprobs'].append(None)
      out['top_logprobs'].append(None)
      continue
    value, top = entry
    out['token_logprobs'].append(value)
    alternatives = {tokenizer.decode([i]): v for i, v in top}
    alternatives.setdefault(tokenizer.decode([int(token)]), value)
    out['top_logprobs'].append(alternatives)
  return out
