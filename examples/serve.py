"""An HTTP service around one `sona_jax.Sona` driver (Starlette + uvicorn).

The served model calls it per request: adapt the query embedding before retrieval, ask which model
tier to serve with, then report what happened. Loop B and Loop C run on the driver's worker thread
while requests are served, and the driver checkpoints to a directory.

Endpoints (JSON in, JSON out; a bad request gets 400 or 422 with `{"error", "field"}`, never 500):

- `POST /adapt` `{"query": [dim numbers]}` -> `{"adapted": [dim numbers]}`
- `POST /route` `{"query": [...], "context_tokens": int?, "budget": number?,
  "cost_weight": number?}` -> `{"tier": int, "propensity": number, "probs": [per tier]}`
  (`Sona.route`: the estimates, and the probability with which the policy picked the tier, to
  log with the outcome)
- `POST /feedback` `{"query": [...], "quality": float, "used": [ids], "unused": [ids],
  "anchor": int?, "tier": int?, "latency_ms": float?, "feedback": float?}` ->
  `{"accepted": bool, "reasons": [names]}` (Loop A; values it rejects are counted, not applied)
- `POST /memories` `{"embeddings": [[dim numbers], ...], "quality": float?}` -> `{"ids": [...]}`
- `POST /checkpoint` -> `{"step": int}` (with a checkpoint directory; `?wait=1` waits for the write)
- `GET /stats` -> `Sona.stats()`; `GET /metrics` -> Prometheus text; `GET /healthz` -> `{"ok":true}`

Handlers are `async` and call the synchronous driver through a thread pool, so concurrent requests
reach the driver from many threads at once.

Usage (`pip install -e ".[serve]"`):

  python examples/serve.py --dim 768 --port 8000 --checkpoint-dir ckpt/

With `--checkpoint-dir` holding a checkpoint, the service restores it and continues; otherwise it
starts fresh and checkpoints there after every Loop B/C cycle, on `POST /checkpoint` and at
shutdown. `--speedup 3600` runs the schedule on a compressed clock (an hour a second).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable

import jax
import numpy as np
import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sona_jax as sona

_log = logging.getLogger("sona_jax.serve")

MAX_MEMORIES_PER_REQUEST = 1024
_ENDPOINTS = ("adapt", "route", "feedback", "memories", "checkpoint", "stats", "metrics")


class BadRequest(Exception):
  """A request the service refuses: HTTP `status` with a message naming `field`."""

  def __init__(self, field: str | None, message: str, status: int = 422):
    super().__init__(message)
    self.field, self.message, self.status = field, message, status


def compressed_clock(speedup: float, start: float | None = None) -> Callable[[], float]:
  """A clock that runs `speedup` times faster than the wall clock, from `start` (now by default).

  Args:
    speedup: simulated seconds per wall second (3600: an hour a second).
    start: Unix time the clock reads now; the wall time when None.
  """
  t0 = time.time()
  origin = t0 if start is None else float(start)
  return lambda: origin + speedup * (time.time() - t0)


def _json_safe(value):
  """`value` with non-finite floats replaced by None (strict JSON has no NaN)."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


async def _body(request: Request, fields: dict[str, bool]) -> dict:
  """The request's JSON object; `fields` maps every accepted name to whether it is required."""
  raw = await request.body()
  try:
    body = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise BadRequest(None, f"the body is not JSON: {type(e).__name__}: {e}", 400) from None
  if not isinstance(body, dict):
    raise BadRequest(None, f"the body must be a JSON object, got {type(body).__name__}", 400)
  unknown = sorted(set(body) - set(fields))
  if unknown:
    raise BadRequest(unknown[0], f"{unknown[0]}: unknown field (accepted: {', '.join(fields)})")
  for name, required in fields.items():
    if required and name not in body:
      raise BadRequest(name, f"{name}: required")
  return body


def _is_number(v) -> bool:
  return type(v) is float or type(v) is int


