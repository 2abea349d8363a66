"""The package's shape: no import cycles, and no generic module that names a task or an objective.

Each backbone family, objective and task is one module the generic code calls without naming it;
these checks read the source (nothing is run), so they fail as soon as someone branches on a name.
"""
import ast
import os

import pytest

from sapiens_jax import objectives
from sapiens_jax import tasks

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sapiens_jax")
GENERIC = ("train", "step", "evaluate", "predict", "visualize", "baselines", "checkpoint", "dry_run", "export",
           "init_from", "optim", "data/pipeline", "data/convert", "data/inspect")


def modules():
  """{dotted module name: path} of every module of the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def imports(module, path, known):
  """The package modules `module` imports (at any depth of its code); `from pkg import mod` counts as
  importing mod, not pkg."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
               for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name not in (module, "sapiens_jax"):
        out.add(name)
  return out


def test_no_import_cycles():
  known = modules()
  graph = {m: imports(m, p, known) for m, p in known.items()}
  cycles = []
  state = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        cycles.append(path[path.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
  """The check above, on a tiny package with a -> b -> a: it must fail."""
  package = tmp_path / "sapiens_jax"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "a.py").write_text("from sapiens_jax import b\n")
  (package / "b.py").write_text("def f():\n  from sapiens_jax import a\n")
  monkeypatch.setattr(__import__(__name__), "PACKAGE", str(package))
  with pytest.raises(AssertionError, match="sapiens_jax.a -> sapiens_jax.b -> sapiens_jax.a"):
    test_no_import_cycles()


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_name_no_task_and_no_objective(module):
  names = set(tasks.TASKS) | set(objectives.OBJECTIVES) - {"finetune"}
  source = open(os.path.join(PACKAGE, module + ".py")).read()
  named = sorted({node.value for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Constant) and node.value in names})
  quoted = sorted(name for name in names if f'"{name}"' in source or f"'{name}'" in source)
  assert not named and not quoted, f"sapiens_jax/{module}.py names {named or quoted}"
