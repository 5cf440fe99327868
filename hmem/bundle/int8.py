"""int8 bank rows: each unit's values and its float32 scale in one chunk, dequantized on the device.

Symmetric quantization with one scale per row, layer and unit (the unit's feature vector:
the output feature of gate/up, LoRA A and KV keys), so one large unit does not coarsen the
others. A stored row is int8 [layers_m, width, features + 4]: the unit's values, then its
scale's four bytes (little-endian float32). Values and scales thus travel in one chunk (a
path reads as many chunks as a bfloat16 bundle, half the bytes), the row cache holds the
packed bytes (twice the rows of bfloat16 in the same budget), and the multiply happens in
the jitted code that puts a block on the device (`unpack`), not on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCALE_BYTES = 4  # a float32 scale after each unit's values


def stored_shape(shape) -> list[int]:
  """The stored shape of an array of logical shape [..., features]."""
  return [*shape[:-1], shape[-1] + SCALE_BYTES]


def quantize(rows: np.ndarray) -> np.ndarray:
  """fp32 rows [..., features] -> packed int8 [..., features + 4]."""
  scale = (np.abs(rows).max(axis=-1, keepdims=True) / 127).astype('<f4')
  q = np.divide(rows, scale, out=np.zeros(rows.shape, np.float32), where=scale > 0)
  return np.concatenate([np.rint(q).astype(np.int8), scale.view(np.int8)], axis=-1)


def unpack(packed: jax.Array, dtype) -> jax.Array:
  """Packed int8 [..., features + 4] -> `dtype` [..., features] (traceable: runs on the device)."""
  scale = jax.lax.bitcast_convert_type(packed[..., -SCALE_BYTES:], jnp.float32)[..., None]
  return (packed[..., :-SCALE_BYTES].astype(jnp.float32) * scale).astype(dtype)