def _vector(value, name: str, dim: int, *, finite: bool) -> np.ndarray:
  """A JSON list of `dim` numbers as f32[dim]; `finite` refuses NaN, inf and float32 overflow."""
  if not isinstance(value, list):
    raise BadRequest(name, f"{name}: expected a list of {dim} numbers, got {type(value).__name__}")
  if len(value) != dim:
    raise BadRequest(name, f"{name}: expected {dim} numbers, got {len(value)}")
  if not all(_is_number(v) for v in value):
    raise BadRequest(name, f"{name}: expected numbers only")
  try:
    with np.errstate(over="ignore"):
      x = np.asarray(value, np.float32)
  except OverflowError:  # a JSON integer beyond any float
    raise BadRequest(name, f"{name}: a number is out of range") from None
  if finite and not np.all(np.isfinite(x)):
    raise BadRequest(name, f"{name}: values must be finite float32 numbers")
  return x


def _number(body: dict, name: str, default: float | None) -> float | None:
  """A JSON number field (NaN and Infinity pass: Loop A rejects and counts them); absent or null
  gives `default`."""
  v = body.get(name)
  if v is None:
    return default
  if not _is_number(v):
    raise BadRequest(name, f"{name}: expected a number, got {v!r}")
  try:
    return float(v)
  except OverflowError:
    raise BadRequest(name, f"{name}: out of range") from None


def _integer(body: dict, name: str, default: int, *, lo: int = -(2**31)) -> int:
  """A JSON integer field that fits int32 and is >= `lo`; absent or null gives `default`."""
  v = body.get(name)
  if v is None:
    return default
  if type(v) is not int or not lo <= v <= 2**31 - 1:
    raise BadRequest(name, f"{name}: expected an integer in [{lo}, 2**31 - 1], got {v!r}")
  return v


def _ids(body: dict, name: str) -> list[int]:
  v = body[name]
  if not isinstance(v, list) or not all(type(i) is int for i in v):
    raise BadRequest(name, f"{name}: expected a list of integer memory ids, got {v!r}")
  return v


def _field_of(message: str, fields) -> str | None:
  """The first of `fields` a library error message names (as a whole word)."""
  return next((f for f in fields if re.search(rf"\b{f}\b", message)), None)


def _chunks(n: int):
  """Power-of-two chunk sizes summing to `n`, largest first: each batch size compiles once."""
  bit = 1 << max(n.bit_length() - 1, 0)
  while n:
    if n & bit:
      yield bit
      n -= bit
    bit >>= 1


class _Metrics:
  """The app's own Prometheus registry: HTTP counters and latencies, and `Sona.stats()` gauges."""

  def __init__(self, engine: sona.Sona):
    self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
    self.requests = prometheus_client.Counter(
      "sona_http_requests",
      "HTTP requests served, by endpoint and status code.",
      ["endpoint", "code"],
      registry=self.registry,
    )
    self.latency = prometheus_client.Histogram(
      "sona_http_request_duration_seconds",
      "Time to serve a request (parsing, the driver call, the response), by endpoint.",
      ["endpoint"],
      buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
      registry=self.registry,
    )
    for name in _ENDPOINTS:  # every series exists from the start (rates of 0, not absent)
      self.latency.labels(name)
    self.registry.register(_StatsCollector(engine))


