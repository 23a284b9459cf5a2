#!/usr/bin/env node
'use strict';
// Per-request ("instant loop") latency of the @ruvector/sona peer.
//
// One timed request = beginTrajectory(emb) + addTrajectoryStep(id, activations,
// attention, reward) + endTrajectory(id, quality) + flush(), i.e. one complete
// per-request learning cycle, with a micro-LoRA weight update on every request
// (flush applies the accumulated gradient). applyMicroLora(x) is timed separately
// after the learning pass so the adapter is non-zero.
//
// Payload (JSON on argv[2] or stdin; `--flag value` also accepted):
//   dims            list of hidden dims                  [256, 768, 4096]
//   n               timed requests per dim               2000
//   warmup          untimed requests per dim first       200
//   microLoraRank   1 or 2                               2
//   baseLoraRank                                         8
//   applyN          timed applyMicroLora calls           n
//   applyWarmup                                          warmup
//   pool            distinct pre-generated input sets    min(n, 256)
//   seed                                                 0
//   trajectoryCapacity  buffer size; default max(10000, n + warmup) so no
//                   request hits the drop-when-full path
//   breakdown       also time each call separately       false
//   attentionDim    length of the attention array        dim (0 sends [], as the
//                   crate's own tests do; attention is stored, never used to learn)
//   engineConfig    extra JsSonaConfig fields merged in  {}
//
// Output: one JSON line {"version", "node", "results": [{"dim", "p50_us", "p99_us",
// "mean_us", "apply_p50_us", ...}], ...}.

const c = require('./common');

function makeInputs(rand, dim, count, attDim = dim) {
  const sets = new Array(count);
  for (let i = 0; i < count; i++) {
    sets[i] = {
      emb: c.randomVec(rand, dim),
      act: c.randomVec(rand, dim),
      att: c.randomVec(rand, attDim),
      reward: rand(),
      quality: rand(),
    };
  }
  return sets;
}

function maybeGc() {
  if (typeof global.gc === 'function') global.gc();
}

function request(engine, s) {
  const id = engine.beginTrajectory(s.emb);
  engine.addTrajectoryStep(id, s.act, s.att, s.reward);
  engine.endTrajectory(id, s.quality);
  engine.flush();
}

function benchDim(SonaEngine, dim, p) {
  const cfg = c.checkConfig(Object.assign({
    hiddenDim: dim,
    microLoraRank: p.microLoraRank,
    baseLoraRank: p.baseLoraRank,
    trajectoryCapacity: p.trajectoryCapacity,
  }, p.engineConfig || {}));
  const rand = c.rng(p.seed + dim);
  const inputs = makeInputs(rand, dim, p.pool, p.attentionDim === null ? dim : p.attentionDim);
  const probes = makeInputs(rand, dim, Math.min(p.pool, 64)).map((s) => s.emb);

  const engine = SonaEngine.withConfig(cfg);
  for (let i = 0; i < p.warmup; i++) request(engine, inputs[i % p.pool]);

  maybeGc();
  const samples = new Float64Array(p.n);
  const cpuStart = process.cpuUsage();
  const loopStart = process.hrtime.bigint();
  for (let i = 0; i < p.n; i++) {
    const s = inputs[(p.warmup + i) % p.pool];
    const t0 = process.hrtime.bigint();
    const id = engine.beginTrajectory(s.emb);
    engine.addTrajectoryStep(id, s.act, s.att, s.reward);
    engine.endTrajectory(id, s.quality);
    engine.flush();
    samples[i] = Number(process.hrtime.bigint() - t0);
  }
  const loopNs = Number(process.hrtime.bigint() - loopStart);
  const cpu = process.cpuUsage(cpuStart);

  // applyMicroLora alone (adapter now trained by warmup + n requests).
  for (let i = 0; i < p.applyWarmup; i++) engine.applyMicroLora(probes[i % probes.length]);
  maybeGc();
  const applySamples = new Float64Array(p.applyN);
  let checksum = 0;
  for (let i = 0; i < p.applyN; i++) {
    const x = probes[i % probes.length];
    const t0 = process.hrtime.bigint();
    const y = engine.applyMicroLora(x);
    applySamples[i] = Number(process.hrtime.bigint() - t0);
    checksum += y[i % dim] - x[i % dim];
  }

  const req = c.summarizeNs(samples);
  const app = c.summarizeNs(applySamples);
  const stats = JSON.parse(engine.getStats());
  const out = {
    dim,
    n: p.n,
    warmup: p.warmup,
    p50_us: c.round(req.p50_us),
    p90_us: c.round(req.p90_us),
    p99_us: c.round(req.p99_us),
    mean_us: c.round(req.mean_us),
    min_us: c.round(req.min_us),
    max_us: c.round(req.max_us),
    throughput_rps: c.round(p.n / (loopNs / 1e9), 1),
    // Process CPU time (all threads) per request over the timed loop; well below
    // mean_us means the process was waiting for a CPU (machine contention).
    cpu_mean_us: c.round((cpu.user + cpu.system) / p.n),
    loop_wall_ms: c.round(loopNs / 1e6),
    apply_n: p.applyN,
    apply_p50_us: c.round(app.p50_us),
    apply_p99_us: c.round(app.p99_us),
    apply_mean_us: c.round(app.mean_us),
    apply_delta_checksum: checksum,
    trajectories_recorded: stats.trajectories_recorded,
    trajectories_dropped: stats.trajectories_dropped,
  };
  if (p.breakdown) out.breakdown = breakdown(SonaEngine, cfg, inputs, p);
  return out;
}

