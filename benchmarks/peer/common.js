'use strict';
// Shared helpers for the @ruvector/sona peer scripts.
//
// Conventions every peer script follows (benchmarks/_peer.py relies on them):
//   * input: a JSON payload, from argv[2] when it starts with '{', otherwise from
//     stdin when stdin is piped; `--key value` / `--key=value` flags are merged
//     on top (numbers and comma lists are parsed).
//   * output: exactly one JSON object on stdout (last line). Diagnostics go to
//     stderr. A script exits non-zero on error.
//   * the native engine aborts the whole process (Rust panic, rc 134) on some bad
//     inputs (microLoraRank outside 1..2, trajectoryCapacity 0, applyMicroLora input
//     whose length != hiddenDim), so scripts validate before calling it.

const fs = require('fs');
const os = require('os');

function parseScalar(v) {
  if (v === 'true') return true;
  if (v === 'false') return false;
  if (v !== '' && !Number.isNaN(Number(v))) return Number(v);
  if (v.includes(',')) return v.split(',').filter((s) => s !== '').map(parseScalar);
  return v;
}

function camel(flag) {
  return flag.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
}

/** Read the JSON payload (argv[2] or piped stdin) and merge `--flags`. */
function readPayload(argv = process.argv.slice(2)) {
  let payload = {};
  let rest = argv;
  if (argv.length > 0 && argv[0].trim().startsWith('{')) {
    payload = JSON.parse(argv[0]);
    rest = argv.slice(1);
  } else if (!process.stdin.isTTY) {
    let text = '';
    try {
      text = fs.readFileSync(0, 'utf8');
    } catch (err) {
      if (err.code !== 'EAGAIN' && err.code !== 'EOF') throw err;
    }
    if (text.trim() !== '') payload = JSON.parse(text);
  }
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument: ${a}`);
    const eq = a.indexOf('=');
    let key;
    let val;
    if (eq >= 0) {
      key = a.slice(2, eq);
      val = a.slice(eq + 1);
    } else {
      key = a.slice(2);
      const next = rest[i + 1];
      if (next === undefined || next.startsWith('--')) {
        val = 'true';
      } else {
        val = next;
        i++;
      }
    }
    payload[camel(key)] = parseScalar(val);
  }
  return payload;
}

/** Load the package; returns {SonaEngine, version, nativeVersion}. */
function loadSona() {
  const mod = require('@ruvector/sona');
  const version = require('@ruvector/sona/package.json').version;
  let nativeVersion = null;
  const nativePkg = `@ruvector/sona-${process.platform}-${process.arch}` +
    (process.platform === 'linux' ? '-gnu' : '');
  try {
    nativeVersion = require(`${nativePkg}/package.json`).version;
  } catch (_) {
    nativeVersion = null;
  }
  return { SonaEngine: mod.SonaEngine, version, nativePkg, nativeVersion };
}

/** Seeded PRNG (mulberry32) returning floats in [0, 1). */
function rng(seed) {
  let a = seed >>> 0;
  return function next() {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Plain number[] (the binding rejects typed arrays) of uniform(-1, 1) values. */
function randomVec(rand, dim) {
  const v = new Array(dim);
  for (let i = 0; i < dim; i++) v[i] = rand() * 2 - 1;
  return v;
}

/** Nearest-rank percentile of an already sorted numeric array. */
function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[idx];
}

/** Summary stats (microseconds) of a Float64Array of nanosecond samples. */
function summarizeNs(samplesNs) {
  const us = Array.from(samplesNs, (x) => x / 1000).sort((a, b) => a - b);
  const mean = us.reduce((s, x) => s + x, 0) / (us.length || 1);
  return {
    p50_us: percentile(us, 50),
    p90_us: percentile(us, 90),
    p99_us: percentile(us, 99),
    mean_us: mean,
    min_us: us[0],
    max_us: us[us.length - 1],
  };
}

function round(x, digits = 3) {
  if (x === null || x === undefined || !Number.isFinite(x)) return x;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Validate a JsSonaConfig so the native side cannot abort the process. */
function checkConfig(cfg) {
  if (!Number.isInteger(cfg.hiddenDim) || cfg.hiddenDim <= 0) {
    throw new Error(`hiddenDim must be a positive integer, got ${cfg.hiddenDim}`);
  }
  if (cfg.microLoraRank !== undefined && ![1, 2].includes(cfg.microLoraRank)) {
    throw new Error(`microLoraRank must be 1 or 2 (native code aborts otherwise), got ${cfg.microLoraRank}`);
  }
  if (cfg.trajectoryCapacity !== undefined && !(cfg.trajectoryCapacity >= 1)) {
    throw new Error(`trajectoryCapacity must be >= 1, got ${cfg.trajectoryCapacity}`);
  }
  return cfg;
}

function hostInfo() {
  const cpus = os.cpus();
  return {
    node: process.version,
    platform: process.platform,
    arch: process.arch,
    cpu_model: cpus.length ? cpus[0].model : null,
    cpu_count: cpus.length,
  };
}

/** 1-minute load average (null where the OS does not report it). */
function loadavg() {
  const l = os.loadavg()[0];
  return process.platform === 'win32' ? null : round(l, 2);
}

/** Print the single result object on stdout. */
function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

/** Run main(), turning exceptions into a stderr message and exit code 1. */
function runMain(main) {
  try {
    main();
  } catch (err) {
    // Stack first, message last: callers show the tail of stderr.
    if (err && err.stack) process.stderr.write(`${err.stack}\n`);
    process.stderr.write(`peer script error: ${err && err.message ? err.message : err}\n`);
    process.exit(1);
  }
}

module.exports = {
  readPayload,
  loadSona,
  rng,
  randomVec,
  percentile,
  summarizeNs,
  round,
  checkConfig,
  hostInfo,
  loadavg,
  emit,
  runMain,
};
