"""Checkpoints from an untrusted source: a crafted one gives a clear error and loads nothing.

A checkpoint directory is data an attacker can write: the orbax array store (written here with
orbax itself, as an attacker would), the JSON metadata of `sona_jax.checkpoint`, and orbax's own
JSON files. Restoring must never run code (no pickle, no eval, no import of a module named in a
file), must refuse a state tree with wrong shapes, dtypes, extra or missing leaves with a
`ValueError` naming the leaf, and must refuse malformed metadata (a damaged step is skipped with a
warning when an older good step exists, else a `RuntimeError`). Either way the crafted data never
becomes a driver's state, and the directory is left as it was.

The checks run against both checkpointers: `Checkpointer` (through the driver, which uses it) and
`TenantCheckpointer` (tenant-stacked states), which share one implementation.
"""

import ast
import builtins
import hashlib
import json
import marshal
import math
import os
import pathlib
import pickle
import re
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import sona_jax as sona
from sona_jax import tenants
from sona_jax.checkpoint import Checkpointer, TenantCheckpointer

CFG = sona.SonaConfig(
  dim=8,
  base_rank=4,
  graph_capacity=16,
  graph_degree=4,
  signal_capacity=8,
  trajectory_capacity=8,
  bank_capacity=4,
  probe_capacity=4,
)
NOW = 1_700_000_000.0
PACKAGE = pathlib.Path(sona.__file__).resolve().parent


def _clock():
  return NOW + 10.0


N_TENANTS = 2
KINDS = ["one state", "tenants"]


def _state(seed=0):
  return sona.init_state(CFG, jax.random.key(seed))


def _tenant_states(seed=0):
  return tenants.init_tenants(CFG, jax.random.key(seed), N_TENANTS)


def _good_metadata(step: int, kind: str = "one state") -> dict:
  m = dict(config=CFG.to_dict(), version=sona.__version__, time_origin=NOW, step=step, extra={})
  return m if kind == "one state" else m | {"n_tenants": N_TENANTS}


def _craft(directory, step: int, tree, metadata) -> None:
  """Writes checkpoint `step` with orbax directly: any pytree, any JSON metadata."""
  manager = ocp.CheckpointManager(
    os.fspath(directory),
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "metadata": ocp.JsonCheckpointHandler(),
    },
  )
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree), metadata=ocp.args.JsonSave(metadata)
    ),
  )
  manager.wait_until_finished()
  manager.close()


def _digest(directory) -> str:
  """A hash of every file name and content under `directory`."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, directory).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def _assert_bit_identical(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _checkpointer_restore(directory, **kwargs):
  with Checkpointer(directory) as ck:
    return ck.restore(**kwargs)


def _restore_both(directory):
  """Restores with the checkpointer and with the driver; returns the two outcomes (results or
  exceptions)."""
  out = []
  for restore in (
    lambda: _checkpointer_restore(directory),
    lambda: sona.Sona.restore(os.fspath(directory), clock=_clock),
  ):
    try:
      out.append(restore())
    except Exception as e:  # noqa: BLE001 (the outcome is what is asserted)
      out.append(e)
  return out


# ----------------------------------------------------------------------------- crafted state trees


def _as_dict(nt):
  return dict(nt._asdict())


def _lead(kind: str) -> str:
  """The shape prefix of a leaf in the error messages: the tenant axis for tenant states."""
  return "" if kind == "one state" else f"{N_TENANTS}, "


def _full(state, shape, dtype):
  """An array of `shape` behind the state's batch axes (none, or the tenant axis)."""
  batch = state.metrics.counters.shape[:-1]
  return jnp.zeros(batch + shape, dtype)


CRAFTED_TREES = {
  "float64 leaf": (
    lambda st: st._replace(micro=st.micro._replace(a=np.asarray(st.micro.a, np.float64))),
    r"micro\.a: float64\[{L}8, 2\], expected float32\[{L}8, 2\]",
  ),
  "wrong shape": (
    lambda st: st._replace(micro=st.micro._replace(a=_full(st, (9, 2), jnp.float32))),
    r"micro\.a: float32\[{L}9, 2\], expected float32\[{L}8, 2\]",
  ),
  "extra leaf": (
    lambda st: st._replace(micro=_as_dict(st.micro) | {"payload": jnp.zeros(3, jnp.float32)}),
    r"micro\.payload: unexpected leaf",
  ),
  "missing leaf": (
    lambda st: st._replace(micro={"a": st.micro.a}),
    r"micro\.b: missing",
  ),
  "counters as float": (
    lambda st: st._replace(metrics=st.metrics._replace(counters=_full(st, (4,), jnp.float32))),
    r"metrics\.counters: float32\[{L}4\], expected int32\[{L}4\]",
  ),
  "bool as int8": (
    lambda st: st._replace(bank=st.bank._replace(alive=_full(st, (CFG.bank_capacity,), jnp.int8))),
    r"bank\.alive: int8\[{L}4\], expected bool\[{L}4\]",
  ),
  "scalar for an array": (
    lambda st: st._replace(router_proj=jnp.float32(1.0)),
    r"router_proj: float32\[\], expected float32\[{L}8, 16\]",
  ),
  "flat list of leaves": (
    lambda st: list(jax.tree.leaves(st)),
    r"bank\.access_count: missing",
  ),
  "wider key data": (
    lambda st: st._replace(key=_full(st, (4,), jnp.uint32)),
    r"key: uint32\[{L}4\], expected uint32\[{L}2\]",
  ),
}


