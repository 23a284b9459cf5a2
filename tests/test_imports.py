"""Module boundaries and import hygiene (issue 15 items 5 and 8).

No module of `sona_jax` imports or uses another module's private names (`from .x import _y`,
`x._y`): a private name is its module's own, free to change. The check parses the sources with
`ast`, so it sees every use, also in functions that no test calls. And `import sona_jax` does not
import networkx (only the Loop C functions that build graph views do, when called).
"""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "sona_jax"


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _source_module(mod: str, node: ast.ImportFrom, is_package: bool) -> str:
  """The absolute module an `ImportFrom` in `mod` reads from (relative imports resolved)."""
  if node.level == 0:
    return node.module or ""
  base = mod.split(".") if is_package else mod.split(".")[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    head = _dotted(node.value)
    return None if head is None else f"{head}.{node.attr}"
  return None


def private_uses(sources: dict[str, tuple[str, bool]]) -> list[str]:
  """Cross-module private name uses in `{module: (source, is_package)}`: `"module:line: what"`."""
  modules = set(sources)
  found = []
  for mod, (text, is_package) in sorted(sources.items()):
    tree = ast.parse(text)
    aliases: dict[str, str] = {}  # local name -> the package module it is bound to
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.name in modules and a.asname:
            aliases[a.asname] = a.name
          elif a.name in modules:  # `import sona_jax.x` binds `sona_jax`; `sona_jax.x._y` resolves
            aliases[a.name.split(".")[0]] = a.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        src = _source_module(mod, node, is_package)
        if src not in modules:
          continue
        for a in node.names:
          full = f"{src}.{a.name}"
          if full in modules:
            aliases[a.asname or a.name] = full
          elif _private(a.name) and src != mod:
            found.append(f"{mod}:{node.lineno}: from {src} import {a.name}")
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and _private(node.attr):
        owner = _dotted(node.value)
        if owner is None:
          continue
        head, _, rest = owner.partition(".")
        target = aliases.get(head)
        if target is None:
          continue
        target = f"{target}.{rest}" if rest else target
        if target in modules and target != mod:
          found.append(f"{mod}:{node.lineno}: {owner}.{node.attr} (private to {target})")
  return found


def _package_sources() -> dict[str, tuple[str, bool]]:
  return {
    _module_name(p, ROOT): (p.read_text(), p.name == "__init__.py")
    for p in sorted((ROOT / PACKAGE).rglob("*.py"))
  }


def test_no_module_uses_another_modules_private_names():
  offenders = private_uses(_package_sources())
  assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


def test_the_private_name_check_finds_each_kind_of_use():
  sources = {
    "pkg": ("", True),
    "pkg.a": ("_own = 1\n\n\ndef _helper():\n  return _own\n", False),
    "pkg.loops": ("", True),
    "pkg.loops.b": (
      textwrap.dedent(
        """
        from pkg.a import _helper
        from .. import a
        from ..a import _own as own
        import pkg.a
        from pkg import a as alias

        x = a._own + pkg.a._own + alias._helper() + a.public
        """
      ),
      False,
    ),
  }
  found = private_uses(sources)
  assert [f.split(": ", 1)[1] for f in found] == [
    "from pkg.a import _helper",
    "from pkg.a import _own",
    "a._own (private to pkg.a)",
    "pkg.a._own (private to pkg.a)",
    "alias._helper (private to pkg.a)",
  ], found
  assert all(f.startswith("pkg.loops.b:") for f in found)


def test_import_sona_jax_does_not_import_networkx():
  code = "import sys, sona_jax; print('networkx' in sys.modules)"
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "False", "import sona_jax imports networkx"


def _third_party_imports(dirs) -> dict[str, set[str]]:
  """Top-level modules imported by the sources under `dirs`, not stdlib, not local files."""
  files = [p for d in dirs for p in (ROOT / d).rglob("*.py") if "node_modules" not in p.parts]
  # Local modules and packages (e.g. benchmarks/learning/, imported as `learning`).
  local = {PACKAGE} | {p.stem for p in files} | {p.parent.name for p in files}
  found: dict[str, set[str]] = {}
  for path in files:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in local:
          found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
  return found


def test_every_imported_third_party_package_is_declared():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
  declared = {_canonical(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}
  distributions = importlib.metadata.packages_distributions()
  undeclared = {
    module: sorted(files)
    for module, files in _third_party_imports(["sona_jax", "examples", "benchmarks"]).items()
    if not {_canonical(d) for d in distributions.get(module, [])} & declared
  }
  assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()
