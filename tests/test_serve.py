"""The HTTP service (`examples/serve.py`) and its load benchmark (`benchmarks/bench_serve.py`).

The unit tests use the benchmark's `--quick` config at dim 8, and the benchmark runs at dim 8 too,
so the whole file compiles each driver path once. The benchmark's run is marked `slow` in
`conftest.py` (`pytest -m slow`).
"""

import asyncio
import contextlib
import importlib.util
import json
import pathlib

import httpx
import jax
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sona_jax as sona

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
serve = bench.load_serve()
CFG = bench.make_config(8, quick=True)


@contextlib.asynccontextmanager
async def _client(app):
  """An httpx client on the app, inside its lifespan (the Loop B/C worker runs)."""
  async with app.router.lifespan_context(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sona.test") as client:
      yield client


def _metrics(text: str) -> dict:
  """`{(name, labels): value}` of every sample of a Prometheus text exposition."""
  return {
    (s.name, tuple(sorted(s.labels.items()))): s.value
    for family in text_string_to_metric_families(text)
    for s in family.samples
  }


def test_every_endpoint_happy_path_and_the_checkpoint_restores(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  engine = sona.Sona(CFG, key=jax.random.key(0), checkpoint_dir=ckpt)
  app = serve.create_app(engine, checkpoint_dir=ckpt)
  q = (np.arange(8, dtype=np.float32) / 8).tolist()

  async def scenario():
    async with _client(app) as c:
      r = await c.post("/memories", json={"embeddings": np.eye(8)[:3].tolist(), "quality": 0.7})
      assert r.status_code == 200 and r.json() == {"ids": [0, 1, 2]}
      r = await c.post("/adapt", json={"query": q})
      assert r.status_code == 200
      np.testing.assert_allclose(r.json()["adapted"], q, rtol=1e-6)  # identity before learning
      r = await c.post("/route", json={"query": q, "context_tokens": 100})
      assert r.status_code == 200 and r.json()["tier"] in range(CFG.n_tiers)
      assert 0 < r.json()["propensity"] <= 1 and len(r.json()["probs"]) == CFG.n_tiers
      r = await c.post("/route", json={"query": q, "budget": 2.0})
      assert r.status_code == 200 and r.json()["tier"] in range(CFG.n_tiers)
      fb = dict(query=q, quality=0.1, used=[0], unused=[1], anchor=2, tier=1, latency_ms=90.0)
      r = await c.post("/feedback", json=fb)
      assert r.status_code == 200 and r.json() == {"accepted": True, "reasons": []}
      r = await c.post("/feedback", json=dict(fb, quality=1.5, feedback=0.9))
      assert r.status_code == 200 and not r.json()["accepted"]
      assert "BAD_QUALITY" in r.json()["reasons"]
      r = await c.get("/stats")
      assert r.status_code == 200
      stats = r.json()
      assert stats["requests"]["processed"] == 1 and stats["requests"]["rejected"] == 1
      assert stats["graph"]["nodes"] == 3
      json.dumps(stats, allow_nan=False)  # strict JSON
      r = await c.get("/metrics")
      assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
      m = _metrics(r.text)
      assert m[("sona_requests_processed", ())] == stats["requests"]["processed"]
      assert m[("sona_requests_rejected", ())] == stats["requests"]["rejected"]
      assert m[("sona_graph_nodes", ())] == 3
      assert m[("sona_cycles", (("loop", "background"),))] == 0
      assert m[("sona_http_requests_total", (("code", "200"), ("endpoint", "feedback")))] == 2
      count = ("sona_http_request_duration_seconds_count", (("endpoint", "feedback"),))
      assert m[count] == 2
      r = await c.post("/checkpoint", params={"wait": "1"})
      assert r.status_code == 200 and r.json()["step"] == 0
      return stats

    # Leaving the lifespan stops the worker and writes a last checkpoint.

  live = asyncio.run(scenario())
  restored = sona.Sona.restore(ckpt).stats()
  assert restored["requests"] == live["requests"]
  assert restored["graph"]["nodes"] == 3


BAD = [
  ("/adapt", {"query": [1.0] * 7}, 422, "query"),
  ("/adapt", {}, 422, "query"),
  ("/adapt", b"{not json", 400, None),
  ("/adapt", [1.0] * 8, 400, None),
  ("/adapt", {"query": [1.0] * 7 + ["x"]}, 422, "query"),
  ("/adapt", b'{"query": [1, 1, 1, 1, 1, 1, 1, NaN]}', 422, "query"),  # Python's json reads NaN
  ("/route", {"query": [1.0] * 8, "context_tokens": "many"}, 422, "context_tokens"),
  ("/route", {"query": [1.0] * 8, "context_tokens": -1}, 422, "context_tokens"),
  ("/route", {"qery": [1.0] * 8}, 422, "qery"),
  ("/route", {"query": [1.0] * 8, "budget": -1}, 422, "budget"),
  ("/route", {"query": [1.0] * 8, "budget": 2.0, "cost_weight": 0.1}, 422, "budget"),
  ("/feedback", {"query": [1.0] * 8, "used": [], "unused": []}, 422, "quality"),
  ("/feedback", {"query": [1.0] * 8, "quality": 0.5, "unused": []}, 422, "used"),
  ("/feedback", {"query": [1.0] * 8, "quality": 0.5, "used": ["a"], "unused": []}, 422, "used"),
  (
    "/feedback",
    {"query": [1.0] * 8, "quality": 0.5, "used": [], "unused": [1] * (CFG.max_ids + 1)},
    422,
    "unused",
  ),
  ("/feedback", {"query": [1.0] * 8, "quality": "0.5", "used": [], "unused": []}, 422, "quality"),
  (
    "/feedback",
    {"query": [1] * 8, "quality": 0.5, "used": [], "unused": [], "tier": 2**40},
    422,
    "tier",
  ),
  (
    "/feedback",
    {"query": [1] * 7 + [10**400], "quality": 0.5, "used": [], "unused": []},
    422,
    "query",
  ),
  ("/feedback", {"query": [1] * 8, "quality": 10**400, "used": [], "unused": []}, 422, "quality"),
  ("/route", b"[" * 100_000 + b"]" * 100_000, 400, None),
  ("/memories", {"embeddings": [[1.0] * 8, [1.0] * 9]}, 422, "embeddings[1]"),
  ("/memories", {"embeddings": []}, 422, "embeddings"),
  ("/memories", {"embeddings": [[0.0] * 8]}, 422, "embeddings"),
  ("/memories", {"embeddings": [[1.0] * 8], "quality": 2.0}, 422, "quality"),
  ("/checkpoint", None, 409, None),  # this app has no checkpoint directory
]


def test_bad_requests_get_4xx_naming_the_field_and_change_nothing():
  engine = sona.Sona(CFG, key=jax.random.key(0))
  app = serve.create_app(engine, run_loops=False)

  async def scenario():
    async with _client(app) as c:
      for path, body, status, field in BAD:
        if isinstance(body, bytes):
          r = await c.post(path, content=body, headers={"content-type": "application/json"})
        else:
          r = await c.post(path, json=body)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        assert r.json()["field"] == field, (path, body, r.json())
        if field is not None:
          assert r.json()["error"].startswith(field) or field in r.json()["error"], r.json()
      return _metrics((await c.get("/metrics")).text)

  m = asyncio.run(scenario())
  assert m[("sona_requests_processed", ())] == 0 and m[("sona_requests_rejected", ())] == 0
  assert not any(k[0] == "sona_http_requests_total" and ("code", "500") in k[1] for k in m)


def test_create_app_refuses_a_checkpoint_dir_the_engine_does_not_write(tmp_path):
  engine = sona.Sona(CFG, key=jax.random.key(0))
  with pytest.raises(ValueError, match="checkpoint_dir"):
    serve.create_app(engine, checkpoint_dir=str(tmp_path))


def test_memories_are_added_in_power_of_two_batches():
  assert list(serve._chunks(13)) == [8, 4, 1]
  assert list(serve._chunks(64)) == [64]
  assert sum(serve._chunks(1000)) == 1000


def test_bench_serve_quick_has_no_errors_and_balanced_counters(tmp_path):
  out = tmp_path / "serve.json"
  argv = ["--quick", "--dim", "8", "--requests", "24", "--threads", "1", "4", "--observes", "48"]
  argv += ["--out", str(out)]
  status = bench.main(argv)
  result = json.loads(out.read_text())
  checks = result["http"]["checks"]
  assert result["errors"] == 0, result["http"]["errors"]
  assert checks["balance"]["balanced"], checks["balance"]
  rows = result["http"]["rows"]
  assert rows[0]["requests"] == 24 and rows[1]["requests"] >= 24  # the last one: until Loop B ran
  assert checks["balance"]["feedback_200"] == 8 + sum(r["requests"] for r in rows)  # + warm-up
  assert checks["loop_b_cycles"] >= 1
  assert checks["checkpoint_under_load"]["within"], checks["checkpoint_under_load"]
  assert checks["restore_after_load"]["equal"], checks["restore_after_load"]
  assert [r["clients"] for r in result["http"]["rows"]] == [1, 8]
  assert status == 0, result["failures"]
