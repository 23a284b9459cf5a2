#!/usr/bin/env node
'use strict';
// The peer's background learning: `forceLearn()` after N trajectories at a given dim.
//
// Payload (JSON on argv[2] or stdin): sizes [1000, 5200, 20000], dim 768, clusters 50, seed 0.
// For each size: a fresh engine (patternClusters = clusters, trajectoryCapacity = size), N
// trajectories (beginTrajectory + addTrajectoryStep + endTrajectory; untimed), then one timed
// forceLearn(). Output: one JSON line {"version", "results": [{"n", "dim", "force_learn_s",
// "message"}]}.

const c = require('./common');

function main() {
  const p = Object.assign({ sizes: [1000, 5200, 20000], dim: 768, clusters: 50, seed: 0 },
    c.readPayload());
  const sona = c.loadSona();
  const rand = c.rng(p.seed);
  const results = [];
  for (const n of p.sizes) {
    const engine = sona.SonaEngine.withConfig(c.checkConfig({
      hiddenDim: p.dim, microLoraRank: 2, baseLoraRank: 8,
      patternClusters: p.clusters, trajectoryCapacity: n,
    }));
    for (let i = 0; i < n; i++) {
      const id = engine.beginTrajectory(c.randomVec(rand, p.dim));
      engine.addTrajectoryStep(id, c.randomVec(rand, p.dim), [], rand());
      engine.endTrajectory(id, rand());
    }
    engine.flush();
    const t0 = process.hrtime.bigint();
    const message = engine.forceLearn();
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    results.push({ n, dim: p.dim, clusters: p.clusters, force_learn_s: seconds, message });
  }
  c.emit(Object.assign({ script: 'forcelearn', package: '@ruvector/sona', version: sona.version,
    results }, c.hostInfo()));
}

c.runMain(main);
