#!/usr/bin/env node
'use strict';
// The learning benchmarks' streams (benchmarks/bench_learning.py) fed to @ruvector/sona.
//
// Payload (JSON on stdin), `mode` selects the scenario:
//
// mode "drift": retrieval over a fixed memory with queries that drift.
//   memories [m][dim], memoryLabels [m], stream [n][dim] (the queries in serving order),
//   streamLabels [n], heldDrift [h][dim], heldClean [h][dim], heldLabels [h], k (5),
//   checkpoints [request counts at which held-out precision is measured], learnEvery (300),
//   microLoraLrs ([0.001]), patternClusters (50), blend (1.0).
//   Arms, each a fresh engine fed by its own retrievals:
//     "micro lr=X": retrieve with applyMicroLora(q) (the peer's adapted embedding);
//     "patterns":   retrieve with normalize(q) + blend * centroid of findPatterns(q, 1)[0]
//                   (q alone until the first forceLearn).
//   Feedback per request: beginTrajectory(q); addTrajectoryStep(id, mean embedding of the
//   relevant retrieved memories (or [] when none), [], precision); endTrajectory(id, precision);
//   flush(). forceLearn() every `learnEvery` requests (the hourly background loop).
//   Output per arm: prequential precision@k per request, held-out precision@k (drifted and clean
//   queries) at each checkpoint, forceLearn seconds.
//
// mode "route": three model tiers, the router learned from partial feedback.
//   emb [n][dim], correct [n][tiers] (0/1), stream [indices in serving order], held [indices],
//   costs [tiers], threshold (0.9), epsilon (0.05), learnEvery (300), patternClusters (50), seed.
//   One engine per tier holds that tier's served requests: beginTrajectory(q);
//   addTrajectoryStep(id, [], [], 0); endTrajectory(id, 0.25 + 0.5 * success) (the peer drops
//   patterns whose summed quality is near 0, so failures are encoded as 0.25, not 0).
//   Predicted success of tier t for q = (avgQuality - 0.25) / 0.5 of the nearest pattern in
//   engine t (findPatterns(q, 1)), 0.5 before any pattern. Decision as in sona_jax: the cheapest
//   tier with prediction >= threshold, else the most likely, epsilon-greedy.
//   Output: online success and cost, and the per-tier predictions on the held-out rows.

const fs = require('fs');
const c = require('./common');

// common.readPayload() swallows EAGAIN from a non-blocking stdin pipe and then returns an empty
// payload; the payloads here are megabytes, so read stdin to its end, retrying on EAGAIN.
function readStdin() {
  const chunks = [];
  const buf = Buffer.alloc(1 << 20);
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (;;) {
    let n;
    try {
      n = fs.readSync(0, buf, 0, buf.length, null);
    } catch (err) {
      if (err.code === 'EAGAIN') {
        Atomics.wait(pause, 0, 0, 5);
        continue;
      }
      if (err.code === 'EOF') break;
      throw err;
    }
    if (n === 0) break;
    chunks.push(Buffer.from(buf.subarray(0, n)));
  }
  return Buffer.concat(chunks).toString('utf8');
}

const norm = (v) => {
  let s = 0;
  for (const x of v) s += x * x;
  s = Math.sqrt(s) || 1;
  return v.map((x) => x / s);
};

function topK(q, mems, k) {
  const qn = norm(q);
  const sims = mems.map((m, i) => {
    let s = 0;
    for (let d = 0; d < qn.length; d++) s += qn[d] * m[d];
    return [s, i];
  });
  sims.sort((a, b) => b[0] - a[0]);
  return sims.slice(0, k).map((x) => x[1]);
}

function precision(q, label, p) {
  const top = topK(q, p.memories, p.k);
  return top.filter((i) => p.memoryLabels[i] === label).length / p.k;
}

