"""Parameter counts and FLOPs: the one place every printout, test and export takes them from."""

from __future__ import annotations

import math

import jax
from flax import nnx

from hmem.memory.spec import memory_spec


def anchor_param_counts(cfg) -> dict[str, int]:
  """Counts the parameters of the model `build_model(cfg)` would create (abstractly)."""
  from hmem.model import build_model
  abstract = nnx.eval_shape(lambda: build_model(cfg))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  embedding = math.prod(params['embed']['embedding'].shape)
  head = math.prod(params['lm_head']['kernel'].shape) if 'lm_head' in params else 0
  return {'anchor_params': total, 'non_embedding_params': total - embedding - head}


def memory_param_counts(cfg) -> dict[str, int]:
  """fetch_params: what one sequence fetches (the root-to-leaf path); bank_params: all nodes."""
  return dict(memory_spec(cfg).param_counts)


def flops_per_token(cfg, counts: dict[str, int] | None = None) -> float:
  """Training FLOPs per token: 6 (N_non-embedding + V d + fetch) + 6 L T H d_head.

  Each weight costs 2 FLOPs a token forward and 4 backward (the gradients of the
  activations and of the weight). A frozen anchor (`train.freeze_anchor`) computes no
  gradients of its weights: 4 per anchor weight, 6 per fetched memory weight. The
  6 L T H d_head term is causal attention (QK^T and AV, forward and backward, on half the
  T x T scores); the fetched memory adds its width to every memory FFN.
  """
  counts = counts or sizes(cfg)
  m = cfg.model
  anchor = counts['non_embedding_params'] + m.vocab_size * m.d_model
  attention = m.layers * cfg.data.seq_len * m.heads * m.head_dim
  per_anchor_weight = 4.0 if cfg.train.freeze_anchor else 6.0
  return per_anchor_weight * anchor + 6.0 * counts['fetch_params'] + 6.0 * attention


def sizes(cfg) -> dict[str, int]:
  return {**anchor_param_counts(cfg), **memory_param_counts(cfg)}
