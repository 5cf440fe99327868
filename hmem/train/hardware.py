"""What each known accelerator offers per device: memory, dense bf16 peak, memory and
interconnect bandwidth. MFU (train metrics), `hmem plan --target` (whether a step fits the
chip, its roofline) and the benchmarks read this one table. CPUs have no fixed peak:
configure `train.peak_flops` (benchmarks/step.py measures one)."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str               # what users call it (v5p, H100)
  hbm_bytes: int          # memory per device a program may use
  peak_flops: float       # dense bf16 FLOP/s per device
  hbm_bytes_per_s: float  # memory bandwidth per device
  ici_bytes_per_s: float  # interconnect bandwidth per device, all links (TPU ICI, NVLink)


_GIB = 2 ** 30
# TPU kinds as jax names them (a v5p is "TPU v5", a v5e "TPU v5 lite"). hbm_bytes: what the
# TPU compiler (libtpu 0.0.42.1) says a program may use, from its out-of-memory message.
# Peaks and HBM bandwidths: Google Cloud's TPU pages. A v4 device is one of a chip's two
# TensorCores (libtpu's default, no megacore), so it has half of the chip's figures.
TPUS = {
    'TPU v4': Chip('v4', int(15.25 * _GIB), 275e12 / 2, 1228e9 / 2, 300e9 / 2),
    'TPU v5 lite': Chip('v5e', int(15.75 * _GIB), 197e12, 819e9, 200e9),
    'TPU v5': Chip('v5p', int(95.74 * _GIB), 459e12, 2765e9, 600e9),
    'TPU v6 lite': Chip('v6e', int(31.25 * _GIB), 918e12, 1640e9, 448e9),
}
# GPU kinds, matched by a substring of device_kind ("NVIDIA H100 80GB HBM3"), the first match
# winning (A100-SXM4-40GB before A100); vendor figures for SXM parts. ICI: Google Cloud's
# per-chip ICI bandwidth (Gbps / 8); NVLink for GPUs (none on an L4).
GPUS = (
    ('H200', Chip('H200', 141 * 10 ** 9, 989e12, 4.8e12, 900e9)),
    ('H100', Chip('H100', 80 * 10 ** 9, 989e12, 3.35e12, 900e9)),
    ('A100-SXM4-40GB', Chip('A100-40GB', 40 * 10 ** 9, 312e12, 1.555e12, 600e9)),
    ('A100', Chip('A100', 80 * 10 ** 9, 312e12, 2.039e12, 600e9)),
    ('L4', Chip('L4', 24 * 10 ** 9, 121e12, 300e9, 0.0)),
)


def chip(device_kind: str) -> Chip | None:
  """The table's chip for a device kind, or None."""
  if device_kind in TPUS:
    return TPUS[device_kind]
  return next((c for name, c in GPUS if name.lower() in device_kind.lower()), None)


def peak_flops_per_device(configured: float = 0.0, device: jax.Device | None = None) -> float | None:
  """`configured` if set, else the table's figure for this device kind, else None."""
  if configured > 0:
    return configured
  found = chip((device or jax.devices()[0]).device_kind)
  return found.peak_flops if found else None
