"""Peak matmul FLOP/s of known accelerators, for MFU. CPUs have no fixed peak: configure
`train.peak_flops` (benchmarks/step.py measures one)."""

from __future__ import annotations

import jax

# Dense bf16 peak per device (vendor figures), keyed by a substring of device_kind.
_PEAK_BF16 = (
    ('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L4', 121e12),
    ('TPU v6', 918e12), ('TPU v5p', 459e12), ('TPU v5', 197e12), ('TPU v4', 275e12),
)


def peak_flops_per_device(configured: float = 0.0, device: jax.Device | None = None) -> float | None:
  """`configured` if set, else the table's figure for this device kind, else None."""
  if configured > 0:
    return configured
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in _PEAK_BF16:
    if name.lower() in kind.lower():
      return peak
  return None
