"""Compile targets of `hmem plan --target`: a TPU topology such as `v5p:4x4x4` (a v5p-128
slice: 64 chips on 16 hosts) or `v5e:16x16`, or N H100s (`h100:64`: 8 hosts of 8), as the
compile-only devices of the TPU or GPU compiler, so that the train step compiles for a pod
on a machine without one.

The TPU compiler is libtpu, from PyPI: `pip install '.[tpu]'` (jax[tpu] at hmem's jax
version). The GPU compiler is jax's CUDA plugin (`pip install 'jax[cuda13]'` at hmem's jax
version, ~4 GB; no GPU or driver needed), given the GPU's description below. jax keeps the
CPU as its default backend (`hmem plan` sets it): nothing runs on these devices, they
only compile.
"""

from __future__ import annotations

import importlib.util
import os

import jax

from hmem.errors import ConfigError
from hmem.train import hardware

EXAMPLES = 'v5e:4x4, v5e:16x16, v5p:4x4x4, v5p:8x8x8, v6e:16x16, h100:8, h100:64'
GPUS_PER_HOST = 8
# An H100 SXM as XLA's GPU compiler describes a device (its GpuTargetConfigProto, text
# format): NVIDIA's published figures (132 SMs, 80 GB at 3.35 TB/s, 50 MB L2, compute
# capability 9.0) and the CUDA limits of that capability.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGETS = {'h100': H100}


def devices(target: str, slices: int = 1) -> list[jax.Device]:
  """The compile-only devices of `target`: a TPU topology (`tpu_devices`) or `GPU:COUNT`."""
  kind, _, count = target.partition(':')
  if kind in GPU_TARGETS:
    if slices != 1:
      raise ConfigError(f'--slices {slices}: slices are a TPU notion; give the GPU count, e.g. {kind}:64')
    return gpu_devices(kind, count)
  return tpu_devices(target, slices)


def gpu_devices(kind: str, count: str) -> list[jax.Device]:
  """COUNT compile-only GPUs of `kind`, 8 to a host (1-8, or a multiple of 8)."""
  n = int(count) if count.isdigit() else 0
  if not (1 <= n <= GPUS_PER_HOST or (n > 0 and n % GPUS_PER_HOST == 0)):
    raise ConfigError(f'--target {kind}:{count}: give a GPU count of 1-{GPUS_PER_HOST} or a multiple of '
                      f'{GPUS_PER_HOST} (GPUs per host), e.g. {kind}:8, {kind}:64')
  hosts, per_host = (1, n) if n <= GPUS_PER_HOST else (n // GPUS_PER_HOST, GPUS_PER_HOST)
  from jax.experimental import topologies
  try:
    found = topologies.get_topology_desc(platform='cuda', target_config=GPU_TARGETS[kind],
                                         topology=f'1x{hosts}x{per_host}')
  except (jax.errors.JaxRuntimeError, RuntimeError, NotImplementedError) as e:
    raise ConfigError(f'--target {kind}:{count} compiles with jax\'s CUDA plugin, which is not usable here '
                      f'({str(e).splitlines()[0][:200]}): pip install "jax[cuda13]" at the installed jax '
                      'version (no GPU needed)') from None
  return list(found.devices)


def tpu_devices(topology: str, slices: int = 1) -> list[jax.Device]:
  """The compile-only devices of `slices` slices of TPU `topology` (chip kind, then the chip
  grid: `v5p:4x4x4`), slice by slice."""
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError(f'--target {topology} compiles with the TPU compiler (libtpu), which is not installed: '
                      "pip install '.[tpu]' (or 'jax[tpu]' at the installed jax version)")
  if slices < 1:
    raise ConfigError(f'--slices {slices}: give 1 or more')
  kind, _, grid = topology.partition(':')
  known = sorted({c.name for c in hardware.TPUS.values()})
  if kind not in known or not grid:
    raise ConfigError(f'--target {topology!r}: give a TPU kind ({", ".join(known)}) and its chip grid, e.g. '
                      f'{EXAMPLES}')
  # Compiling only: no lock on the (absent) TPU, so that several plans and tests run at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  try:
    found = topologies.get_topology_desc(topology_name=topology, platform='tpu', num_slices=slices)
  except jax.errors.JaxRuntimeError as e:
    raise ConfigError(f'--target {topology}: the TPU compiler refuses it ({str(e).splitlines()[0]}); a slice '
                      f'spans whole hosts (v5e and v6e: 2x2 chips each, v5p: 2x2x1), e.g. {EXAMPLES}') from None
  return list(found.devices)
