"""Masked next-token cross-entropy over packed documents."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, T-1]: position t predicts token t+1 only inside the same (non-padding) document."""
  return (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1]) & (segment_ids_BxT[:, 1:] != 0)


def next_token_loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array,
                    z_loss: float = 0.0):
  """Returns (objective_sum, nll_sum, count): sums, so micro-batches add up exactly.

  `objective_sum` adds z_loss * logsumexp^2 (PaLM) to the NLL; divide by the total count.
  """
  # All T positions are scored, the last one masked out: slicing [B, T-1, V] off the logits
  # would copy them, and the slice's gradient would be a padded copy of the [B, T, V] gradient.
  logits = logits_BxTxV.astype(jnp.float32)
  targets_BxT = jnp.concatenate([tokens_BxT[:, 1:], tokens_BxT[:, :1]], axis=1)
  mask_BxT = jnp.pad(target_mask(segment_ids_BxT), ((0, 0), (0, 1))).astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  nll_sum = jnp.sum((lse_BxT - target_logit_BxT) * mask_BxT)
  objective_sum = nll_sum + z_loss * jnp.sum(jnp.square(lse_BxT) * mask_BxT)
  return objective_sum, nll_sum, jnp.sum(mask_BxT)