def _restore_kind(kind: str, directory):
  """Restores `directory` as a user of `kind` would: the driver, or a `TenantCheckpointer`."""
  if kind == "one state":
    return sona.Sona.restore(os.fspath(directory), clock=_clock)  # it calls Checkpointer.restore
  with TenantCheckpointer(directory) as ck:
    return ck.restore()


@pytest.fixture(scope="module")
def good_step_1(tmp_path_factory):
  """Directories holding one good checkpoint, step 1, of each kind."""
  out = {}
  for kind, states in (("one state", _state(seed=1)), ("tenants", _tenant_states(seed=1))):
    out[kind] = tmp_path_factory.mktemp("good_step_1")
    _craft(out[kind], 1, states, _good_metadata(1, kind))
  return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CRAFTED_TREES), ids=list(CRAFTED_TREES))
def test_crafted_state_tree_is_a_clear_error_and_loads_nothing(tmp_path, good_step_1, case, kind):
  make, match = CRAFTED_TREES[case]
  d = tmp_path / "ck"
  shutil.copytree(good_step_1[kind], d)  # an older good step, which must not be used silently
  good = _state() if kind == "one state" else _tenant_states()
  _craft(d, 2, make(good), _good_metadata(2, kind))
  before = _digest(d)
  with pytest.raises(ValueError, match=r"checkpoint step 2 .*does not match") as err:
    _restore_kind(kind, d)
  assert re.search(match.replace("{L}", _lead(kind)), str(err.value)), str(err.value)
  assert _digest(d) == before


# -------------------------------------------------------------------------- malformed metadata


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  """A driver checkpoint (step 0) with the driver's schedule in `extra`."""
  d = tmp_path_factory.mktemp("good")
  engine = sona.Sona(CFG, key=jax.random.key(0), checkpoint_dir=os.fspath(d), clock=lambda: NOW)
  engine.save()
  engine.wait_checkpoints()
  return d


@pytest.fixture(scope="module")
def good_dirs(good_dir, tmp_path_factory):
  """A good step 0 of each kind: the driver's, and tenant states saved by `TenantCheckpointer`."""
  d = tmp_path_factory.mktemp("good_tenants")
  with TenantCheckpointer(d, async_save=False) as ck:
    ck.save(0, _tenant_states(seed=4), CFG, time_origin=NOW)
  return {"one state": good_dir, "tenants": d}


_GOOD_STATES = {}


def _good_state(d, checkpointer=Checkpointer):
  if d not in _GOOD_STATES:
    with checkpointer(d) as ck:
      _GOOD_STATES[d] = ck.restore()[0]
  return _GOOD_STATES[d]


def _metadata_path(d, step):
  return pathlib.Path(d) / str(step) / "metadata" / "metadata"


def _mutated(good: dict, mutate):
  m = json.loads(json.dumps(good))
  out = mutate(m)
  return m if out is None else out


# Metadata the checkpointer itself must refuse (the step counts as damaged).
DAMAGED_METADATA = {
  "not json": b"\x00\x01garbage{",
  "a list": [1, 2],
  "null": None,
  "no config": lambda m: m.pop("config"),
  "config with an unknown field": lambda m: m["config"].update(exec="print(1)"),
  "config field of the wrong type": lambda m: m["config"].update(dim="8"),
  "config not finite": lambda m: m["config"].update(micro_lr=math.nan),
  "config a list": lambda m: m.update(config=[8]),
  "step mismatch": lambda m: m.update(step=7),
  "nested 100,000 deep": "deep",
}
# Metadata of tenant checkpoints only: the number of tenants that sizes the target.
DAMAGED_TENANT_METADATA = {
  "n_tenants missing": lambda m: m.pop("n_tenants"),
  "n_tenants a string": lambda m: m.update(n_tenants="2"),
  "n_tenants zero": lambda m: m.update(n_tenants=0),
  "n_tenants true": lambda m: m.update(n_tenants=True),
}
METADATA_CASES = [(k, c) for k in KINDS for c in DAMAGED_METADATA] + [
  ("tenants", c) for c in DAMAGED_TENANT_METADATA
]


