"""The HTTP service (`examples/serve.py`) under concurrent load, and `Sona.observe` from threads.

Two tables, in one run:

- **HTTP**: the service runs in this process (uvicorn on 127.0.0.1, a free port, in a thread) and
  bounded concurrent async httpx clients (an `asyncio.Semaphore` of 1, 8, 32 and 128) send a fixed
  number of simulated requests per level. Each simulated request is what a served model does:
  `POST /adapt`, `POST /route`, `POST /feedback` with the routed tier and 5 distinct memories
  (anchor, 2 used, 2 unused; 1 in 40 with an out-of-range quality that Loop A must reject and
  count); 1 in 50 also adds 8 memories (`POST /memories`), 1 in 100 reads `GET /stats` and 1 in
  100 `GET /metrics`. Reported per level: throughput (HTTP calls/s and simulated requests/s),
  p50/p99 client-side latency per endpoint, errors (non-200 answers and transport errors) and the
  Loop B cycles that ran during the level.
  Loop B runs on the driver's worker thread on a compressed clock (`--speedup` simulated seconds
  per wall second; the clock starts an hour after a weekly Loop C slot, so Loop C stays out of the
  run unless it lasts a simulated week).
- **in-process**: observes/s and p50/p99 latency of `engine.observe(make_interaction(...))`
  (the report read back, as the service does) from 1, 4 and 16 Python threads, with the driver's
  `batching` off and on when its constructor has that keyword (one column, with a note, otherwise).

Checks (a failed one makes the exit status 1):

- zero errors;
- counters balanced: `processed + rejected` equals the `/feedback` calls answered 200,
  `processed` / `rejected` equal the answers with `accepted` true / false, and the rejected ones
  are exactly the injected bad ones;
- Loop B ran at least once during the load (the last level goes on in rounds of its client count
  past its requests until a Loop B cycle has completed, for at most 120 wall seconds, so a fast
  machine does not finish the load inside the first compressed hour; its row counts every request);
- a checkpoint taken under load (`POST /checkpoint?wait=1`, in the middle of the last level) and
  read back with `Sona.restore` while the load goes on has counters between the live ones before
  the checkpoint and after the restore; after the load the service shuts down (worker stopped,
  last checkpoint written) and `Sona.restore` of the directory has exactly the live counters.

Usage: `python benchmarks/bench_serve.py [--quick] [--dim 768] [--requests N] [--levels 1 8 ...]`.
`--quick`: dim 32, a small config, 40 requests per level, levels 1 and 8, and the batch sizes of
dynamic batching compile on first use instead of before the timings (`Sona.warmup`). Writes
`benchmarks/results/serve.json` (`serve_quick.json` with `--quick`; `--out` to choose).

The client and the server share this process (and its GIL) and the machine's CPUs: the numbers are
what one process serving and loading itself reaches, a lower bound for a separate server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import inspect
import json
import logging
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

import sona_jax as sona
from sona_jax.driver import last_deep_slot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
ENDPOINTS = ("adapt", "route", "feedback", "memories", "stats", "metrics", "checkpoint")
MEMORY_BATCH = 8  # memories added per POST /memories under load
COUNTERS = (  # compared between the live driver and its restored checkpoint
  ("requests", "processed"),
  ("requests", "rejected"),
  ("requests", "micro_updates"),
  ("signals", "written"),
  ("signals", "dropped"),
  ("signals", "waiting"),
  ("trajectories", "written"),
  ("graph", "nodes"),
  ("bank", "patterns"),
)


def load_serve():
  """`examples/serve.py` as a module."""
  if "sona_serve_example" in sys.modules:
    return sys.modules["sona_serve_example"]
  spec = importlib.util.spec_from_file_location(
    "sona_serve_example", ROOT / "examples" / "serve.py"
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def make_config(dim: int, quick: bool) -> sona.SonaConfig:
  """The served config: the library defaults at `dim`, or a small one for `--quick`."""
  if not quick:
    return sona.SonaConfig(dim=dim)
  return sona.SonaConfig(
    dim=dim,
    base_rank=4,
    graph_capacity=512,
    graph_degree=8,
    signal_capacity=1024,
    trajectory_capacity=1024,
    min_samples=16,
    pattern_clusters=4,
    bank_capacity=32,
    router_steps=10,
    router_batch=32,
    fisher_samples=16,
    probe_capacity=16,
  )


def batching_supported() -> bool:
  """Whether the driver's constructor takes `batching=` (coalescing concurrent observes)."""
  return "batching" in inspect.signature(sona.Sona).parameters


