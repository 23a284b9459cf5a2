"""Every public function of the core modules carries a doctested example (issue 15, item 6).

The suite runs the examples themselves (`--doctest-modules` in pyproject's addopts); this test keeps
them from going missing: a public function added without an `Examples:` section that checks an
output fails here, named. The modules are the core ones and Loop C's (`loops/deep/`: the cycle,
one module per phase, and the candidate search and Phi modules they use). A function a module
re-exports from another (`phi.scale_factor` is `phi_model.scale_factor`) is checked where it is
defined.
"""

import doctest
import importlib
import inspect
import sys
import types

import pytest

MODULES = [
  "sona_jax.lora",
  "sona_jax.ewc",
  "sona_jax.router",
  "sona_jax.patterns",
  "sona_jax.graph",
  "sona_jax.loops.instant",
  "sona_jax.loops.background",
  "sona_jax.driver",
  "sona_jax.loops.deep.cycle",
  "sona_jax.loops.deep.consolidation",
  "sona_jax.loops.deep.abstraction",
  "sona_jax.loops.deep.dreams",
  "sona_jax.loops.deep.analogies",
  "sona_jax.loops.deep.domains",
  "sona_jax.loops.deep.compression",
  "sona_jax.loops.deep.candidates",
  "sona_jax.loops.deep.phi",
  "sona_jax.loops.deep.phi_model",
  "sona_jax.loops.deep.phi_search",
]


def public_functions(module) -> list[str]:
  """The public functions of `module`: its `__all__`, else its non-underscore names defined in it
  (jitted functions count: they are callables), and the public methods its public classes define
  (`Sona.observe`; classmethods too, properties and inherited methods not)."""
  names = getattr(module, "__all__", None)
  if names is None:
    names = [
      n
      for n, v in vars(module).items()
      if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    ]
  out = []
  for name in names:
    value = getattr(module, name)
    if not inspect.isclass(value):
      if callable(value):
        out.append(name)
      continue
    if value.__module__ != module.__name__:
      continue
    for attr, member in vars(value).items():
      if attr.startswith("_"):
        continue
      if inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)):
        out.append(f"{name}.{attr}")
  return out


def checked_examples(module) -> dict[str, int]:
  """Per name, how many of its doctest examples compare an output (what doctest runs and checks)."""
  found = {}
  for test in doctest.DocTestFinder().find(module):
    name = test.name.removeprefix(module.__name__ + ".")
    found[name] = sum(1 for ex in test.examples if ex.want.strip())
  return found


def home(module, name: str) -> tuple[types.ModuleType, str]:
  """Where the example of `module.name` lives: a function re-exported from another module is
  checked in the module that defines it, under the name it has there (doctest finds a function
  only in its own module)."""
  value = getattr(module, name.split(".")[0])
  where = getattr(value, "__module__", None)
  if inspect.isclass(value) or where in (None, module.__name__) or where not in sys.modules:
    return module, name
  return sys.modules[where], getattr(value, "__name__", name)


def missing_examples(module) -> list[str]:
  found = {}
  missing = []
  for name in public_functions(module):
    where, where_name = home(module, name)
    if where.__name__ not in found:
      found[where.__name__] = checked_examples(where)
    if found[where.__name__].get(where_name, 0) == 0:
      missing.append(name)
  return missing


@pytest.mark.parametrize("name", MODULES)
def test_every_public_function_has_a_checked_example(name):
  module = importlib.import_module(name)
  assert public_functions(module), f"{name}: no public function found (the listing is broken)"
  missing = missing_examples(module)
  assert not missing, (
    f"{name}: public functions without a doctest example that checks an output (an `Examples:`"
    f" section with `>>>` lines and their expected output): {', '.join(missing)}"
  )


def test_the_check_flags_missing_and_unchecked_examples():
  module = types.ModuleType("fake_module")
  source = '''
__all__ = ["checked", "unchecked", "bare", "Thing"]

def checked():
  """Examples:
    >>> 1 + 1
    2
  """

def unchecked():
  """Examples:
    >>> x = 1 + 1
  """

def bare():
  """No example."""

class Thing:
  """A class: its public methods count, its properties and private methods do not."""

  def method(self):
    """No example."""

  @classmethod
  def make(cls):
    """Examples:
      >>> Thing.make() is None
      True
    """

  @property
  def value(self):
    """No example."""

  def _private(self):
    """No example."""
'''
  exec(compile(source, "fake_module.py", "exec"), module.__dict__)
  for name in ("checked", "unchecked", "bare", "Thing"):
    getattr(module, name).__module__ = module.__name__
  assert public_functions(module) == ["checked", "unchecked", "bare", "Thing.method", "Thing.make"]
  assert missing_examples(module) == ["unchecked", "bare", "Thing.method"]


def test_a_re_exported_function_is_checked_where_it_is_defined(monkeypatch):
  source_module = types.ModuleType("fake_source")
  source = '''
def documented():
  """Examples:
    >>> documented() is None
    True
  """

def undocumented():
  """No example."""
'''
  exec(compile(source, "fake_source.py", "exec"), source_module.__dict__)
  for name in ("documented", "undocumented"):
    getattr(source_module, name).__module__ = source_module.__name__
  monkeypatch.setitem(sys.modules, source_module.__name__, source_module)
  module = types.ModuleType("fake_reexport")  # `from fake_source import documented, undocumented`
  module.__all__ = ["documented", "undocumented"]
  module.documented = source_module.documented
  module.undocumented = source_module.undocumented
  assert missing_examples(module) == ["undocumented"]
  # The real case: `phi` re-exports `scale_factor`, whose example is in `phi_model`.
  phi = importlib.import_module("sona_jax.loops.deep.phi")
  assert "scale_factor" in public_functions(phi)
  assert home(phi, "scale_factor")[0].__name__ == "sona_jax.loops.deep.phi_model"
