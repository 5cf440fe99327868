"""Makes `lm_eval --model hmem` find hmem's harness model on lm-eval releases that do not
yet discover models through the `lm_eval.models` entry point (0.4.13 and earlier).

`hmem-lm-eval.pth`, installed beside hmem, calls `install()` at interpreter start; that
only places a finder that waits for `lm_eval.api.registry` to be imported, then registers
`hmem` there as a lazy placeholder (nothing of hmem's is imported until the harness asks
for the model). Releases that read the entry point (setup.cfg) need none of this; a name
already registered is left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

MODEL, TARGET = 'hmem', 'hmem.infer.harness:HarnessLM'
_REGISTRY = 'lm_eval.api.registry'


def register(registry) -> None:
  import lm_eval.models  # noqa: F401  the built-in models, registered first (lm-eval only loads them into an empty registry)
  if MODEL not in registry.model_registry:
    registry.model_registry.register(MODEL, target=TARGET)


class _Finder(importlib.abc.MetaPathFinder):
  """Finds nothing itself; wraps the loader of lm-eval's registry to register hmem after it."""

  def find_spec(self, name, path, target=None):
    if name != _REGISTRY:
      return None
    sys.meta_path.remove(self)  # once; and find_spec below must not come back here
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_and_register(module):
      exec_module(module)
      register(module)

    spec.loader.exec_module = exec_and_register
    return spec


def install() -> None:
  if _REGISTRY in sys.modules:
    register(sys.modules[_REGISTRY])
  elif not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())


if __name__ == '__main__':  # `python -m hmem.lm_eval_plugin ARGS`: lm-eval's own CLI with hmem registered
  install()
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()