def _interaction_args(cfg: sona.SonaConfig, ids: np.ndarray, rng, n: int) -> list[dict]:
  """`n` request feedbacks (the driver stamps their time)."""
  queries = rng.normal(size=(min(n, 256), cfg.dim)).astype(np.float32)
  out = []
  for i in range(n):
    pick = rng.choice(len(ids), 5, replace=False)
    out.append(
      dict(
        query=queries[i % len(queries)],
        quality=float(rng.uniform()),
        anchor=int(ids[pick[0]]),
        used=[int(ids[pick[1]]), int(ids[pick[2]])],
        unused=[int(ids[pick[3]]), int(ids[pick[4]])],
        tier=int(rng.integers(cfg.n_tiers)),
        latency_ms=float(rng.uniform(20, 400)),
        context_tokens=int(rng.integers(0, 4000)),
      )
    )
  return out


def add_memories(engine: sona.Sona, embs: np.ndarray) -> np.ndarray:
  """`engine.add_memories` in the service's power-of-two batches (each size compiles once)."""
  ids, start = [], 0
  for n in load_serve()._chunks(len(embs)):
    ids.append(engine.add_memories(embs[start : start + n]))
    start += n
  return np.concatenate(ids)


def _progress(message: str) -> None:
  print(f"[bench_serve] {message}", file=sys.stderr, flush=True)


def warm_up(cfg: sona.SonaConfig, n_memories: int, *, batch_sizes: bool = True) -> float:
  """Compiles every driver path the service takes, on a throwaway driver (same config, so the same
  compiled functions); returns the seconds it took.

  Args:
    cfg: the config.
    n_memories: the number of memories added before the load (their batch sizes compile).
    batch_sizes: also compile every batch size dynamic batching can use (`Sona.warmup`); else
      they compile on first use, inside the timings.
  """
  t = time.perf_counter()
  rng = np.random.default_rng(1)
  engine = sona.Sona(cfg, key=jax.random.key(1))
  if batch_sizes and hasattr(engine, "warmup"):
    engine.warmup()
  ids = add_memories(engine, rng.normal(size=(n_memories, cfg.dim)).astype(np.float32))
  add_memories(engine, rng.normal(size=(MEMORY_BATCH, cfg.dim)).astype(np.float32))
  args = _interaction_args(cfg, np.asarray(ids), rng, max(cfg.min_samples, 32))
  for a in args:
    engine.observe(sona.make_interaction(cfg, **a)).reason_names()
  np.asarray(engine.adapt(args[0]["query"]))
  engine.route(args[0]["query"], context_tokens=10)
  engine.run_background(force=True)
  engine.stats()
  return time.perf_counter() - t


def _observe_from_threads(engine, args, n_threads: int, per_thread: int) -> dict:
  """`per_thread` observes from each of `n_threads` threads, started together."""
  cfg = engine.cfg
  lat: list[list[float]] = [[] for _ in range(n_threads)]
  errors: list[str] = []
  barrier = threading.Barrier(n_threads + 1)

  def work(k: int):
    out = lat[k]
    barrier.wait()
    for j in range(per_thread):
      a = args[(k * per_thread + j) % len(args)]
      t = time.perf_counter()
      try:
        report = engine.observe(sona.make_interaction(cfg, **a))
        bool(report.accepted)  # the answer the service sends back
      except Exception as e:  # reported, not hidden: the driver must take concurrent observes
        errors.append(f"{type(e).__name__}: {e}")
        continue
      out.append(time.perf_counter() - t)

  pool = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
  for th in pool:
    th.start()
  barrier.wait()
  t0 = time.perf_counter()
  for th in pool:
    th.join()
  return dict(wall=time.perf_counter() - t0, lat=[x for xs in lat for x in xs], errors=errors)