class _StatsCollector:
  """Gauges read from `Sona.stats()` at scrape time."""

  def __init__(self, engine: sona.Sona):
    self.engine = engine

  def describe(self):
    return []  # not known before a scrape; keeps registration from calling `stats()`

  def collect(self):
    s = self.engine.stats()
    gauges = [
      ("sona_requests_processed", "Interactions Loop A accepted.", s["requests"]["processed"]),
      ("sona_requests_rejected", "Interactions Loop A rejected.", s["requests"]["rejected"]),
      ("sona_micro_updates", "Micro-LoRA updates made.", s["requests"]["micro_updates"]),
      ("sona_graph_nodes", "Live memory graph nodes.", s["graph"]["nodes"]),
      ("sona_bank_patterns", "Patterns in the ReasoningBank.", s["bank"]["patterns"]),
      ("sona_signals_waiting", "Signals waiting for Loop B.", s["signals"]["waiting"]),
      (
        "sona_signals_dropped",
        "Signals overwritten before Loop B read them.",
        s["signals"]["dropped"],
      ),
    ]
    for name, doc, value in gauges:
      yield GaugeMetricFamily(name, doc, value=value)
    cycles = GaugeMetricFamily("sona_cycles", "Loop B/C cycles that ran.", labels=["loop"])
    for loop, n in s["schedule"]["cycles"].items():
      cycles.add_metric([loop], n)
    yield cycles


