"""Building blocks of the anchor: norms, rotary embeddings, the SwiGLU FFN (with memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmem.errors import ConfigError


@jax.custom_vjp
def dense(x_MxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """x @ w with a weight gradient laid out for XLA:CPU's fast matmul path.

  XLA's own transpose computes dW = x^T g as a dot contracting both operands' leading
  (token) axis: XLA:CPU does not hand that form to its YNNPACK matmul, so it falls back to a
  slower dot and fuses a transpose of g into g's elementwise producer (the SwiGLU gradient,
  the softmax-minus-one-hot of the loss), which inside a layer scan also reads the stacked
  residuals through dynamic slices: strided, cache-hostile loops. Here the smaller of x and
  g is transposed on its own (the barrier stops XLA folding the transpose back into the dot),
  so every gradient dot is a plain [m, k] x [k, n] matmul and g keeps its natural layout.
  """
  return x_MxI @ w_IxO


def _dense_fwd(x_MxI, w_IxO):
  return x_MxI @ w_IxO, (x_MxI, w_IxO)


def _dense_bwd(res, g_MxO):
  x_MxI, w_IxO = res
  dx_MxI = jax.lax.dot_general(g_MxO, w_IxO, (((1,), (1,)), ((), ())))
  if w_IxO.shape[0] <= w_IxO.shape[1]:
    dw_IxO = jax.lax.optimization_barrier(x_MxI.T) @ g_MxO
  else:
    dw_IxO = (jax.lax.optimization_barrier(g_MxO.T) @ x_MxI).T
  return dx_MxI, dw_IxO


dense.defvjp(_dense_fwd, _dense_bwd)


def linear(layer: nnx.Linear, x_BxTxI: jax.Array) -> jax.Array:
  """`layer(x)` for an nnx.Linear. On CPU through `dense` (same forward, faster gradient);
  GPU and TPU compilers lay out transposed dots well, so they get plain autodiff."""
  if jax.default_backend() != 'cpu':
    return layer(x_BxTxI)
  dtype = layer.dtype or jnp.result_type(x_BxTxI, layer.kernel[...])
  w_IxO = layer.kernel[...].astype(dtype)
  y_MxO = dense(x_BxTxI.reshape(-1, x_BxTxI.shape[-1]).astype(dtype), w_IxO)
  if layer.bias is not None:
    y_MxO = y_MxO + layer.bias[...].astype(dtype)
  return y_MxO.reshape(*x_BxTxI.shape[:-1], w_IxO.shape[1])


def dense_init(std: float, axes: tuple[str, ...]):
  return nnx.with_partitioning(nnx.initializers.truncated_normal(std), axes)


def make_norm(kind: str, features: int, eps: float, dtype, param_dtype, axis: str, rngs: nnx.Rngs):
  """Gain-only LayerNorm (no bias, as in OpenLM) or RMSNorm over the last axis."""
  scale_init = nnx.with_partitioning(nnx.initializers.ones_init(), (axis,))
  if kind == 'layernorm':
    return nnx.LayerNorm(features, epsilon=eps, use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, scale_init=scale_init, rngs=rngs)
  if kind == 'rmsnorm':
    return nnx.RMSNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                       scale_init=scale_init, rngs=rngs)
  raise ConfigError(f"model.norm={kind!r} is not a norm; use 'layernorm' or 'rmsnorm'")


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
  """Position of each token inside its packed document: restarts at 0 at every new segment."""
  T = segment_ids_BxT.shape[-1]
  idx_T = jnp.arange(T, dtype=jnp.int32)
  starts_BxT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], bool),
       segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_idx_BxT = jax.lax.cummax(jnp.where(starts_BxT, idx_T, 0), axis=1)
  return idx_T - start_idx_BxT


ROPE_SCALINGS = ('none', 'linear', 'llama3')


def rope_scaling(cfg) -> tuple:
  """`cfg.rope_scaling` (a model config's) as the hashable tuple `apply_rope` takes."""
  s = cfg.rope_scaling
  if s.type not in ROPE_SCALINGS:
    raise ConfigError(f'model.rope_scaling.type={s.type!r} is not implemented; use one of {ROPE_SCALINGS}')
  if s.type == 'none':
    return ()
  if s.type == 'llama3' and not s.high_freq_factor > s.low_freq_factor:
    raise ConfigError(f'model.rope_scaling.high_freq_factor={s.high_freq_factor} must exceed '
                      f'low_freq_factor={s.low_freq_factor}')
  return (s.type, float(s.factor), float(s.low_freq_factor), float(s.high_freq_factor),
          float(s.original_max_positions))


def rope_frequencies(head_dim: int, base: float, scaling: tuple = ()) -> np.ndarray:
  """The H/2 rotation frequencies base^(-2i/H), rescaled as `scaling` says (fp32)."""
  inv_freq = base ** (-np.arange(0, head_dim // 2, dtype=np.float64) / (head_dim // 2))
  if not scaling:
    return inv_freq.astype(np.float32)
  kind, factor, low, high, original = scaling
  if kind == 'linear':
    return (inv_freq / factor).astype(np.float32)
  # llama3: wavelengths longer than original/low are divided by `factor`, those shorter than
  # original/high are kept, and the ones between interpolate linearly in original/wavelength.
  wavelen = 2 * np.pi / inv_freq
  smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
  return ((1 - smooth) * inv_freq / factor + smooth * inv_freq).astype(np.float32)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, base: float, scaling: tuple = ()) -> jax.Array:
  """Rotary embedding on pairs (i, i + H/2) of each head (the Hugging Face Llama layout),
  computed in fp32; `scaling` comes from `rope_scaling`."""
  H = x_BxTxNxH.shape[-1]
  inv_freq = jnp.asarray(rope_frequencies(H, base, scaling))
  angle_BxTxF = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angle_BxTxF)[:, :, None], jnp.cos(angle_BxTxF)[:, :, None]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def lora_delta(x_BxTxI: jax.Array, memory: dict | None, target: str, alpha: float, dtype):
  """A per-sequence LoRA memory's output for weight `target`, or 0 when there is none.

  `lora_{target}_a` [B, r, in] and `lora_{target}_b` [B, r, out] (B starts at zero);
  scale alpha / r with r the concatenated rank of the fetched path.
  """
  if memory is None or f'lora_{target}_a' not in memory:
    return 0.0
  a_BxRxI = memory[f'lora_{target}_a'].astype(dtype)
  b_BxRxO = memory[f'lora_{target}_b'].astype(dtype)
  h_BxTxR = jnp.einsum('bti,bri->btr', x_BxTxI.astype(dtype), a_BxRxI)
  return jnp.einsum('btr,bro->bto', h_BxTxR, b_BxRxO) * (alpha / a_BxRxI.shape[1])


class SwiGLU(nnx.Module):
  """`down(silu(gate x) * up x)`, optionally widened per sequence by a fetched memory.

  FFN memory adds r hidden units whose weights differ per sequence: `ffn_gate`/`ffn_up`/
  `ffn_down` [B, r, d]; a zero `ffn_down` makes it an exact no-op (the memory init).
  LoRA memory on the FFN adds low-rank deltas to gate, up and down.
  """

  def __init__(self, d: int, hidden: int, std: float, out_std: float, dtype, param_dtype, lora_alpha: float,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = nnx.Linear(d, hidden, kernel_init=dense_init(std, ('embed', 'mlp')), **kw)
    self.up = nnx.Linear(d, hidden, kernel_init=dense_init(std, ('embed', 'mlp')), **kw)
    self.down = nnx.Linear(hidden, d, kernel_init=dense_init(out_std, ('mlp', 'embed')), **kw)
    self.dtype = dtype
    self.lora_alpha = lora_alpha

  def __call__(self, x_BxTxD: jax.Array, memory: dict | None = None) -> jax.Array:
    lora = lambda x, target: lora_delta(x, memory, target, self.lora_alpha, self.dtype)
    g_BxTxF = linear(self.gate, x_BxTxD) + lora(x_BxTxD, 'gate')
    u_BxTxF = linear(self.up, x_BxTxD) + lora(x_BxTxD, 'up')
    h_BxTxF = jax.nn.silu(g_BxTxF) * u_BxTxF
    y_BxTxD = linear(self.down, h_BxTxF) + lora(h_BxTxF, 'down')
    if memory is not None and 'ffn_gate' in memory:
      x = x_BxTxD.astype(self.dtype)
      g_BxTxR = jnp.einsum('btd,brd->btr', x, memory['ffn_gate'].astype(self.dtype))
      u_BxTxR = jnp.einsum('btd,brd->btr', x, memory['ffn_up'].astype(self.dtype))
      y_BxTxD = y_BxTxD + jnp.einsum('btr,brd->btd', jax.nn.silu(g_BxTxR) * u_BxTxR,
                                     memory['ffn_down'].astype(self.dtype))
    return y_BxTxD