def _write_metadata(path: pathlib.Path, good: dict, payload) -> None:
  if isinstance(payload, bytes):
    path.write_bytes(payload)
  elif payload == "deep":  # deeper than the JSON parser's recursion limit
    path.write_text(json.dumps(good)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
  elif callable(payload):
    path.write_text(json.dumps(_mutated(good, payload)))
  else:
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize(
  ("kind", "case"), METADATA_CASES, ids=[f"{k}-{c}" for k, c in METADATA_CASES]
)
def test_malformed_metadata_is_refused_and_an_older_good_step_is_used(
  tmp_path, good_dirs, kind, case
):
  good_dir = good_dirs[kind]
  payload = (DAMAGED_METADATA | DAMAGED_TENANT_METADATA)[case]
  alone, with_older = tmp_path / "alone", tmp_path / "with_older"
  shutil.copytree(good_dir, alone)
  shutil.copytree(good_dir, with_older)
  good = json.loads(_metadata_path(good_dir, 0).read_text())
  _write_metadata(_metadata_path(alone, 0), good, payload)
  # A newer step 1 (a copy of the good step 0) with the malformed metadata.
  shutil.copytree(with_older / "0", with_older / "1")
  _write_metadata(_metadata_path(with_older, 1), dict(good, step=1), payload)
  before = _digest(alone), _digest(with_older)

  with pytest.raises(RuntimeError, match="no readable checkpoint .*step 0"):
    _restore_kind(kind, alone)  # nothing readable: a clear error
  with pytest.warns(RuntimeWarning, match="step 1 .* is damaged"):
    restored = _restore_kind(kind, with_older)
  if kind == "one state":
    _assert_bit_identical(restored.state, _good_state(good_dir))  # step 0, never the crafted one
  else:
    assert restored[2]["step"] == 0
    _assert_bit_identical(restored[0], _good_state(good_dir, TenantCheckpointer))
  assert (_digest(alone), _digest(with_older)) == before


# Metadata values the checkpointer passes through and the driver builds its clock and schedule
# from: each must be refused with an error naming the field, before any driver exists.
SCHEDULE_METADATA = {
  "time_origin a string": ("time_origin", lambda m: m.update(time_origin="yesterday")),
  "time_origin NaN": ("time_origin", lambda m: m.update(time_origin=math.nan)),
  "time_origin 1e300": ("time_origin", lambda m: m.update(time_origin=1e300)),
  "extra a list": ("extra", lambda m: m.update(extra=[1])),
  "last_background NaN": (
    "last_background",
    lambda m: m["extra"].update(last_background=math.nan),
  ),
  "last_background a string": (
    "last_background",
    lambda m: m["extra"].update(last_background="x"),
  ),
  "last_deep 1e300": ("last_deep", lambda m: m["extra"].update(last_deep=1e300)),
  "route_key of 3 words": ("route_key", lambda m: m["extra"].update(route_key=[1, 2, 3])),
  "route_key negative": ("route_key", lambda m: m["extra"].update(route_key=[-1, 2])),
  "route_count negative": ("route_count", lambda m: m["extra"].update(route_count=-5)),
}


@pytest.mark.parametrize("case", list(SCHEDULE_METADATA), ids=list(SCHEDULE_METADATA))
def test_malformed_schedule_metadata_is_a_clear_error_and_loads_no_driver(tmp_path, good_dir, case):
  field, mutate = SCHEDULE_METADATA[case]
  d = tmp_path / "ck"
  shutil.copytree(good_dir, d)
  good = json.loads(_metadata_path(good_dir, 0).read_text())
  _write_metadata(_metadata_path(d, 0), good, mutate)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    with pytest.raises((ValueError, RuntimeError)) as err:
      sona.Sona.restore(os.fspath(d), clock=_clock)
  assert field in str(err.value), str(err.value)


# ------------------------------------------------------------------------ values of the arrays


def _with_values(state, case, at=()):
  """`state` with one invariant broken at batch index `at` (a tenant, for tenant states)."""
  if case == "NaN adapter":
    return state._replace(micro=state.micro._replace(b=state.micro.b.at[at].set(jnp.nan)))
  if case == "edge to a node id past the graph":
    g = state.graph
    return state._replace(graph=g._replace(edges=g.edges.at[at + (0, 0)].set(10**6)))
  if case == "ring buffer counters out of range":
    meta = state.signals.meta.at[at].set(jnp.asarray([-3, 99, 5, 9, -1]))
    return state._replace(signals=state.signals._replace(meta=meta))
  raise ValueError(case)


VALUE_CASES = {
  "NaN adapter": "micro.b has non-finite values",
  "edge to a node id past the graph": "graph edges name node ids outside",
  "ring buffer counters out of range": "signals ring buffer head/size",
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_state_values_that_break_invariants_are_refused(tmp_path, case, kind):
  if kind == "one state":
    _craft(tmp_path, 1, _with_values(_state(), case), _good_metadata(1))
    with pytest.raises(ValueError, match=re.escape(VALUE_CASES[case])):
      _checkpointer_restore(tmp_path)
  else:  # tenant 1 is broken, tenant 0 is fine: the error names tenant 1 only
    _craft(tmp_path, 1, _with_values(_tenant_states(), case, at=(1,)), _good_metadata(1, kind))
    with pytest.raises(ValueError, match=re.escape(VALUE_CASES[case]) + r".*\(tenants 1\)"):
      _restore_kind(kind, tmp_path)


# -------------------------------------------------------------------------- no code execution


_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
_FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}


def test_no_pickle_eval_or_dynamic_import_anywhere_in_the_package():
  problems = []
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PACKAGE)
    where = lambda node, rel=rel: f"{rel}:{node.lineno}"  # noqa: E731
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name.split(".")[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [(node.module or "").split(".")[0]]
      else:
        names = []
      problems += [f"{where(node)} imports {n}" for n in names if n in _FORBIDDEN_MODULES]
      if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if isinstance(f, ast.Name) and name in _FORBIDDEN_BUILTINS or name == "unsafe_load":
          problems.append(f"{where(node)} calls {name}")
        if name == "import_module" and str(rel) != "__init__.py":
          problems.append(f"{where(node)} calls {name}")
        if name == "load" and isinstance(f, ast.Attribute) and ast.unparse(f.value) == "yaml":
          problems.append(f"{where(node)} calls yaml.load")
        for kw in node.keywords:
          if kw.arg == "allow_pickle" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value is False
          ):
            problems.append(f"{where(node)} passes allow_pickle")
  assert problems == []
  # The one dynamic import: the package's lazy exports, from a fixed table of its own modules.
  assert all(module.startswith("sona_jax.") for module, _ in sona._LAZY.values())