def bench_threads(
  cfg: sona.SonaConfig, threads: list[int], n: int, n_memories: int, seed: int = 0
) -> dict:
  """observes/s and latency of `engine.observe(make_interaction(...))` from T threads, with the
  driver's batching off and on when it has the keyword."""
  supported = batching_supported()
  modes = {"off": False, "on": True} if supported else {"default": None}
  rng = np.random.default_rng(seed)
  rows, errors, unbalanced = [], [], []
  for mode, flag in modes.items():
    kw = {} if flag is None else {"batching": flag}
    engine = sona.Sona(cfg, key=jax.random.key(seed), **kw)
    ids = add_memories(engine, rng.normal(size=(n_memories, cfg.dim)).astype(np.float32))
    args = _interaction_args(cfg, ids, rng, 512)
    warm = _observe_from_threads(engine, args, max(threads), 8)  # whatever batch shapes it makes
    sent, errors = 8 * max(threads), errors + warm["errors"]
    for n_threads in threads:
      per_thread = max(n // n_threads, 1)
      b0 = _batches(engine.stats())
      r = _observe_from_threads(engine, args, n_threads, per_thread)
      mean_batch = _mean_batch(b0, _batches(engine.stats()))
      sent += n_threads * per_thread - len(r["errors"])
      errors += r["errors"]
      lat = r["lat"]
      rows.append(
        dict(
          mode=mode,
          threads=n_threads,
          observes=len(lat),
          errors=len(r["errors"]),
          mean_batch=mean_batch,
          observes_per_s=len(lat) / r["wall"],
          p50_us=float(np.percentile(lat, 50) * 1e6) if lat else None,
          p99_us=float(np.percentile(lat, 99) * 1e6) if lat else None,
        )
      )
    stats = engine.stats()
    counted = stats["requests"]["processed"] + stats["requests"]["rejected"]
    if counted != sent - len(warm["errors"]):
      unbalanced.append(dict(mode=mode, answered=sent - len(warm["errors"]), counted=counted))
  return dict(batching_supported=supported, rows=rows, errors=errors[:20], unbalanced=unbalanced)


class Server:
  """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread; a context manager."""

  def __init__(self, app):
    import uvicorn

    self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind(("127.0.0.1", 0))
    self.port = self.sock.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    config = uvicorn.Config(
      app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=60
    )
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(
      target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn", daemon=True
    )

  def __enter__(self) -> Server:
    self.thread.start()
    deadline = time.monotonic() + 120
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("bench_serve: the server did not start")
      time.sleep(0.02)
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True  # lifespan shutdown: worker stopped, last checkpoint
    self.thread.join(300)
    self.sock.close()
    if self.thread.is_alive():
      raise RuntimeError("bench_serve: the server did not stop")


class Load:
  """Simulated requests against the service; every answer tallied."""

  def __init__(self, url: str, cfg: sona.SonaConfig, ids: list[int], seed: int):
    self.url, self.cfg, self.ids = url, cfg, list(ids)
    self.rng = np.random.default_rng(seed)
    self.queries = [q.tolist() for q in self.rng.normal(size=(256, cfg.dim)).astype(np.float32)]
    self.feedback_ok = self.accepted = self.not_accepted = self.injected = 0
    self.reasons: collections.Counter = collections.Counter()  # of the rejected feedbacks
    self.error_messages: list[str] = []

  def _plan(self, n: int) -> list[dict]:
    rng = self.rng
    return [
      dict(
        query=self.queries[int(rng.integers(len(self.queries)))],
        tokens=int(rng.integers(0, 4000)),
        quality=float(rng.uniform()),
        pick=int(rng.integers(2**31)),  # seeds 5 distinct memories out of those known then
        latency_ms=float(rng.uniform(20, 400)),
        feedback=float(rng.uniform()) if rng.random() < 0.2 else None,
      )
      for _ in range(n)
    ]

  async def level(self, clients: int, n: int, on_half=None, until=None, until_s=120.0) -> dict:
    """`n` simulated requests, at most `clients` at once; per-endpoint latencies and errors.

    With `until` (a no-argument predicate), the load goes on in rounds of `clients` requests after
    the first `n` until `until()` holds or `until_s` more wall seconds have passed: e.g. until a
    Loop B cycle has run while serving, whatever the speed of the machine.
    """
    import httpx

    lat = {name: [] for name in ENDPOINTS}
    errors = {name: 0 for name in ENDPOINTS}
    plan = self._plan(n)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    sem = asyncio.Semaphore(clients)
    side: list[asyncio.Task] = []

    async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=300) as client:

      async def call(name: str, method: str, path: str, body=None):
        t = time.perf_counter()
        try:
          if method == "GET":
            r = await client.get(path)
          else:
            r = await client.post(path, json=body)
        except httpx.HTTPError as e:
          errors[name] += 1
          self._error(f"{name}: {type(e).__name__}: {e}")
          return None
        lat[name].append(time.perf_counter() - t)
        if r.status_code != 200:
          errors[name] += 1
          self._error(f"{name}: HTTP {r.status_code}: {r.text[:300]}")
          return None
        return r.text if name == "metrics" else r.json()

      async def one(i: int):
        p = plan[i]
        async with sem:
          await call("adapt", "POST", "/adapt", {"query": p["query"]})
          r = await call("route", "POST", "/route", {"query": p["query"], "context_tokens": 512})
          bad = i % 40 == 39
          tier = r["tier"] if r else 0
          ids = self.ids
          pick = [ids[j] for j in random.Random(p["pick"]).sample(range(len(ids)), 5)]
          body = dict(
            query=p["query"],
            quality=1.5 if bad else p["quality"],  # out of range: Loop A rejects it
            used=pick[1:3],
            unused=pick[3:5],
            anchor=pick[0],
            tier=tier,
            latency_ms=p["latency_ms"],
            context_tokens=p["tokens"],
          )
          if p["feedback"] is not None:
            body["feedback"] = p["feedback"]
          r = await call("feedback", "POST", "/feedback", body)
          if r is not None:
            self.feedback_ok += 1
            self.injected += bad
            if r["accepted"]:
              self.accepted += 1
            else:
              self.not_accepted += 1
              self.reasons.update(r["reasons"])
          if i % 50 == 25:
            embs = [self.queries[(i + k) % len(self.queries)] for k in range(MEMORY_BATCH)]
            r = await call("memories", "POST", "/memories", {"embeddings": embs, "quality": 0.6})
            if r is not None:
              self.ids.extend(r["ids"])
          if i % 100 == 50:
            await call("stats", "GET", "/stats")
          if i % 100 == 75:
            await call("metrics", "GET", "/metrics")
        if on_half is not None and i == n // 2:
          side.append(asyncio.create_task(on_half(call)))

      t0 = time.perf_counter()
      await asyncio.gather(*(one(i) for i in range(n)))
      done = n
      if until is not None:
        deadline = time.perf_counter() + until_s
        while not until() and time.perf_counter() < deadline:
          plan.extend(self._plan(clients))
          await asyncio.gather(*(one(i) for i in range(done, done + clients)))
          done += clients
      wall = time.perf_counter() - t0
      side_results = [await task for task in side]
    return dict(
      clients=clients,
      requests=done,
      http_calls=sum(len(v) for v in lat.values()) + sum(errors.values()),
      wall_s=wall,
      latency=lat,
      errors=errors,
      side=side_results,
    )

  def _error(self, message: str) -> None:
    if len(self.error_messages) < 20:
      self.error_messages.append(message)