def create_app(
  engine: sona.Sona,
  *,
  checkpoint_dir: str | None = None,
  poll_s: float = 1.0,
  run_loops: bool = True,
  warmup: bool = False,
) -> Starlette:
  """The Starlette app serving `engine`.

  Args:
    engine: the driver (its clock drives the Loop B/C schedule).
    checkpoint_dir: the directory the engine checkpoints to; None means `engine.checkpoint_dir`.
      It must be the engine's own (build it with `Sona(cfg, ..., checkpoint_dir=DIR)` or
      `Sona.restore(DIR)`). With a directory, `POST /checkpoint` saves on demand and a last
      checkpoint is written at shutdown.
    poll_s: how often the worker thread checks the schedule.
    run_loops: start the Loop B/C worker thread at startup (`engine.start`) and stop it at shutdown.
    warmup: compile Loop A's paths (`engine.warmup()`, every batch size dynamic batching uses)
      at startup, before the first request is accepted.

  Returns:
    The app; run it with uvicorn, or test it with an `httpx.AsyncClient` on
    `httpx.ASGITransport(app)` inside `app.router.lifespan_context(app)` (tests/test_serve.py).
  """
  if checkpoint_dir is not None and (
    engine.checkpoint_dir is None
    or str(checkpoint_dir).rstrip("/") != str(engine.checkpoint_dir).rstrip("/")
  ):
    raise ValueError(
      f"create_app: checkpoint_dir={checkpoint_dir!r} but the engine checkpoints to "
      f"{engine.checkpoint_dir!r}; build it with Sona(..., checkpoint_dir=DIR) or Sona.restore(DIR)"
    )
  checkpointing = engine.checkpoint_dir is not None
  cfg = engine.cfg
  metrics = _Metrics(engine)

  def endpoint(name: str):
    """Wraps a handler: bad requests become 400/422 JSON, server errors 500 JSON (logged), and
    every request is counted and timed."""

    def wrap(handler):
      @functools.wraps(handler)
      async def run(request: Request) -> Response:
        t = time.perf_counter()
        try:
          response = await handler(request)
        except BadRequest as e:
          response = JSONResponse({"error": e.message, "field": e.field}, status_code=e.status)
        except Exception as e:  # a server error: logged, answered 500 (the connection stays up)
          _log.exception("sona_jax.serve: %s failed", name)
          response = JSONResponse(
            {"error": f"internal error: {type(e).__name__}: {e}", "field": None}, status_code=500
          )
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - t)
        return response

      return run

    return wrap

  @endpoint("adapt")
  async def adapt(request: Request) -> Response:
    body = await _body(request, {"query": True})
    x = _vector(body["query"], "query", cfg.dim, finite=True)
    y = await run_in_threadpool(lambda: np.asarray(engine.adapt(x)).tolist())
    return JSONResponse({"adapted": y})

  @endpoint("route")
  async def route(request: Request) -> Response:
    body = await _body(
      request, {"query": True, "context_tokens": False, "budget": False, "cost_weight": False}
    )
    x = _vector(body["query"], "query", cfg.dim, finite=True)
    tokens = _integer(body, "context_tokens", 0, lo=0)
    budget, cost_weight = _number(body, "budget", None), _number(body, "cost_weight", None)
    if budget is not None and not (0 < budget < math.inf):
      raise BadRequest("budget", "budget: expected a finite number > 0")
    if cost_weight is not None and not (0 <= cost_weight < math.inf):
      raise BadRequest("cost_weight", "cost_weight: expected a finite number >= 0")
    if budget is not None and cost_weight is not None:
      raise BadRequest("budget", "give budget or cost_weight, not both")
    info = await run_in_threadpool(
      lambda: engine.route(
        x, context_tokens=tokens, budget=budget, cost_weight=cost_weight, return_info=True
      )
    )
    return JSONResponse(
      {
        "tier": info["tier"],
        "propensity": info["propensity"],  # log it with the outcome (inverse propensity weights)
        "probs": [float(p) for p in info["probs"]],
      }
    )

  feedback_fields = {
    "query": True,
    "quality": True,
    "used": True,
    "unused": True,
    "anchor": False,
    "tier": False,
    "latency_ms": False,
    "feedback": False,
    "context_tokens": False,
  }

  @endpoint("feedback")
  async def feedback(request: Request) -> Response:
    body = await _body(request, feedback_fields)
    # Shapes and types are checked here; values (a NaN quality, an unknown id) are Loop A's to
    # reject and count, and come back as `reasons`.
    kwargs = dict(
      query=_vector(body["query"], "query", cfg.dim, finite=False),
      quality=_number(body, "quality", None),
      used=_ids(body, "used"),
      unused=_ids(body, "unused"),
      anchor=_integer(body, "anchor", -1),
      tier=_integer(body, "tier", 0),
      latency_ms=_number(body, "latency_ms", 0.0),
      feedback=_number(body, "feedback", math.nan),
      context_tokens=_integer(body, "context_tokens", 0, lo=0),
    )
    try:
      it = sona.make_interaction(cfg, **kwargs)
    except ValueError as e:
      raise BadRequest(_field_of(str(e), feedback_fields), str(e)) from None

    def observe():
      report = engine.observe(it)
      return bool(report.accepted), report.reason_names()

    accepted, reasons = await run_in_threadpool(observe)
    return JSONResponse({"accepted": accepted, "reasons": reasons})

  @endpoint("memories")
  async def memories(request: Request) -> Response:
    body = await _body(request, {"embeddings": True, "quality": False})
    embs = body["embeddings"]
    if not isinstance(embs, list) or not embs:
      raise BadRequest("embeddings", "embeddings: expected a non-empty list of embeddings")
    if len(embs) > MAX_MEMORIES_PER_REQUEST:
      raise BadRequest(
        "embeddings", f"embeddings: at most {MAX_MEMORIES_PER_REQUEST} per request, got {len(embs)}"
      )
    e = np.stack([_vector(v, f"embeddings[{i}]", cfg.dim, finite=True) for i, v in enumerate(embs)])
    if not np.all(np.any(e, axis=1)):
      raise BadRequest("embeddings", "embeddings: every embedding must be non-zero")
    quality = _number(body, "quality", 0.5)
    if not 0.0 <= quality <= 1.0:
      raise BadRequest("quality", f"quality: expected a number in [0, 1], got {quality!r}")

    def add():
      ids, start = [], 0
      for n in _chunks(len(e)):  # a new batch size would compile; these are powers of two
        ids += np.asarray(engine.add_memories(e[start : start + n], quality=quality)).tolist()
        start += n
      return ids

    return JSONResponse({"ids": await run_in_threadpool(add)})

  @endpoint("checkpoint")
  async def checkpoint(request: Request) -> Response:
    if not checkpointing:
      raise BadRequest(None, "this service has no checkpoint directory (--checkpoint-dir)", 409)
    wait = request.query_params.get("wait", "0") not in ("0", "false", "")

    def save():
      step = engine.save()
      if wait:
        engine.wait_checkpoints()
      return step

    return JSONResponse({"step": await run_in_threadpool(save), "written": wait})

  @endpoint("stats")
  async def stats(request: Request) -> Response:
    return JSONResponse(_json_safe(await run_in_threadpool(engine.stats)))

  @endpoint("metrics")
  async def metrics_endpoint(request: Request) -> Response:
    text = await run_in_threadpool(prometheus_client.generate_latest, metrics.registry)
    return Response(text, media_type=prometheus_client.CONTENT_TYPE_LATEST)

  async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if warmup and hasattr(engine, "warmup"):
      await run_in_threadpool(engine.warmup)
    if run_loops:
      engine.start(poll_s=poll_s)
    try:
      yield
    finally:
      if run_loops:
        await run_in_threadpool(engine.stop)  # a running cycle finishes first
      if checkpointing:

        def last_checkpoint():
          engine.save()
          engine.wait_checkpoints()

        await run_in_threadpool(last_checkpoint)
        _log.info("sona_jax.serve: last checkpoint written to %s", engine.checkpoint_dir)

  app = Starlette(
    routes=[
      Route("/adapt", adapt, methods=["POST"]),
      Route("/route", route, methods=["POST"]),
      Route("/feedback", feedback, methods=["POST"]),
      Route("/memories", memories, methods=["POST"]),
      Route("/checkpoint", checkpoint, methods=["POST"]),
      Route("/stats", stats, methods=["GET"]),
      Route("/metrics", metrics_endpoint, methods=["GET"]),
      Route("/healthz", healthz, methods=["GET"]),
    ],
    lifespan=lifespan,
  )
  app.state.engine = engine
  app.state.registry = metrics.registry
  return app