function driftArm(SonaEngine, p, arm) {
  const dim = p.memories[0].length;
  const engine = SonaEngine.withConfig(c.checkConfig({
    hiddenDim: dim, microLoraRank: 2, baseLoraRank: 8, microLoraLr: arm.lr,
    patternClusters: p.patternClusters, trajectoryCapacity: p.stream.length + 1,
  }));
  let learned = false;
  const adapt = (q) => {
    if (arm.kind === 'micro') return engine.applyMicroLora(q);
    if (!learned) return q;
    const pats = engine.findPatterns(q, 1);
    if (!pats.length) return q;
    const qn = norm(q);
    return qn.map((x, i) => x + p.blend * pats[0].centroid[i]);
  };
  const memNorm = p.memories.map(norm);
  const preq = new Array(p.stream.length);
  const held = [];
  let learnS = 0;
  const checkpoints = new Set(p.checkpoints);
  const measure = (n) => {
    let d = 0;
    let cl = 0;
    for (let i = 0; i < p.heldLabels.length; i++) {
      d += precision(adapt(p.heldDrift[i]), p.heldLabels[i], p);
      cl += precision(adapt(p.heldClean[i]), p.heldLabels[i], p);
    }
    held.push({ n, drift: d / p.heldLabels.length, clean: cl / p.heldLabels.length });
  };
  if (checkpoints.has(0)) measure(0);
  for (let r = 0; r < p.stream.length; r++) {
    const q = p.stream[r];
    const label = p.streamLabels[r];
    const top = topK(adapt(q), p.memories, p.k);
    const rel = top.filter((i) => p.memoryLabels[i] === label);
    const quality = rel.length / p.k;
    preq[r] = quality;
    let act = [];
    if (rel.length) {
      act = new Array(dim).fill(0);
      for (const i of rel) for (let d = 0; d < dim; d++) act[d] += memNorm[i][d] / rel.length;
    }
    const id = engine.beginTrajectory(q);
    engine.addTrajectoryStep(id, act, [], quality);
    engine.endTrajectory(id, quality);
    engine.flush();
    if ((r + 1) % p.learnEvery === 0) {
      const t0 = process.hrtime.bigint();
      engine.forceLearn();
      learnS += Number(process.hrtime.bigint() - t0) / 1e9;
      learned = true;
    }
    if (checkpoints.has(r + 1)) measure(r + 1);
  }
  return { arm: arm.name, prequential: preq, held, force_learn_s: learnS,
    stats: JSON.parse(engine.getStats()) };
}

function drift(SonaEngine, p) {
  const arms = [].concat(p.microLoraLrs).map((lr) => ({ name: `micro lr=${lr}`, kind: 'micro', lr }));
  arms.push({ name: 'patterns', kind: 'patterns', lr: [].concat(p.microLoraLrs)[0] });
  return arms.map((arm) => driftArm(SonaEngine, p, arm));
}

function route(SonaEngine, p) {
  const dim = p.emb[0].length;
  const nTiers = p.costs.length;
  const rand = c.rng(p.seed);
  const engines = p.costs.map(() => SonaEngine.withConfig(c.checkConfig({
    hiddenDim: dim, microLoraRank: 2, baseLoraRank: 8, patternClusters: p.patternClusters,
    trajectoryCapacity: p.stream.length + 1, qualityThreshold: 0,
  })));
  const learned = p.costs.map(() => false);
  const predict = (q) => engines.map((e, t) => {
    if (!learned[t]) return 0.5;
    const pats = e.findPatterns(q, 1);
    return pats.length ? Math.min(1, Math.max(0, (pats[0].avgQuality - 0.25) / 0.5)) : 0.5;
  });
  const decide = (probs) => {
    for (let t = 0; t < nTiers; t++) if (probs[t] >= p.threshold) return t;
    let best = 0;
    for (let t = 1; t < nTiers; t++) if (probs[t] > probs[best]) best = t;
    return best;
  };
  let ok = 0;
  let cost = 0;
  let learnS = 0;
  const served = [];
  for (let r = 0; r < p.stream.length; r++) {
    const j = p.stream[r];
    const q = p.emb[j];
    let tier = decide(predict(q));
    if (rand() < p.epsilon) tier = Math.min(nTiers - 1, Math.floor(rand() * nTiers));
    const success = p.correct[j][tier];
    ok += success;
    cost += p.costs[tier];
    served.push(tier);
    const e = engines[tier];
    const id = e.beginTrajectory(q);
    e.addTrajectoryStep(id, [], [], 0);
    e.endTrajectory(id, 0.25 + 0.5 * success);
    if ((r + 1) % p.learnEvery === 0) {
      const t0 = process.hrtime.bigint();
      engines.forEach((en, t) => {
        const msg = en.forceLearn();
        if (!msg.includes('skipped')) learned[t] = true;
      });
      learnS += Number(process.hrtime.bigint() - t0) / 1e9;
    }
  }
  const heldProbs = p.held.map((j) => predict(p.emb[j]));
  return {
    online_success: ok / p.stream.length,
    online_cost: cost / p.stream.length,
    tier_share: p.costs.map((_, t) => served.filter((x) => x === t).length / served.length),
    held_probs: heldProbs,
    force_learn_s: learnS,
    patterns: engines.map((e) => JSON.parse(e.getStats()).patterns_stored),
  };
}

function main() {
  const p = Object.assign({
    k: 5, learnEvery: 300, microLoraLrs: [0.001], patternClusters: 50, blend: 1.0,
    threshold: 0.9, epsilon: 0.05, seed: 0, checkpoints: [],
  }, c.readPayload([readStdin()]));
  const sona = c.loadSona();
  const t0 = process.hrtime.bigint();
  let result;
  if (p.mode === 'drift') result = { arms: drift(sona.SonaEngine, p) };
  else if (p.mode === 'route') result = route(sona.SonaEngine, p);
  else throw new Error(`mode must be "drift" or "route", got ${p.mode}`);
  c.emit(Object.assign({ script: 'learning', mode: p.mode, version: sona.version,
    wall_s: Number(process.hrtime.bigint() - t0) / 1e9 }, result, c.hostInfo()));
}

c.runMain(main);