def _batches(stats: dict) -> collections.Counter:
  """Loop A steps by coalesced batch size so far (empty when the driver does not report them)."""
  return collections.Counter(
    {int(k): v for k, v in stats.get("serving", {}).get("batches", {}).items()}
  )


def _mean_batch(before: collections.Counter, after: collections.Counter) -> float | None:
  """Interactions per Loop A step between two `_batches` readings."""
  d = after - before
  steps = sum(d.values())
  return sum(k * v for k, v in d.items()) / steps if steps else None


def _counters(stats: dict) -> dict:
  return {f"{a}.{b}": stats[a][b] for a, b in COUNTERS}


def _restored_counters(checkpoint_dir: str) -> dict:
  restored = sona.Sona.restore(checkpoint_dir)
  return _counters(restored.stats())


def bench_http(
  cfg: sona.SonaConfig,
  levels: list[int],
  n: int,
  *,
  speedup: float,
  n_memories: int,
  checkpoint_dir: str,
  seed: int = 0,
) -> dict:
  """The service under load; see the module docstring."""
  serve = load_serve()
  now = time.time()
  start = last_deep_slot(now, cfg) + 3600  # Loop C is a simulated week away
  clock = serve.compressed_clock(speedup, start)
  engine = sona.Sona(cfg, key=jax.random.key(seed), checkpoint_dir=checkpoint_dir, clock=clock)
  poll_s = min(0.1, cfg.background_interval_s / speedup / 10)
  app = serve.create_app(engine, poll_s=poll_s)
  rng = np.random.default_rng(seed + 1)
  rows, checks = [], {}
  load_errors: list[str] = []

  with Server(app) as server:
    import httpx

    embs = rng.normal(size=(n_memories, cfg.dim)).astype(np.float32).tolist()
    r = httpx.post(f"{server.url}/memories", json={"embeddings": embs}, timeout=300)
    r.raise_for_status()
    load = Load(server.url, cfg, r.json()["ids"], seed + 2)

    def cycles(stats: dict) -> int:
      return stats["schedule"]["cycles"]["background"]

    async def checkpoint_under_load(call):
      """Checkpoint mid-load, read it back while the load goes on, bound it by the live counters."""
      before = await call("stats", "GET", "/stats")
      saved = await call("checkpoint", "POST", "/checkpoint?wait=1")
      if before is None or saved is None:
        return dict(within=False, error="a call failed")
      restored = await asyncio.to_thread(_restored_counters, checkpoint_dir)
      after = await call("stats", "GET", "/stats")
      if after is None:
        return dict(within=False, error="a call failed")
      before, after = _counters(before), _counters(after)
      keys = ("requests.processed", "requests.rejected", "signals.written", "trajectories.written")
      return dict(
        step=saved["step"],
        before=before,
        restored=restored,
        after=after,
        within=all(before[k] <= restored[k] <= after[k] for k in keys),
      )

    asyncio.run(load.level(1, min(8, n)))  # warm-up of the HTTP path (not reported)
    for i, clients in enumerate(levels):
      s0 = engine.stats()
      last = i == len(levels) - 1
      # The last level goes on until Loop B has run at least once while serving (see `level`).
      c0 = cycles(s0)
      until = (lambda: cycles(engine.stats()) > c0) if last else None  # noqa: B023 (used at once)
      res = asyncio.run(
        load.level(clients, n, on_half=checkpoint_under_load if last else None, until=until)
      )
      s1 = engine.stats()
      res["loop_b_cycles"] = cycles(s1) - cycles(s0)
      res["mean_batch"] = _mean_batch(_batches(s0), _batches(s1))
      if res["side"]:
        checks["checkpoint_under_load"] = res["side"][0]
      del res["side"]
      rows.append(res)
    load_errors = load.error_messages
  # The service is down: worker stopped, last checkpoint written. Nothing changes the state now.
  live = engine.stats()
  restored = _restored_counters(checkpoint_dir)
  checks["restore_after_load"] = dict(
    live=_counters(live),
    restored=restored,
    equal=_counters(live) == restored,
  )
  req = live["requests"]
  checks["balance"] = dict(
    feedback_200=load.feedback_ok,
    accepted=load.accepted,
    not_accepted=load.not_accepted,
    reasons=dict(load.reasons),
    injected_bad=load.injected,
    processed=req["processed"],
    rejected=req["rejected"],
    balanced=req["processed"] + req["rejected"] == load.feedback_ok
    and req["processed"] == load.accepted
    and req["rejected"] == load.not_accepted,
  )
  checks["loop_b_cycles"] = sum(r["loop_b_cycles"] for r in rows)  # during the timed levels
  checks["loop_b_cycles_total"] = live["schedule"]["cycles"]["background"]
  checks["loop_c_cycles"] = live["schedule"]["cycles"]["deep"]
  return dict(rows=rows, checks=checks, errors=load_errors, speedup=speedup, poll_s=poll_s)