// Per-call timings on a fresh engine (hrtime around each call; the sum is a bit
// larger than the whole-request timing because of the extra clock reads).
function breakdown(SonaEngine, cfg, inputs, p) {
  const engine = SonaEngine.withConfig(cfg);
  for (let i = 0; i < p.warmup; i++) request(engine, inputs[i % p.pool]);
  const names = ['beginTrajectory', 'addTrajectoryStep', 'endTrajectory', 'flush'];
  const t = names.map(() => new Float64Array(p.n));
  maybeGc();
  for (let i = 0; i < p.n; i++) {
    const s = inputs[(p.warmup + i) % p.pool];
    let a = process.hrtime.bigint();
    const id = engine.beginTrajectory(s.emb);
    let b = process.hrtime.bigint();
    t[0][i] = Number(b - a);
    engine.addTrajectoryStep(id, s.act, s.att, s.reward);
    a = process.hrtime.bigint();
    t[1][i] = Number(a - b);
    engine.endTrajectory(id, s.quality);
    b = process.hrtime.bigint();
    t[2][i] = Number(b - a);
    engine.flush();
    a = process.hrtime.bigint();
    t[3][i] = Number(a - b);
  }
  const res = {};
  names.forEach((name, k) => {
    const s = c.summarizeNs(t[k]);
    res[name] = { p50_us: c.round(s.p50_us), mean_us: c.round(s.mean_us) };
  });
  return res;
}

function main() {
  const loadStart = c.loadavg();
  const p = c.readPayload();
  p.dims = [].concat(p.dims === undefined ? [256, 768, 4096] : p.dims).map(Number);
  p.n = p.n === undefined ? 2000 : Number(p.n);
  p.warmup = p.warmup === undefined ? 200 : Number(p.warmup);
  p.microLoraRank = p.microLoraRank === undefined ? 2 : Number(p.microLoraRank);
  p.baseLoraRank = p.baseLoraRank === undefined ? 8 : Number(p.baseLoraRank);
  p.applyN = p.applyN === undefined ? p.n : Number(p.applyN);
  p.applyWarmup = p.applyWarmup === undefined ? p.warmup : Number(p.applyWarmup);
  p.pool = Math.max(1, p.pool === undefined ? Math.min(p.n, 256) : Number(p.pool));
  p.seed = p.seed === undefined ? 0 : Number(p.seed);
  p.trajectoryCapacity = p.trajectoryCapacity === undefined ?
    Math.max(10000, p.n + p.warmup) : Number(p.trajectoryCapacity);
  p.breakdown = Boolean(p.breakdown);
  p.attentionDim = p.attentionDim === undefined ? null : Number(p.attentionDim);
  if (!(p.n >= 1) || !(p.warmup >= 0) || !(p.applyN >= 1)) {
    throw new Error('n and applyN must be >= 1, warmup >= 0');
  }

  const sona = c.loadSona();
  const results = p.dims.map((dim) => benchDim(sona.SonaEngine, dim, p));
  c.emit(Object.assign({
    script: 'instant',
    package: '@ruvector/sona',
    version: sona.version,
    native_package: sona.nativePkg,
    native_version: sona.nativeVersion,
    gc_exposed: typeof global.gc === 'function',
    config: {
      n: p.n,
      warmup: p.warmup,
      microLoraRank: p.microLoraRank,
      baseLoraRank: p.baseLoraRank,
      trajectoryCapacity: p.trajectoryCapacity,
      pool: p.pool,
      attentionDim: p.attentionDim === null ? 'dim' : p.attentionDim,
      seed: p.seed,
      engineConfig: p.engineConfig || {},
    },
    results,
    loadavg_start: loadStart,
    loadavg_end: c.loadavg(),
  }, c.hostInfo()));
}

c.runMain(main);