def open_engine(
  cfg: sona.SonaConfig,
  checkpoint_dir: str | None,
  *,
  seed: int = 0,
  clock: Callable[[], float] | None = None,
) -> sona.Sona:
  """The driver to serve: restored from `checkpoint_dir` when it holds a checkpoint, else new.

  Args:
    cfg: the config; a restored checkpoint must agree with it on every field that shapes the state
      (`Sona.restore` names the ones that differ).
    checkpoint_dir: the checkpoint directory, or None for none.
    seed: PRNG seed of a new driver.
    clock: the driver's clock (`time.time` when None).
  """
  if checkpoint_dir is not None:
    try:
      engine = sona.Sona.restore(checkpoint_dir, cfg=cfg, clock=clock)
    except FileNotFoundError:  # no checkpoint yet: start fresh and checkpoint there
      pass
    else:
      _log.info("sona_jax.serve: restored the checkpoint in %s", checkpoint_dir)
      return engine
  return sona.Sona(cfg, key=jax.random.key(seed), checkpoint_dir=checkpoint_dir, clock=clock)


def main(argv=None) -> int:
  import uvicorn

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dim", type=int, default=768, help="embedding width")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--checkpoint-dir", default=None, help="restore from / checkpoint to this dir")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--speedup", type=float, default=1.0, help="compressed clock: seconds per second")
  p.add_argument("--poll-s", type=float, default=1.0, help="schedule check period (wall seconds)")
  p.add_argument("--no-warmup", action="store_true", help="skip compiling Loop A at startup")
  p.add_argument("--log-level", default="info")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("sona_jax").setLevel(a.log_level.upper())  # the library's and the service's
  clock = None if a.speedup == 1.0 else compressed_clock(a.speedup)
  engine = open_engine(sona.SonaConfig(dim=a.dim), a.checkpoint_dir, seed=a.seed, clock=clock)
  app = create_app(engine, poll_s=a.poll_s, warmup=not a.no_warmup)
  _log.info("sona_jax.serve: dim %d on http://%s:%d", engine.cfg.dim, a.host, a.port)
  uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level.lower())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
