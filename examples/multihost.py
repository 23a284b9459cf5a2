"""Many tenants over many hosts: `jax.distributed.initialize` and one global mesh.

Every process runs this same program (JAX's multi-controller model). After
`jax.distributed.initialize`, `jax.devices()` lists the devices of every process; the tenant axis
of the stacked state is sharded over all of them, so each host keeps and updates only its own
tenants' arrays. Every process passes the same global batch (here built from the same seed; in a
server, the batch a front end broadcast); host reads of sharded results go through
`process_allgather`; the checkpoint directory must be shared by the hosts (each writes its shards).

On a cluster, start one process per host (SLURM, Kubernetes and Cloud TPU set the arguments of
`jax.distributed.initialize()` themselves):

    python examples/multihost.py --coordinator host0:1234 --num-processes 2 --process-id 0  # host 0
    python examples/multihost.py --coordinator host0:1234 --num-processes 2 --process-id 1  # host 1

On one machine, `python examples/multihost.py` launches two local processes with 4 CPU devices
each (8 devices, 2 processes) and prints what each process saw.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile


def _launch_local(n_proc: int, devices_per_proc: int, n_tenants: int, ckpt: str) -> int:
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_proc}"
  env["JAX_PLATFORMS"] = "cpu"
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(n_proc),
        "--process-id",
        str(i),
        "--tenants",
        str(n_tenants),
        "--checkpoint-dir",
        ckpt,
      ],
      env=env,
    )
    for i in range(n_proc)
  ]
  codes = [p.wait(timeout=600) for p in procs]
  return max(codes)


def run(coordinator: str, num_processes: int, process_id: int, n_tenants: int, ckpt: str) -> None:
  import jax

  # CPU devices of several processes talk through gloo; GPUs and TPUs bring their own collectives.
  if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)

  import numpy as np
  from jax.experimental import multihost_utils

  import sona_jax as sona
  from sona_jax import sharding, tenants

  cfg = sona.SonaConfig(
    dim=32,
    graph_capacity=64,
    graph_degree=8,
    signal_capacity=256,
    trajectory_capacity=256,
    bank_capacity=32,
    pattern_clusters=8,
    min_samples=8,
  )
  mesh = sharding.make_mesh()  # every device of every process
  me = jax.process_index()
  states = tenants.init_tenants(
    cfg, jax.random.key(0), n_tenants, sharding=sharding.tenant_sharding(mesh)
  )
  local = {d.id for d in jax.local_devices()}
  mine = sorted(
    {
      int(i)
      for s in states.graph.emb.addressable_shards
      if s.device.id in local
      for i in np.arange(n_tenants)[s.index[0]]
    }
  )

  # The same global batch on every process (seeded): 16 requests per tenant, random tenants.
  rng = np.random.default_rng(0)
  batch = 16 * n_tenants
  its = sona.stack_interactions(
    [
      sona.make_interaction(
        cfg,
        query=rng.normal(size=cfg.dim).astype(np.float32),
        quality=float(rng.uniform()),
        tier=int(rng.integers(cfg.n_tiers)),
        latency_ms=float(rng.uniform(20, 400)),
        time=i,
      )
      for i in range(batch)
    ]
  )
  tids = rng.integers(0, n_tenants, batch)
  states, report = tenants.instant_step_tenants(states, its, tids, cfg)
  accepted = multihost_utils.process_allgather(report.accepted, tiled=True)
  states, brep = tenants.background_step_tenants(states, cfg, now=3600)
  steps = multihost_utils.process_allgather(states.step, tiled=True)

  with sharding.TenantCheckpointer(ckpt) as ck:  # each process writes its own tenants' shards
    ck.save(1, states, cfg)
    ck.wait()
    back, _, _ = ck.restore(cfg, sharding=sharding.tenant_sharding(mesh))
  restored = multihost_utils.process_allgather(back.step, tiled=True)
  assert np.array_equal(restored, steps), (restored, steps)

  # One learner over every device of every process: replicated state, data-parallel Loop B.
  init = jax.jit(lambda k: sona.init_state(cfg, k), out_shardings=sharding.replicated(mesh))
  state = init(jax.random.key(1))
  state, _ = sona.instant_scan(state, its, cfg)
  state, rep = sharding.background_step_sharded(state, cfg, 3600, mesh)
  print(
    f"process {me}/{jax.process_count()}: {len(jax.local_devices())} local of "
    f"{jax.device_count()} devices, holds tenants {mine}; accepted {int(accepted.sum())}/{batch}; "
    f"Loop B ran for {int(brep.ran.sum())}/{n_tenants} tenants; steps per tenant "
    f"{np.asarray(steps).tolist()}; data-parallel Loop B of one learner on {rep.n_signals} "
    f"signals, router loss {rep.router_loss_before:.4f} -> {rep.router_loss_after:.4f}",
    flush=True,
  )
  jax.distributed.shutdown()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--coordinator", help="host:port of process 0 (omit to launch locally)")
  p.add_argument("--num-processes", type=int, default=2)
  p.add_argument("--process-id", type=int)
  p.add_argument("--tenants", type=int, default=8)
  p.add_argument("--devices-per-process", type=int, default=4, help="local launch only")
  p.add_argument("--checkpoint-dir", default=None, help="shared by all hosts")
  a = p.parse_args(argv)
  ckpt = a.checkpoint_dir or os.path.join(tempfile.mkdtemp(prefix="sona_multihost_"), "ckpt")
  if a.coordinator is None:
    return _launch_local(a.num_processes, a.devices_per_process, a.tenants, ckpt)
  run(a.coordinator, a.num_processes, a.process_id, a.tenants, ckpt)
  return 0


if __name__ == "__main__":
  sys.exit(main())
