"""Every public function of the core modules carries a doctested example (issue 15, item 6).

The suite runs the examples themselves (`--doctest-modules` in pyproject's addopts); this test keeps
them from going missing: a public function added without an `Examples:` section that checks an
output fails here, named. Loop C's modules (`loops/deep.py`, `concepts.py`, `phi.py`) are not
covered yet.
"""

import doctest
import importlib
import inspect
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


def missing_examples(module) -> list[str]:
  found = checked_examples(module)
  return [f for f in public_functions(module) if found.get(f, 0) == 0]


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
