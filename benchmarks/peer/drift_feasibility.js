#!/usr/bin/env node
'use strict';
// Feasibility check: can the peer's applyMicroLora / findPatterns adapt queries
// under retrieval drift? Synthetic setup: K docs (random unit vectors); a drifted
// query for doc k is normalize(mix*d_k + (1-mix)*s_k + noise) with s_k a fixed
// random "shift" per doc. Training feeds one trajectory per query:
// beginTrajectory(q) + addTrajectoryStep(id, d_k, [], 1) + endTrajectory(id, 1)
// + flush(), then forceLearn(). Evaluation (fresh queries) compares recall@1 of
//   raw      : q
//   micro    : applyMicroLora(q)
//   pattern  : centroid of findPatterns(q, 1)[0]
//   blend    : normalize(q + alpha * centroid)
// Payload: dim (64), docs (16), train (800), test (400), mix (0.45), noise (0.3),
// alpha (1.0), microLoraLrs ([0.002, 1.0]), patternClusters (docs), seed (1).
const c = require('./common');

function norm(v) {
  const s = Math.sqrt(v.reduce((a, x) => a + x * x, 0)) || 1;
  return v.map((x) => x / s);
}
const dot = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0);
const argmaxDoc = (docs, v) => {
  let best = -1;
  let bi = -1;
  docs.forEach((d, i) => {
    const s = dot(d, v);
    if (s > best) { best = s; bi = i; }
  });
  return bi;
};

function main() {
  const p = Object.assign({
    dim: 64, docs: 16, train: 800, test: 400, mix: 0.45, noise: 0.3, alpha: 1.0,
    microLoraLrs: [0.002, 1.0], seed: 1,
  }, c.readPayload());
  p.patternClusters = p.patternClusters || p.docs;
  const rand = c.rng(p.seed);
  const docs = Array.from({ length: p.docs }, () => norm(c.randomVec(rand, p.dim)));
  const shifts = Array.from({ length: p.docs }, () => norm(c.randomVec(rand, p.dim)));
  const query = (k) => norm(docs[k].map((x, i) => p.mix * x + (1 - p.mix) * shifts[k][i] +
    p.noise * (rand() * 2 - 1) / Math.sqrt(p.dim) * Math.sqrt(3)));
  const trainSet = Array.from({ length: p.train }, (_, i) => [i % p.docs, query(i % p.docs)]);
  const testSet = Array.from({ length: p.test }, (_, i) => [i % p.docs, query(i % p.docs)]);

  const { SonaEngine, version } = c.loadSona();
  const runs = [];
  for (const lr of [].concat(p.microLoraLrs)) {
    const engine = SonaEngine.withConfig(c.checkConfig({
      hiddenDim: p.dim, microLoraRank: 2, baseLoraRank: 8, microLoraLr: lr,
      patternClusters: p.patternClusters, trajectoryCapacity: p.train + 1,
    }));
    for (const [k, q] of trainSet) {
      const id = engine.beginTrajectory(q);
      engine.addTrajectoryStep(id, docs[k], [], 1.0);
      engine.endTrajectory(id, 1.0);
      engine.flush();
    }
    const learn = engine.forceLearn();
    const hits = { raw: 0, micro: 0, pattern: 0, blend: 0 };
    let deltaNorm = 0;
    let deltaCosMeanDoc = 0;
    const meanDoc = norm(docs.reduce((a, d) => a.map((x, i) => x + d[i]), new Array(p.dim).fill(0)));
    for (const [k, q] of testSet) {
      const y = engine.applyMicroLora(q);
      const delta = y.map((x, i) => x - q[i]);
      const dn = Math.sqrt(dot(delta, delta));
      deltaNorm += dn / p.test;
      deltaCosMeanDoc += (dn > 0 ? Math.abs(dot(delta, meanDoc)) / dn : 0) / p.test;
      const pats = engine.findPatterns(q, 1);
      const cen = pats.length ? pats[0].centroid : q;
      hits.raw += argmaxDoc(docs, q) === k;
      hits.micro += argmaxDoc(docs, y) === k;
      hits.pattern += argmaxDoc(docs, cen) === k;
      hits.blend += argmaxDoc(docs, q.map((x, i) => x + p.alpha * cen[i])) === k;
    }
    const stats = JSON.parse(engine.getStats());
    runs.push({
      microLoraLr: lr,
      forceLearn: learn,
      patterns: stats.patterns_stored,
      recall_at_1: Object.fromEntries(Object.entries(hits).map(([m, h]) => [m, c.round(h / p.test)])),
      micro_delta_norm_mean: c.round(deltaNorm, 6),
      micro_delta_abs_cos_with_mean_doc: c.round(deltaCosMeanDoc, 4),
    });
  }
  c.emit(Object.assign({ script: 'drift_feasibility', version, config: p, runs }, c.hostInfo()));
}

c.runMain(main);
