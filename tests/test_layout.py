"""The house's layout: which package may import which (docs/DESIGN.md, "Layout"), and no
circle between packages or modules, counting imports inside functions."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Top-level modules every package may use; they import only each other.
BASE = {'errors', 'files', 'config', 'resources', 'sharding', 'schedules', 'hlo', 'compile_cache', 'command', 'paper'}
# What each package (or top-level module) may import besides BASE.
ALLOWED = {
    'model': set(),
    'memory': set(),
    'data': set(),
    'sizes': {'model', 'memory'},
    'train': {'model', 'memory', 'data', 'sizes'},
    'bundle': {'model', 'memory', 'data', 'sizes', 'train', 'weights'},
    'weights': {'model', 'memory', 'data', 'sizes', 'train'},
    'infer': {'model', 'memory', 'data', 'sizes', 'train', 'bundle', 'weights', 'tasks'},
    'tasks': {'data', 'corpora'},
    'plan': {'model', 'memory', 'data', 'sizes', 'train'},
    'corpora': {'data'},
    'sweep': {'model', 'memory', 'data', 'sizes', 'train', 'bundle', 'infer'},
    'quickstart': {'model', 'memory', 'data', 'sizes', 'train', 'bundle', 'infer', 'corpora'},
    'lm_eval_plugin': {'infer'},
    'cli': {'train'},  # and every package's commands module, by name (hmem.cli.COMMANDS)
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in (REPO / 'hmem').rglob('*.py'):
    name = '.'.join(path.relative_to(REPO).with_suffix('').parts)
    out[name.removesuffix('.__init__')] = path
  return out


def _imports(modules) -> dict[str, set[str]]:
  """{module: hmem modules it imports anywhere in its body (functions included)}."""
  graph = {}
  for name, path in modules.items():
    graph[name] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'hmem':
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          graph[name].add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        graph[name].update(a.name for a in node.names if a.name.split('.')[0] == 'hmem')
    graph[name] = {m for m in graph[name] if m in modules and m != name}
  return graph


def _package(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else 'hmem'


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph`, or None."""
  state, path = {}, []

  def visit(v):
    state[v] = 'open'
    path.append(v)
    for w in sorted(graph.get(v, ())):
      if state.get(w) == 'open':
        return path[path.index(w):] + [w]
      if w not in state and (found := visit(w)):
        return found
    state[v] = 'done'
    path.pop()
    return None

  for v in sorted(graph):
    if v not in state and (found := visit(v)):
      return found
  return None


def test_every_package_imports_only_what_the_layout_allows():
  modules = _modules()
  graph = _imports(modules)
  packages = {_package(m) for m in modules} - {'hmem'}
  assert packages <= BASE | set(ALLOWED), f'add {sorted(packages - BASE - set(ALLOWED))} to ALLOWED and DESIGN.md'
  from hmem.cli import COMMANDS
  wrong = []
  for module, targets in graph.items():
    src = _package(module)
    for target in targets:
      dst = _package(target)
      if dst == src or dst == 'hmem':
        continue
      allowed = BASE if src in BASE else BASE | ALLOWED[src]
      if dst not in allowed and not (src == 'cli' and target in COMMANDS):
        wrong.append(f'{module} imports {target}')
  assert not wrong, '\n'.join(wrong)


def test_the_rules_the_design_states():
  """model knows nothing of memory, data or train; memory and data nothing of train;
  nothing imports cli (checked through ALLOWED, so changing it means changing this)."""
  for low in ('model', 'memory', 'data'):
    assert not ALLOWED[low] & {'model', 'memory', 'data', 'train'} - {low}
  assert all('cli' not in allowed for allowed in ALLOWED.values())


def test_no_circle_between_packages_or_modules():
  graph = _imports(_modules())
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))
  packages = {}
  for module, targets in graph.items():
    packages.setdefault(_package(module), set()).update(_package(t) for t in targets if _package(t) != _package(module))
  packages.pop('hmem', None)
  assert _cycle(packages) is None, ' -> '.join(_cycle(packages))


def test_the_checks_catch_what_they_check():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_design_md_lists_every_package():
  design = (REPO / 'docs' / 'DESIGN.md').read_text(encoding='utf-8')
  layout = design[design.index('## Layout'):].split('\n## ')[0]
  for path in sorted((REPO / 'hmem').iterdir()):
    if path.is_dir() and (path / '__init__.py').exists():
      assert f'{path.name}/' in layout, f'docs/DESIGN.md "Layout" does not describe hmem/{path.name}/'


def test_every_package_is_a_regular_package():
  """A directory without __init__.py imports from a source tree (a namespace package) but is
  left out of the wheel (setuptools finds regular packages)."""
  for path in (REPO / 'hmem').rglob('*.py'):
    for parent in path.relative_to(REPO).parents:
      if parent != pathlib.Path('.'):
        assert (REPO / parent / '__init__.py').exists(), f'{parent}/ has no __init__.py'