def _refuse(*_a, **_k):
  raise AssertionError("restore tried to deserialise Python objects or evaluate code")


def test_restore_runs_without_unpickling_or_evaluating_anything(tmp_path, monkeypatch):
  engine = sona.Sona(CFG, key=jax.random.key(3), checkpoint_dir=os.fspath(tmp_path), clock=_clock)
  engine.add_memory(np.ones(CFG.dim), quality=0.7)
  engine.save()
  engine.wait_checkpoints()
  expected = jax.tree.map(np.asarray, engine.state)
  tenant_dir = tmp_path / "tenants"
  with TenantCheckpointer(tenant_dir, async_save=False) as ck:
    ck.save(0, _tenant_states(seed=3), CFG, time_origin=NOW)
  expected_tenants = jax.tree.map(np.asarray, _tenant_states(seed=3))
  _checkpointer_restore(tmp_path)  # warm: imports and compilations happen outside the guard
  _restore_kind("tenants", tenant_dir)
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, _refuse)
  monkeypatch.setattr(marshal, "loads", _refuse)
  monkeypatch.setattr(builtins, "eval", _refuse)
  monkeypatch.setattr(builtins, "exec", _refuse)
  state, _, _ = _checkpointer_restore(tmp_path)
  restored = sona.Sona.restore(os.fspath(tmp_path), clock=_clock)
  restored_tenants, _, _ = _restore_kind("tenants", tenant_dir)
  monkeypatch.undo()
  _assert_bit_identical(state, expected)
  _assert_bit_identical(restored.state, expected)
  _assert_bit_identical(restored_tenants, expected_tenants)


def test_module_names_in_checkpoint_files_are_never_imported(tmp_path, monkeypatch):
  # A module that records its import: if restoring ever imported a name from a checkpoint file
  # (orbax's handler registry, tree metadata value types), the flag file would appear.
  flag = tmp_path / "imported.flag"
  (tmp_path / "sona_evil_probe.py").write_text(
    f"open({str(flag)!r}, 'w').write('imported')\nclass Handler:\n  pass\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  d = tmp_path / "ck"
  _craft(d, 1, _state(), _good_metadata(1))
  meta_file = d / "1" / "_CHECKPOINT_METADATA"
  meta = json.loads(meta_file.read_text())
  meta["item_handlers"] = {k: "sona_evil_probe.Handler" for k in meta["item_handlers"]}
  meta_file.write_text(json.dumps(meta))
  tree_file = d / "1" / "state" / "_METADATA"
  tree = json.loads(tree_file.read_text())
  for leaf in tree["tree_metadata"].values():
    leaf["value_metadata"]["value_type"] = "sona_evil_probe.Handler"
  tree_file.write_text(json.dumps(tree))
  for outcome in _restore_both(d):
    assert not isinstance(outcome, AssertionError), outcome
  assert not flag.exists() and "sona_evil_probe" not in sys.modules
