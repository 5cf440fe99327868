"""`hmem plan`: per-device memory, collectives and FLOPs of a train step on N devices."""

from __future__ import annotations

import json
import sys

from hmem import command


def _plan(args, cfg):
  from hmem import compile_cache
  from hmem.plan import plan
  plan.use_fake_devices(args.devices, args.platform)
  compile_cache.enable(cfg)
  import jax

  from hmem.errors import ConfigError
  try:
    devices = jax.devices()
  except RuntimeError as e:  # no backend for --platform on this machine
    raise ConfigError(f'--platform {args.platform}: no such devices here ({str(e).splitlines()[0]}); '
                      'use --platform cpu to plan on fake devices') from None
  if len(devices) < args.devices:
    raise ConfigError(f'--devices={args.devices} but {len(devices)} {args.platform} devices are present; '
                      'use --platform cpu to plan on fake devices')
  devices, budget = devices[:args.devices], int(args.memory_gb * 1e9)
  if not args.search:
    out = plan.plan(cfg, devices, budget)
    _print_plan(out)
    if out['fits']:
      print(json.dumps(out))
      return
    print(f'hmem: {out["bytes_per_device"]["total"] / 1e9:.1f} GB per device does not fit --memory-gb='
          f'{args.memory_gb:g}; searching layouts', file=sys.stderr)
  best, tried = plan.search(cfg, devices, budget, progress=lambda flags: print(f'hmem: trying {flags}',
                                                                              file=sys.stderr))
  if best is None:
    smallest = min((t['total'] for t in tried if 'total' in t), default=None)
    least = f' (the least: {smallest / 1e9:.1f} GB)' if smallest else ''
    raise ConfigError(f'no data/fsdp layout and remat policy fits {args.memory_gb:g} GB per device on '
                      f'{args.devices} devices{least}; add devices, or lower train.batch_size and raise '
                      'train.grad_accum')
  _print_plan(best)
  print(f'fits {args.memory_gb:g} GB per device with: {" ".join(best["flags"])}')
  print(json.dumps({**best, 'searched': tried}))


def _print_plan(out: dict) -> None:
  for part, nbytes in out['bytes_per_device'].items():
    print(f'{part + " per device":<28} {nbytes / 2**30:12.4f} GiB')
  for kind, nbytes in sorted(out['collective_bytes'].items()):
    print(f'{kind + " per step":<28} {nbytes / 2**30:12.4f} GiB')
  print(f'{"FLOPs per step":<28} {out["flops_per_step"]:.4e}')


def register(sub) -> None:
  p = command.add(sub, 'plan', _plan, 'per-device memory, collectives and FLOPs of a train step on N devices')
  p.add_argument('--devices', type=int, required=True, help='devices to plan for (fake CPU devices by default)')
  p.add_argument('--platform', default='cpu', help='cpu (fake devices) or the platform of the devices present')
  p.add_argument('--memory-gb', type=float, default=80.0, help='memory per device to fit in (GB, 1e9 bytes)')
  p.add_argument('--search', action='store_true', help='find the cheapest data/fsdp layout and remat policy that '
                 'fits --memory-gb (also done when the given layout does not fit) and print its flags')
