"""Test configuration in the spirit of equinox's: strict dtype promotion, rank promotion raises,
fixed keys, and the random seeds of the run printed at its end so failures can be replayed.

Hypothesis would draw a fresh seed for every test; here it draws one per session (unless
`--hypothesis-seed=N` is given), printed with the test order's seed when pytest-random-order
shuffles (`--random-order`). Passing both back replays the run.
"""

import asyncio
import random

import jax
import pytest
from hypothesis import core as hypothesis_core

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.hookimpl(trylast=True)  # after hypothesis' plugin has read `--hypothesis-seed`
def pytest_configure(config):
  worker = getattr(config, "workerinput", None)  # a pytest-xdist worker: the controller's seed
  if worker is not None and "sona_hypothesis_seed" in worker:
    hypothesis_core.global_force_seed = worker["sona_hypothesis_seed"]
  elif hypothesis_core.global_force_seed is None:
    hypothesis_core.global_force_seed = random.SystemRandom().randrange(2**32)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """pytest-xdist: every worker draws with the seed the controller prints."""
  node.workerinput["sona_hypothesis_seed"] = hypothesis_core.global_force_seed


def pytest_terminal_summary(terminalreporter, config):
  seeds = f"--hypothesis-seed={hypothesis_core.global_force_seed}"
  try:
    from random_order.config import Config as RandomOrder  # pytest-random-order, if installed
  except ImportError:
    RandomOrder = None
  if RandomOrder is not None and RandomOrder(config).is_enabled:
    order = RandomOrder(config)
    seeds += f" --random-order-bucket={order.bucket_type} --random-order-seed={order.seed}"
  terminalreporter.write_line(f"seeds of this run (replay with): {seeds}")


# Long end-to-end runs, marked `slow` here in one place: a plain `pytest` leaves them out (pyproject
# addopts `-m 'not slow'`), `pytest -m slow` runs them, and .ci/run runs both. Each behaviour they
# show keeps a shorter test in the plain run (named beside each).
SLOW = {
  ("test_cli.py", "test_week_demo_writes_report_plots_and_checkpoint_and_shows_learning"),
  ("test_cli.py", "test_demo_runs_and_reports_learning"),
  ("test_schedule.py", "test_two_simulated_weeks_run_loop_b_hourly_and_loop_c_twice"),
  # The learning benchmark's scenarios at test size: three arms of 120 arrivals (the admission
  # window at capacity, with and without it: test_graph's test_full_graph_admits_new_memories_*
  # and test_without_window_newcomers_evict_each_other, test_driver's
  # test_full_graph_keeps_every_new_memory_of_a_burst) ...
  ("test_learning_scenarios.py", "test_memory_past_capacity_keeps_recent_knowledge"),
  # ... and 600 routed requests (learned routing: test_routing.py, test_router.py's
  # test_router_learns_tier_success_on_digits, test_examples' routing example).
  ("test_learning_scenarios.py", "test_router_learns_to_trade_cost_for_quality"),
  # The HTTP load benchmark end to end (the endpoints, their errors and a checkpoint restore:
  # test_serve's other tests; concurrent callers with saves and Loop B: test_serving.py).
  ("test_serve.py", "test_bench_serve_quick_has_no_errors_and_balanced_counters"),
  # The routing example end to end, 40 s (learned routing at test size: test_routing.py and
  # test_router.py's test_router_learns_tier_success_on_digits).
  (
    "test_examples.py",
    "test_routing_example_routes_cheaper_than_the_best_tier_at_near_its_success",
  ),
}


# Test files that run the same jitted programs on one config: under `--dist loadfile` (pyproject
# addopts) each group goes to one worker, its files one after the other, so those programs compile
# once. test_sharding.py's single-device references are test_tenants.py's own computations (tenant
# Loop A and B, Loop B alone, on the same CFG): together they take ~30% less CPU than apart.
SAME_WORKER = [("tests/test_sharding.py", "tests/test_tenants.py")]


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own (trylast)
def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist: `--dist loadfile`, with each group of `SAME_WORKER` one unit of work."""
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  scope_of = {path: group[0] for group in SAME_WORKER for path in group}

  class GroupedFileScheduling(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
      scope = super()._split_scope(nodeid)
      return scope_of.get(scope, scope)

  return GroupedFileScheduling(config, log)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
  for item in items:
    if (item.path.name, getattr(item, "originalname", item.name)) in SLOW:
      item.add_marker(pytest.mark.slow)


@pytest.fixture
def key():
  """A fixed PRNG key: tests are deterministic."""
  return jax.random.key(0)


@pytest.fixture
def orbax_failures_finish(monkeypatch):
  """Makes a failed orbax save or restore finish all its work before raising (orbax 0.12.8 bug).

  orbax-checkpoint 0.12.8 runs every save and restore on a private event loop
  (`asyncio_utils._run_sync_via_new_loop`) and closes it as soon as the operation raises. The
  sibling writes or reads it started (`asyncio.gather` does not stop them when one fails) are left
  behind: those still in tensorstore report "Event loop is closed" when they complete, and those
  created in the loop's last iteration never start (`async_serialize_from_host.<locals>.
  write_fragment` "was never awaited" when the garbage collector reaches it). Either report lands
  in whichever test runs then, and fails it under `filterwarnings = error` (issue 17). Here the
  loop runs every task started on it to completion before it is closed: the operation raises the
  same error, and nothing of it outlives the test.
  """
  from orbax.checkpoint._src import asyncio_utils as orbax_asyncio

  if not hasattr(orbax_asyncio, "_run_sync_via_new_loop"):
    pytest.fail("orbax no longer has asyncio_utils._run_sync_via_new_loop: re-check issue 17")

  def run_to_completion(coro):
    loop = asyncio.new_event_loop()
    started = []  # every task of this loop (asyncio.all_tasks races with other threads)

    def task_factory(loop, coro, **kwargs):
      started.append(asyncio.Task(coro, loop=loop, **kwargs))
      return started[-1]

    loop.set_task_factory(task_factory)
    try:
      asyncio.set_event_loop(loop)
      return loop.run_until_complete(coro)
    finally:
      while pending := [t for t in started if not t.done()]:
        _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=60))
        for task in stuck:  # not seen: cancelled as asyncio.run would, rather than hang the suite
          task.cancel()
      for task in started:  # their errors are the one raised: not "never retrieved" at collection
        if not task.cancelled():
          task.exception()
      asyncio.set_event_loop(None)
      loop.close()

  monkeypatch.setattr(orbax_asyncio, "_run_sync_via_new_loop", run_to_completion)


class CompileLog:
  """The functions XLA compiled while it listened (`jax.monitoring`, a public API): a context
  manager; `names` lists them in order."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.names: list[str] = []

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event == self.EVENT:
      self.names.append(str(kwargs.get("fun_name", "?")))

  def of(self, *functions) -> list[str]:
    """The compiles of these jitted functions (by name: `jit(name)`)."""
    wanted = {f"jit({f.__name__})" for f in functions}
    return [name for name in self.names if name in wanted]

  def __enter__(self) -> "CompileLog":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.fixture
def compiles():
  """`with compiles() as log: ...` records what XLA compiled inside the block (`log.names`): a
  public compile counter for no-retrace checks, in place of jitted functions' `_cache_size()`."""
  return CompileLog