def _pct(xs, q) -> float | None:
  return float(np.percentile(xs, q) * 1e3) if xs else None


def _num(v, fmt: str, width: int) -> str:
  return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"


def _tables(http: dict, threads: dict) -> str:
  """The printed tables: HTTP throughput per level, latency per endpoint, in-process observes."""
  head = (
    f"{'clients':>7} {'requests':>8} {'HTTP calls':>10} {'wall':>7} {'HTTP/s':>8} {'req/s':>7} "
    f"{'errors':>6} {'Loop B':>6} {'obs/step':>8}"
  )
  lines = ["HTTP service (a request = adapt + route + feedback, and the occasional extras)", head]
  lines.append("-" * len(head))
  for r in http["rows"]:
    lines.append(
      f"{r['clients']:>7} {r['requests']:>8} {r['http_calls']:>10} {r['wall_s']:>6.1f}s "
      f"{r['http_per_s']:>8.1f} {r['requests_per_s']:>7.1f} {r['n_errors']:>6} "
      f"{r['loop_b_cycles']:>6} {_num(r['mean_batch'], '.2f', 8)}"
    )
  head = f"{'clients':>7} {'endpoint':<10} {'calls':>6} {'p50 ms':>8} {'p99 ms':>9} {'errors':>6}"
  lines += ["", "latency per endpoint, client side", head, "-" * len(head)]
  for r in http["rows"]:
    for e in ENDPOINTS:
      st = r["endpoints"][e]
      if st["n"] or r["errors"][e]:
        lines.append(
          f"{r['clients']:>7} {e:<10} {st['n']:>6} {_num(st['p50_ms'], '.2f', 8)} "
          f"{_num(st['p99_ms'], '.2f', 9)} {r['errors'][e]:>6}"
        )
  modes = list(dict.fromkeys(r["mode"] for r in threads["rows"]))
  head = f"{'threads':>7} " + " ".join(
    f"{'obs/s ' + m:>13} {'p50 us':>8} {'p99 us':>9} {'obs/step':>8}" for m in modes
  )
  title = "in-process: engine.observe(make_interaction(...)) from threads, batching " + (
    "off / on" if threads["batching_supported"] else "not in this driver (its default)"
  )
  lines += ["", title, head, "-" * len(head)]
  for t in sorted({r["threads"] for r in threads["rows"]}):
    cells = []
    for m in modes:
      r = next(x for x in threads["rows"] if x["threads"] == t and x["mode"] == m)
      cells.append(
        f"{r['observes_per_s']:>13,.0f} {_num(r['p50_us'], '.0f', 8)} "
        f"{_num(r['p99_us'], '.0f', 9)} {_num(r['mean_batch'], '.2f', 8)}"
      )
    lines.append(f"{t:>7} " + " ".join(cells))
  lines.append("(obs/step: interactions per Loop A step, i.e. the mean coalesced batch)")
  return "\n".join(lines)


