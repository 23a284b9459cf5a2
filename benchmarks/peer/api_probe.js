#!/usr/bin/env node
'use strict';
// Re-checks the API behaviour recorded in NOTES.md against the installed
// @ruvector/sona (run after a version bump). Prints one JSON object:
// {"version", "facts": {name: observed value}, "expected": {...}, "mismatches": [...]}.
// Only non-aborting probes are run here; the aborting inputs (rank 3, capacity 0,
// wrong-length applyMicroLora input) are listed in NOTES.md.
const c = require('./common');

const D = 8;
const oh = (k, s = 1) => Array.from({ length: D }, (_, i) => (i === k ? s : 0));
const sub = (a, b) => a.map((v, i) => v - b[i]);
const l2 = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));

function main() {
  const { SonaEngine, version } = c.loadSona();
  const mk = (cfg) => SonaEngine.withConfig(Object.assign({ hiddenDim: D, microLoraRank: 2, baseLoraRank: 8 }, cfg));
  const rand = c.rng(7);
  const x = c.randomVec(rand, D);
  const facts = {};

  let e = mk({});
  facts.typed_arrays_accepted = (() => {
    try {
      e.beginTrajectory(new Float64Array(D));
      return true;
    } catch (_) {
      return false;
    }
  })();
  facts.trajectory_id_type = typeof e.beginTrajectory(oh(0));
  facts.apply_returns_input_before_learning = l2(sub(e.applyMicroLora(x), x)) < 1e-6;
  facts.apply_return_type = Object.prototype.toString.call(e.applyMicroLora(x));
  facts.unknown_id_calls_ignored = (() => {
    try {
      e.addTrajectoryStep(12345, oh(1), [], 1);
      e.endTrajectory(12345, 1);
      return true;
    } catch (_) {
      return false;
    }
  })();

  // Micro-LoRA: delta parallel to the (normalized) activation, scaled by quality.
  e = mk({ microLoraLr: 0.5 });
  const g = c.randomVec(rand, D);
  let id = e.beginTrajectory(c.randomVec(rand, D));
  e.addTrajectoryStep(id, g, [], 0.7);
  e.endTrajectory(id, 0.8);
  const before = l2(sub(e.applyMicroLora(x), x));
  e.flush();
  const delta = sub(e.applyMicroLora(x), x);
  facts.update_needs_flush_or_100_pending = before < 1e-6 && l2(delta) > 1e-6;
  const ratios = delta.map((v, i) => v / g[i]);
  facts.delta_parallel_to_activation = ratios.every((r) => Math.abs(r - ratios[0]) < 1e-3 * Math.abs(ratios[0]));

  // Zero reward / zero quality -> no update.
  const deltaFor = (reward, quality, qLen = D) => {
    const en = mk({ microLoraLr: 0.5 });
    const i2 = en.beginTrajectory(c.randomVec(rand, qLen));
    en.addTrajectoryStep(i2, g, [], reward);
    en.endTrajectory(i2, quality);
    en.flush();
    return l2(sub(en.applyMicroLora(x), x));
  };
  facts.zero_reward_single_step_no_update = deltaFor(0, 1) < 1e-6;
  facts.zero_quality_no_update = deltaFor(1, 0) < 1e-6;
  facts.query_len_mismatch_no_update = deltaFor(1, 1, D + 2) < 1e-6;

  // Buffer full: newest dropped.
  e = mk({ trajectoryCapacity: 3, patternClusters: 10 });
  for (let k = 0; k < 5; k++) {
    id = e.beginTrajectory(oh(k));
    e.addTrajectoryStep(id, oh(k), [], 0.9);
    e.endTrajectory(id, 0.9);
  }
  facts.buffer_full_dropped = JSON.parse(e.getStats()).trajectories_dropped;
  e.forceLearn();
  const kept = e.findPatterns(oh(0), 10).map((p) => p.centroid.findIndex((v) => v > 0.5)).sort();
  facts.buffer_full_drops = JSON.stringify(kept) === '[0,1,2]' ? 'newest' : `kept ${kept}`;

  // forceLearn thresholds and pattern accumulation.
  e = mk({ patternClusters: 3 });
  facts.force_learn_empty = e.forceLearn();
  id = e.beginTrajectory(oh(0));
  e.addTrajectoryStep(id, oh(0), [], 1);
  e.endTrajectory(id, 1);
  facts.force_learn_one = e.forceLearn();
  facts.find_patterns_after_force_learn = e.findPatterns(oh(0), 5).length;
  id = e.beginTrajectory(oh(1));
  e.addTrajectoryStep(id, oh(1), [], 1);
  e.endTrajectory(id, 1);
  e.forceLearn();
  facts.patterns_after_second_learn = JSON.parse(e.getStats()).patterns_stored;
  const pat = e.findPatterns(oh(0), 1)[0];
  facts.pattern_field_types = Object.fromEntries(Object.entries(pat).map(([k, v]) => [k, Array.isArray(v) ? 'number[]' : typeof v]));
  facts.base_lora_is_identity_after_learn = l2(sub(e.applyBaseLora(0, x), x)) < 1e-6;

  const expected = {
    typed_arrays_accepted: false,
    trajectory_id_type: 'number',
    apply_returns_input_before_learning: true,
    apply_return_type: '[object Array]',
    unknown_id_calls_ignored: true,
    update_needs_flush_or_100_pending: true,
    delta_parallel_to_activation: true,
    zero_reward_single_step_no_update: true,
    zero_quality_no_update: true,
    query_len_mismatch_no_update: true,
    buffer_full_dropped: 2,
    buffer_full_drops: 'newest',
    find_patterns_after_force_learn: 1,
    patterns_after_second_learn: 3,
    base_lora_is_identity_after_learn: true,
  };
  const mismatches = Object.keys(expected).filter((k) => facts[k] !== expected[k]);
  c.emit(Object.assign({ script: 'api_probe', version, facts, expected, mismatches }, c.hostInfo()));
}

c.runMain(main);
