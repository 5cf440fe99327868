"""`hmem plan`: per-device memory, collectives and FLOPs of a train step on N devices."""

from __future__ import annotations

import json
import sys

from hmem import command


def _plan(args, cfg):
  from hmem import compile_cache
  from hmem.errors import ConfigError
  from hmem.plan import plan, targets
  if (args.devices is None) == (args.target is None):
    raise ConfigError('hmem plan: give --devices N (fake CPU devices, or --platform\'s) or --target TOPOLOGY '
                      f'(a TPU topology: {targets.EXAMPLES}), not both')
  # The TPU compiler's devices are compile-only: jax keeps the CPU as its default backend,
  # and no persistent cache (jax cannot load a compile-only executable back from it).
  plan.use_fake_devices(args.devices or 1, 'cpu' if args.target else args.platform)
  if not args.target:
    compile_cache.enable(cfg)
  import jax

  if args.target:
    devices = targets.devices(args.target, args.slices)
  else:
    try:
      devices = jax.devices()
    except RuntimeError as e:  # no backend for --platform on this machine
      raise ConfigError(f'--platform {args.platform}: no such devices here ({str(e).splitlines()[0]}); '
                        'use --platform cpu to plan on fake devices') from None
    if len(devices) < args.devices:
      raise ConfigError(f'--devices={args.devices} but {len(devices)} {args.platform} devices are present; '
                        'use --platform cpu to plan on fake devices')
    devices = devices[:args.devices]
  budget = int(args.memory_gb * 1e9) if args.memory_gb else None
  model_time = devices[0].platform == 'tpu'  # XLA has a cost model for TPUs only
  if not args.search:
    out = plan.plan(cfg, devices, budget, model_time=model_time)
    _print_plan(out)
    if out['fits']:
      print(json.dumps(out))
      return
    total = out['bytes_per_device'].get('total')
    print(f'hmem: {_gb(total)} per device does not fit {_gb(out["budget_bytes"])}; searching layouts',
          file=sys.stderr)
  best, tried = plan.search(cfg, devices, budget, model_time=model_time,
                            progress=lambda flags: print(f'hmem: trying {flags}', file=sys.stderr))
  where = f'{len(devices)} devices' + (f' of {args.target}' if args.target else '')
  if best is None:
    smallest = min((t['total'] for t in tried if t.get('total')), default=None)
    least = f' (the least: {_gb(smallest)})' if smallest else ''
    raise ConfigError(f'no data/fsdp layout and remat policy fits {_gb(plan.device_budget(devices, budget))} per '
                      f'device on {where}{least}; add devices, or lower train.batch_size and raise '
                      'train.grad_accum')
  _print_plan(best)
  print(f'fits {_gb(best["budget_bytes"])} per device on {where} with: {" ".join(best["flags"])}')
  print(json.dumps({**best, 'searched': tried}))


def _gb(nbytes) -> str:
  return 'an unknown size (the compiler refused it)' if nbytes is None else f'{nbytes / 1e9:.1f} GB'


def _print_plan(out: dict) -> None:
  print(f'{"devices":<28} {out["devices"]} x {out["device_kind"]} on {out["hosts"]} host(s), mesh '
        + ' x '.join(f'{k} {v}' for k, v in out['mesh'].items()))
  for part, nbytes in out['bytes_per_device'].items():
    print(f'{part + " per device":<28} {nbytes / 2**30:12.4f} GiB')
  if 'compiler_error' in out:
    print(f'{"does not fit":<28} {out["compiler_error"]}')
  for kind, nbytes in sorted(out['collective_bytes'].items()):
    print(f'{kind + " per step":<28} {nbytes / 2**30:12.4f} GiB')
  print(f'{"FLOPs per step":<28} {out["flops_per_step"]:.4e}')
  modeled = out.get('modeled')
  if modeled and 'error' in modeled:
    print(f'{"step time":<28} not modeled: {modeled["error"]}')
    if 'compute_s' in modeled:
      print(f'{"roofline time":<28} {max(modeled["compute_s"], modeled["memory_s"]):12.4f} s   (the larger of the '
            "cost analysis's FLOPs over the chip's peak and its bytes over HBM bandwidth)")
  elif modeled:
    print(f'{"step time":<28} {modeled["step_s"]:12.4f} s   ({modeled["source"]})')
    print(f'{"tokens/s per chip":<28} {modeled["tokens_per_s_per_chip"]:12.0f}     (modeled)')
    print(f'{"MFU":<28} {modeled["mfu"]:12.1%}     (modeled)')


def register(sub) -> None:
  p = command.add(sub, 'plan', _plan, 'per-device memory, collectives and FLOPs of a train step on N devices '
                  'or a TPU topology')
  p.add_argument('--devices', type=int, help='devices to plan for (fake CPU devices by default)')
  p.add_argument('--platform', default='cpu', help='with --devices: cpu (fake devices) or the platform of the '
                 'devices present')
  p.add_argument('--target', help='a TPU topology to compile for with the TPU compiler, no TPU needed '
                 "(pip install '.[tpu]'): v5e:16x16, v5p:4x4x4, v6e:16x16, ...; adds the step time of XLA's "
                 "TPU cost model (modeled, not measured). Or GPUs with jax's CUDA plugin, no GPU needed: h100:8, "
                 'h100:64 (8 a host)')
  p.add_argument('--slices', type=int, default=1, help='with --target: that many slices (multi-slice)')
  p.add_argument('--memory-gb', type=float, help='memory per device to fit in (GB, 1e9 bytes); default: the '
                 "target chip's memory, else 80")
  p.add_argument('--search', action='store_true', help='find the cheapest data/fsdp layout and remat policy that '
                 'fits (also done when the given layout does not fit) and print its flags')