def run(
  *,
  dim: int,
  quick: bool,
  requests: int,
  levels: list[int],
  threads: list[int],
  observes: int,
  speedup: float,
  n_memories: int,
  checkpoint_dir: str | None = None,
) -> dict:
  """Runs both benchmarks and the checks; returns the result (see `main`)."""
  cfg = make_config(dim, quick)
  seconds = {}
  t = time.perf_counter()
  warm_up(cfg, n_memories, batch_sizes=not quick)
  seconds["warm_up"] = time.perf_counter() - t
  _progress(f"warm-up (compiling every path) {seconds['warm_up']:.1f} s")
  t = time.perf_counter()
  threads_res = bench_threads(cfg, threads, observes, n_memories)
  seconds["inprocess"] = time.perf_counter() - t
  _progress(f"in-process table {seconds['inprocess']:.1f} s")
  t = time.perf_counter()
  tmp = None
  if checkpoint_dir is None:
    tmp = tempfile.mkdtemp(prefix="sona-bench-serve-")
    checkpoint_dir = os.path.join(tmp, "ckpt")
  try:
    http = bench_http(
      cfg,
      levels,
      requests,
      speedup=speedup,
      n_memories=n_memories,
      checkpoint_dir=checkpoint_dir,
    )
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  seconds["http"] = time.perf_counter() - t
  _progress(f"HTTP load, checkpoints and restores {seconds['http']:.1f} s")
  for r in http["rows"]:
    lat = r.pop("latency")
    r["endpoints"] = {
      e: dict(n=len(lat[e]), p50_ms=_pct(lat[e], 50), p99_ms=_pct(lat[e], 99)) for e in ENDPOINTS
    }
    r["n_errors"] = sum(r["errors"].values())
    r["http_per_s"] = r["http_calls"] / r["wall_s"]
    r["requests_per_s"] = r["requests"] / r["wall_s"]
  c = http["checks"]
  failures = []
  n_errors = sum(r["n_errors"] for r in http["rows"])
  if n_errors:
    failures.append(f"{n_errors} HTTP errors, e.g. {http['errors'][:3]}")
  if not c["balance"]["balanced"]:
    failures.append(f"counters not balanced: {c['balance']}")
  if c["balance"]["not_accepted"] != c["balance"]["injected_bad"]:
    failures.append(f"rejected feedbacks are not exactly the injected bad ones: {c['balance']}")
  if c["loop_b_cycles"] < 1:
    failures.append("Loop B never ran during the load")
  if not c.get("checkpoint_under_load", {}).get("within"):
    failures.append(f"checkpoint under load: {c.get('checkpoint_under_load')}")
  if not c["restore_after_load"]["equal"]:
    failures.append(f"restored counters differ from the live ones: {c['restore_after_load']}")
  if threads_res["unbalanced"]:
    failures.append(f"in-process counters not balanced: {threads_res['unbalanced']}")
  if threads_res["errors"]:
    failures.append(f"in-process observe errors, e.g. {threads_res['errors'][:3]}")
  return dict(
    benchmark="serve",
    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    machine=dict(
      platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()
    ),
    config=dict(
      dim=dim,
      quick=quick,
      requests_per_level=requests,
      levels=levels,
      threads=threads,
      observes=observes,
      speedup=speedup,
      memories=n_memories,
      sona_config=cfg.to_dict(),
    ),
    seconds=seconds,
    http=http,
    inprocess=threads_res,
    errors=n_errors,
    failures=failures,
    ok=not failures,
    table=_tables(http, threads_res),
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="dim 32, 40 requests, levels 1 and 8")
  p.add_argument("--dim", type=int, default=None, help="embedding width (768; --quick 32)")
  p.add_argument("--requests", type=int, default=None, help="simulated requests per level")
  p.add_argument("--levels", type=int, nargs="+", default=None, help="concurrent clients")
  p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
  p.add_argument("--observes", type=int, default=None, help="in-process observes per row")
  p.add_argument("--speedup", type=float, default=1800.0, help="simulated s per wall s")
  p.add_argument("--memories", type=int, default=None, help="memories added before the load")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve.json)")
  p.add_argument(
    "--low-latency",
    action="store_true",
    help="sona.configure_cpu_low_latency() first (as a latency-bound CPU server would)",
  )
  a = p.parse_args(argv)
  if a.low_latency:
    sona.configure_cpu_low_latency()
  logging.getLogger("sona_jax").setLevel(logging.WARNING)
  result = run(
    dim=a.dim or (32 if a.quick else 768),
    quick=a.quick,
    requests=a.requests or (40 if a.quick else 300),
    levels=a.levels or ([1, 8] if a.quick else [1, 8, 32, 128]),
    threads=a.threads,
    observes=a.observes or (160 if a.quick else 2000),
    speedup=a.speedup,
    n_memories=a.memories or (64 if a.quick else 1024),
  )
  result["config"]["low_latency"] = bool(a.low_latency)
  print(result["table"])
  c = result["http"]["checks"]
  b = c["balance"]
  print(
    f"\nLoop B cycles during the load: {c['loop_b_cycles']} (>= 1 required; compressed clock "
    f"{result['config']['speedup']:g}x; {c['loop_b_cycles_total']} while serving), "
    f"Loop C: {c['loop_c_cycles']}"
  )
  print(
    f"counters: processed {b['processed']} + rejected {b['rejected']} = "
    f"{b['processed'] + b['rejected']}; /feedback answered 200: {b['feedback_200']} "
    f"(accepted {b['accepted']}, not {b['not_accepted']}: {b['reasons']}): "
    + ("balanced" if b["balanced"] else "NOT BALANCED")
  )
  ck = c.get("checkpoint_under_load")
  if ck and "step" not in ck:
    print(f"checkpoint under load: NOT OK ({ck.get('error')})")
  elif ck:
    print(
      f"checkpoint under load: step {ck['step']}, restored processed "
      f"{ck['restored']['requests.processed']} within live [{ck['before']['requests.processed']}, "
      f"{ck['after']['requests.processed']}]: " + ("ok" if ck["within"] else "NOT OK")
    )
  rl = c["restore_after_load"]
  print(
    "restore after the load: "
    + ("counters equal to the live ones" if rl["equal"] else f"DIFFERENT {rl}")
  )
  if a.quick:
    print("note: --quick compiles each coalesced batch size on first use, inside the timings")
  if not result["inprocess"]["batching_supported"]:
    print("note: Sona has no `batching` keyword yet; the in-process table shows its default only")
  for f in result["failures"]:
    print(f"FAILED: {f}")
  out = Path(a.out) if a.out else RESULTS / ("serve_quick.json" if a.quick else "serve.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=float))
  print(f"\nwrote {out}")
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
