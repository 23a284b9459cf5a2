// Loop A on CPU as one XLA FFI custom call, SonaLoopA (sona_jax/native/__init__.py): the whole
// transition of n packed interactions, one after the other, in place.
//
// The reference is the pure-JAX rule in sona_jax/loops/instant.py (`_step` for one interaction,
// `_scan` for a batch), which GPU and TPU run and tests/test_native.py compares against. Per
// interaction, as `_step`: unpack; validate (every value, ids against the node rows); feedback
// inputs (query through the base LoRA, weighted memory embeddings); the micro-LoRA step
// (`_learn`: the feedback direction in the tangent space of the adapted query, then
// `lora.micro_update_fast`, the clipped rank-r step); the Hebbian row of the anchor and the node
// statistics of the used memories; the signal and trajectory records; the counters; the report.
// Every write is masked by the acceptance decision.
//
// Why native: on XLA:CPU each kernel costs ~1 us whatever it computes, and Loop A in XLA is ~50
// small kernels per interaction (the micro-LoRA chain alone ~18, and it is sequential: each step
// reads the adapter the previous one wrote). Here an interaction is a few passes over `dim`.
//
// Floats: the sums over `dim` are added in another order than XLA's (and XLA contracts
// multiply-adds, which this build does not), so adapter values agree with the JAX rule to
// rounding; the Hebbian row, node statistics, records, counters and every decision use the same
// f32 operations in the same order, so they are bit-identical whenever the inputs are.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int32_t kNonfiniteStep = 1 << 10;  // instant.NONFINITE_STEP
constexpr float kTiny = 1e-30f;              // lora._TINY
constexpr int kLanes = 8;                    // independent partial sums: vectorisable in order

inline float Bits(int32_t v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}

inline int32_t Int(float f) {
  int32_t v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}

inline float Sum(const float* acc) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// sum_i u[i] v[i] in kLanes independent partial sums (the compiler vectorises it without
// reassociating: results do not depend on flags).
inline float Dot(const float* u, const float* v, int64_t d) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += u[i + l] * v[i + l];
  }
  for (int l = 0; i < d; ++i, ++l) acc[l] += u[i] * v[i];
  return Sum(acc);
}

// The inputs of one micro-LoRA step that do not depend on the adapter.
struct StepIn {
  const float* x;       // query
  const float* y_base;  // query through the base LoRA
  const float* diff;    // weighted difference of used and unused memory embeddings
  const float* grad;    // supervised gradient
  float q_eff, sq_x, sq_grad, lr;
  bool open_gate, has_grad;
};

struct StepOut {
  float step_norm;  // 0 when rejected
  bool active, ok;
};

// One micro-LoRA step (a: [d, r], b: [r, d]), applied in place when `*reasons` stays 0 (it gains
// kNonfiniteStep when the step would not be finite). `R` is the rank when known at compile time
// (0: the runtime `r`): the passes over `dim` then fuse every product of a pass into one loop of
// kLanes-wide partial sums, which the compiler vectorises. `work`: 2 d floats.
template <int R>
StepOut MicroStep(float* a, float* b, const StepIn& in, int32_t* reasons, int64_t d,
                  int64_t r_runtime, float scale, float clip, float* work) {
  const int64_t r = R > 0 ? R : r_runtime;
  constexpr int kMaxR = R > 0 ? R : 64;
  float* y = work;      // adapted query y_hat
  float* t = y + d;     // feedback direction (tangent part of the difference)
  float xa[kMaxR], bt[kMaxR], bg[kMaxR], gb[kMaxR], cb[kMaxR];
  const float* x = in.x;
  const float* y_base = in.y_base;
  const float* diff = in.diff;
  const float* grad = in.grad;
  const int64_t blocked = d - d % kLanes;

  // Pass 1: x A (A is [d, r] row-major).
  {
    float acc[kMaxR][kLanes] = {};
    for (int64_t i = 0; i < blocked; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        for (int64_t j = 0; j < r; ++j) acc[j][l] += x[i + l] * a[(i + l) * r + j];
      }
    }
    for (int64_t i = blocked; i < d; ++i) {
      for (int64_t j = 0; j < r; ++j) acc[j][i - blocked] += x[i] * a[i * r + j];
    }
    for (int64_t j = 0; j < r; ++j) xa[j] = Sum(acc[j]);
  }
  // Pass 2: y_hat = y_base + s (x A) B, with |y_hat|^2 and diff . y_hat.
  float yy, dy;
  {
    float ayy[kLanes] = {}, ady[kLanes] = {};
    auto body = [&](int64_t i, int l) {
      float v = 0.0f;
      for (int64_t j = 0; j < r; ++j) v += xa[j] * b[j * d + i];
      const float yi = y_base[i] + scale * v;
      y[i] = yi;
      ayy[l] += yi * yi;
      ady[l] += diff[i] * yi;
    };
    for (int64_t i = 0; i < blocked; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) body(i + l, l);
    }
    for (int64_t i = blocked; i < d; ++i) body(i, static_cast<int>(i - blocked));
    yy = Sum(ayy);
    dy = Sum(ady);
  }
  const float along = dy / std::fmax(yy, kTiny);
  // Pass 3: t = diff - (diff . u) u with u = y_hat / |y_hat|; |t|^2, B t, and B grad when
  // supervised.
  float sq_t;
  auto pass3 = [&](auto supervised) {
    float att[kLanes] = {}, abt[kMaxR][kLanes] = {}, abg[kMaxR][kLanes] = {};
    auto body = [&](int64_t i, int l) {
      const float ti = diff[i] - along * y[i];
      t[i] = ti;
      att[l] += ti * ti;
      for (int64_t j = 0; j < r; ++j) {
        abt[j][l] += b[j * d + i] * ti;
        if constexpr (decltype(supervised)::value) abg[j][l] += b[j * d + i] * grad[i];
      }
    };
    for (int64_t i = 0; i < blocked; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) body(i + l, l);
    }
    for (int64_t i = blocked; i < d; ++i) body(i, static_cast<int>(i - blocked));
    sq_t = Sum(att);
    for (int64_t j = 0; j < r; ++j) {
      bt[j] = Sum(abt[j]);
      bg[j] = Sum(abg[j]);
    }
  };
  if (in.has_grad) {
    pass3(std::true_type{});
  } else {
    pass3(std::false_type{});
  }
  const bool has_grad = in.has_grad;
  const float t_norm = std::sqrt(sq_t);
  const float fb_scale = -(1.0f - in.q_eff) / std::fmax(t_norm, 1e-12f);
  const bool active = has_grad || (in.open_gate && t_norm > 1e-12f);
  // lora.micro_update_fast with g = grad (supervised) or fb_scale * t (feedback).
  float sq_gb = 0.0f, sq_xa = 0.0f;
  for (int64_t j = 0; j < r; ++j) {
    gb[j] = has_grad ? bg[j] : fb_scale * bt[j];
    sq_gb += gb[j] * gb[j];
    sq_xa += xa[j] * xa[j];
  }
  const float sq_g = has_grad ? in.sq_grad : fb_scale * fb_scale * sq_t;
  const float coef = in.lr * (active ? 1.0f : 0.0f) * scale;
  const float norm_a = std::fabs(coef) * std::sqrt(in.sq_x * sq_gb);
  const float norm_b = std::fabs(coef) * std::sqrt(sq_xa * sq_g);
  const float step_norm = std::sqrt(norm_a * norm_a + norm_b * norm_b);
  float coef_a = coef, coef_b = coef;
  if (clip >= 0.0f) {
    coef_a = coef * std::fmin(1.0f, clip / std::fmax(norm_a, kTiny));
    coef_b = coef * std::fmin(1.0f, clip / std::fmax(norm_b, kTiny));
  }
  if (!std::isfinite(step_norm)) *reasons |= kNonfiniteStep;
  const bool ok = *reasons == 0;
  if (ok) {  // Pass 4: B -= (coef_b x A)^T g, A -= x (coef_a B g)^T.
    for (int64_t j = 0; j < r; ++j) {
      cb[j] = coef_b * xa[j];
      gb[j] *= coef_a;
    }
    const float fb = has_grad ? 0.0f : fb_scale;
    const float* src = has_grad ? grad : t;
    for (int64_t i = 0; i < d; ++i) {
      const float gi = has_grad ? src[i] : fb * src[i];
      for (int64_t j = 0; j < r; ++j) {
        b[j * d + i] -= cb[j] * gi;
        a[i * r + j] -= x[i] * gb[j];
      }
    }
  }
  return StepOut{ok ? step_norm : 0.0f, active, ok};
}


// Loop A's graph writes: sona_jax.graph.hebbian_row on the anchor's edge row, then the access
// count, last access and quality EMA of the used memories (`instant._edges`, `_nodes`), with the
// same f32 operations in the same order.
constexpr int32_t kHebbian = 0;                               // graph.HEBBIAN
constexpr int kAccess = 0, kLastAccess = 1, kQuality = 3;     // graph's node columns

// graph.hebbian_row on one packed row i32[3K]; returns the number of ids that changed an edge.
int32_t HebbianRow(int32_t* row, int64_t K, int32_t anchor, const int32_t* used,
                   const int32_t* unused, int64_t k, float s, float rate) {
  thread_local std::vector<int32_t> work;
  thread_local std::vector<float> key;
  work.resize(6 * K + 3 * k);
  key.resize(K);
  int32_t* nbr0 = work.data();  // the row's neighbours before the update
  int32_t* position = nbr0 + K;
  int32_t* inserted = position + K;
  int32_t* new_id = inserted + K;
  int32_t* u_has = new_id + K;
  int32_t* u_ins = u_has + k;
  int32_t* target = u_ins + k;
  int32_t* strengthened = target + k;  // flags
  int32_t* weakened = strengthened + K;
  int32_t* nbr = row;
  float* w = reinterpret_cast<float*>(row + K);
  int32_t* kind = row + 2 * K;
  std::memcpy(nbr0, nbr, K * sizeof(int32_t));
  std::fill(strengthened, strengthened + 2 * K, 0);
  for (int64_t j = 0; j < k; ++j) {
    const bool uv = used[j] >= 0 && used[j] != anchor;
    const bool vv = unused[j] >= 0 && unused[j] != anchor;
    u_has[j] = 0;
    for (int64_t m = 0; m < K; ++m) {
      if (uv && used[j] == nbr0[m]) strengthened[m] = 1;
      if (vv && unused[j] == nbr0[m]) weakened[m] = 1;
      if (used[j] == nbr0[m]) u_has[j] = 1;
    }
    u_has[j] = uv && u_has[j];
  }
  for (int64_t m = 0; m < K; ++m) {
    if (strengthened[m]) w[m] = w[m] + s * (1.0f - w[m]);
    key[m] = nbr0[m] < 0 ? -1.0f : w[m];
  }
  // Slots in the order sequential insertion takes them: empty first by index, then the weakest.
  for (int64_t m = 0; m < K; ++m) {
    int32_t p = 0;
    for (int64_t i = 0; i < K; ++i) p += (key[i] < key[m]) || (key[i] == key[m] && i < m);
    position[m] = p;
    inserted[m] = 0;
    new_id[m] = -1;
  }
  int32_t count = 0;
  for (int64_t j = 0; j < k; ++j) {
    const bool uv = used[j] >= 0 && used[j] != anchor;
    const bool is_new = uv && !u_has[j];
    count += is_new;
    const int32_t rank = count - 1;
    int32_t t = 0;
    for (int64_t m = 0; m < K; ++m) t += position[m] == rank ? static_cast<int32_t>(m) : 0;
    target[j] = t;
    const bool free = nbr0[t] < 0 || w[t] < s;
    u_ins[j] = is_new && rank < K && free;
    if (u_ins[j]) {
      inserted[t] = 1;
      new_id[t] = std::max(new_id[t], used[j]);
    }
  }
  for (int64_t m = 0; m < K; ++m) {
    if (inserted[m]) w[m] = s;
    if (weakened[m] && !inserted[m]) w[m] = w[m] * (1.0f - rate);
    if (inserted[m]) nbr[m] = new_id[m];
    if (strengthened[m] || inserted[m]) kind[m] = kHebbian;
  }
  int32_t changed = 0;
  for (int64_t j = 0; j < k; ++j) changed += u_has[j] || u_ins[j];
  for (int64_t j = 0; j < k; ++j) {
    const bool vv = unused[j] >= 0 && unused[j] != anchor;
    bool hit = false;
    for (int64_t m = 0; m < K; ++m) hit = hit || (unused[j] == nbr0[m] && !inserted[m]);
    changed += vv && hit;
  }
  return changed;
}


// ---------------------------------------------------------------------------------------------
// SonaLoopA: the whole Loop A transition of n packed interactions, in order, in place.
// Reference: `sona_jax.loops.instant._step` (one interaction) and `_scan` (a batch): unpack,
// validate (reads of the node rows), feedback inputs (base LoRA, weighted memory embeddings),
// the micro-LoRA step, the Hebbian row and node statistics, the signal and trajectory records,
// the counters and the report, each write masked by the acceptance decision. The layouts below
// mirror sona_jax.types (packed interaction, records), sona_jax.buffer (ring metadata),
// sona_jax.state (counters) and sona_jax.graph (node columns); sona_jax/native/__init__.py checks
// them against the Python constants when it loads the library.

// Packed interaction: query [d], used [k], unused [k] (int32 bits), scalars [10], grad [d].
constexpr int kSAnchor = 0, kSQuality = 1, kSLatency = 2, kSTarget = 3, kSTier = 4,
              kSContext = 5, kSFeedback = 6, kSHasGrad = 7, kSTime = 8, kSLr = 9, kNScalars = 10;
constexpr int32_t kTimeUnset = INT32_MIN;                              // types.TIME_UNSET
constexpr int kProcessed = 0, kRejected = 1, kMicroUpdates = 2, kLastTime = 3;  // state
constexpr int kHead = 0, kSize = 1, kWritten = 2, kRead = 3, kDropped = 4;      // buffer
constexpr int kAlive = 5, kGeneration = 7;                                      // graph
// instant.BAD_* reason bits.
constexpr int32_t kBadQuery = 1 << 0, kBadQuality = 1 << 1, kBadFeedback = 1 << 2,
                  kBadLatency = 1 << 3, kBadTier = 1 << 4, kBadContext = 1 << 5,
                  kBadTime = 1 << 6, kBadGrad = 1 << 7, kBadIds = 1 << 8, kBadAnchor = 1 << 9,
                  kBadStale = 1 << 11, kPadding = 1 << 30;

inline int32_t WrapAdd(int32_t a, int32_t b) {  // int32 addition that wraps, as XLA's
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

inline int64_t FloorMod(int64_t a, int64_t m) {
  const int64_t r = a % m;
  return r < 0 ? r + m : r;
}

// buffer.push of one record (`row` already written at the head slot by the caller).
inline void AdvanceRing(int32_t* meta, int64_t cap) {
  const int32_t head = meta[kHead];
  const int32_t overwrite_unread =
      static_cast<int32_t>(static_cast<uint32_t>(meta[kWritten]) -
                           static_cast<uint32_t>(meta[kRead])) >= cap;
  meta[kHead] = static_cast<int32_t>(FloorMod(static_cast<int64_t>(head) + 1, cap));
  meta[kSize] = static_cast<int32_t>(std::min<int64_t>(static_cast<int64_t>(meta[kSize]) + 1, cap));
  meta[kWritten] = WrapAdd(meta[kWritten], 1);
  meta[kRead] = WrapAdd(meta[kRead], overwrite_unread);
  meta[kDropped] = WrapAdd(meta[kDropped], overwrite_unread);
}

// The slot a ring writes next (XLA clamps a dynamic-update-slice index into range).
inline int64_t HeadSlot(const int32_t* meta, int64_t cap) {
  return std::min<int64_t>(std::max<int64_t>(meta[kHead], 0), cap - 1);
}

constexpr int kMaxBaseRank = 64;

// x A for A: [d, RB] row-major, in 4 interleaved accumulators per column (independent chains).
template <int RB>
void BaseProductsFixed(const float* x, const float* a, int64_t d, float* out) {
  constexpr int U = 4;
  float acc[U][RB] = {};
  int64_t i = 0;
  for (; i + U <= d; i += U) {
    for (int u = 0; u < U; ++u) {
      for (int j = 0; j < RB; ++j) acc[u][j] += x[i + u] * a[(i + u) * RB + j];
    }
  }
  for (; i < d; ++i) {
    for (int j = 0; j < RB; ++j) acc[0][j] += x[i] * a[i * RB + j];
  }
  for (int j = 0; j < RB; ++j) out[j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
}

void BaseProducts(const float* x, const float* a, int64_t d, int64_t rb, float* out) {
  switch (rb) {  // SonaConfig.base_rank is 4-16
    case 4: return BaseProductsFixed<4>(x, a, d, out);
    case 8: return BaseProductsFixed<8>(x, a, d, out);
    case 12: return BaseProductsFixed<12>(x, a, d, out);
    case 16: return BaseProductsFixed<16>(x, a, d, out);
    default:
      for (int64_t j = 0; j < rb; ++j) {
        float acc[kLanes] = {};
        for (int64_t i = 0; i < d; ++i) acc[i % kLanes] += x[i] * a[i * rb + j];
        out[j] = Sum(acc);
      }
  }
}

struct LoopAConfig {
  float micro_scale, clip, base_scale, micro_lr, gate_margin, gate_ratio, strengthen, weaken, ema;
  int32_t n_tiers;
};

struct LoopAShapes {
  int64_t d, r, rb, k, N, K, fields, sig_cap, traj_cap, width;
};

// Copies n floats to `dst` with non-temporal stores where the CPU has them. Ring records are read
// back by Loop B much later; written around the caches they skip reading each destination line
// first and leave the memory rows in cache (measured +4-9% batch throughput at dims 256-4096).
// The caller fences once after the batch (`StreamFence`).
inline void StreamCopy(float* dst, const float* src, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) {
    _mm_stream_si32(reinterpret_cast<int*>(dst + i), Int(src[i]));
  }
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) _mm_stream_si32(reinterpret_cast<int*>(dst + i), Int(src[i]));
#else
  std::memcpy(dst, src, n * sizeof(float));
#endif
}

inline void StreamFence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// One interaction of SonaLoopA. Returns nothing; writes the state in place and its report row.
template <int R>
void LoopAOne(float* a, float* b, int32_t* edges, int32_t* node, float* sig, int32_t* sig_meta,
              float* traj, int32_t* traj_meta, int32_t* counters, const float* base_a,
              const float* base_b, const float* emb, const float* p, bool valid,
              const LoopAShapes& sh, const LoopAConfig& cfg, float* report,
              std::vector<float>& work, std::vector<int32_t>& iwork) {
  const int64_t d = sh.d, k = sh.k, N = sh.N, rb = sh.rb;
  work.resize(4 * d);
  float* y_base = work.data();
  float* diff = y_base + d;
  float* chain_work = diff + d;  // 2 d
  iwork.resize(2 * (2 * k + 1));
  int32_t* ids = iwork.data();       // the 2k ids (used, unused), then the anchor
  int32_t* slots = ids + 2 * k + 1;  // their slots (id % N; negative ids kept)

  const float* x = p;
  const float* s = p + d + 2 * k;
  const float* grad = s + kNScalars;
  for (int64_t j = 0; j < 2 * k; ++j) ids[j] = Int(p[d + j]);
  ids[2 * k] = Int(s[kSAnchor]);
  for (int64_t j = 0; j <= 2 * k; ++j) slots[j] = ids[j] >= 0 ? ids[j] % N : ids[j];
  const float q = s[kSQuality], lat = s[kSLatency], target = s[kSTarget], fb = s[kSFeedback];
  const int32_t tier = Int(s[kSTier]), context = Int(s[kSContext]);
  const bool has_grad = s[kSHasGrad] != 0.0f;
  int32_t time = Int(s[kSTime]);
  if (time == kTimeUnset) time = counters[kLastTime];  // the newest time the state saw
  const float lr = std::isnan(s[kSLr]) ? cfg.micro_lr : s[kSLr];

  // Inner products over dim that do not depend on the adapter: x A_base, |x|^2, |grad|^2.
  float xab[kMaxBaseRank];
  BaseProducts(x, base_a, d, rb, xab);
  const float sq_x = Dot(x, x, d), sq_grad = has_grad ? Dot(grad, grad, d) : 0.0f;

  // Validation (instant._validate): one bit per kind of bad value.
  int32_t reasons = valid ? 0 : kPadding;
  for (int64_t j = 0; j < 2 * k; ++j) {
    if (ids[j] < -1) reasons |= kBadIds;
    if (ids[j] < 0) continue;
    for (int64_t m = 0; m < 2 * k; ++m) {
      if (m != j && ids[m] == ids[j]) reasons |= kBadIds;  // duplicated
    }
  }
  const int32_t max_tag = static_cast<int32_t>(INT32_MAX / N);
  for (int64_t j = 0; j <= 2 * k; ++j) {  // ids and anchor that name no live memory
    if (ids[j] < 0) continue;
    const int32_t* row = node + slots[j] * sh.fields;
    const int32_t tag = std::max(row[kGeneration] - 1, 0) % max_tag;
    if (row[kAlive] == 0 || ids[j] / N != tag) reasons |= kBadStale;
  }
  if (!(std::isfinite(q) && q >= 0.0f && q <= 1.0f)) reasons |= kBadQuality;
  if (!(std::isnan(fb) || (std::isfinite(fb) && fb >= 0.0f && fb <= 1.0f))) {
    reasons |= kBadFeedback;
  }
  const float latency_ratio = lat / target;
  if (!(std::isfinite(lat) && lat >= 0.0f && std::isfinite(target) && target > 0.0f &&
        std::isfinite(latency_ratio))) {
    reasons |= kBadLatency;
  }
  if (!(tier >= 0 && tier < cfg.n_tiers)) reasons |= kBadTier;
  if (context < 0) reasons |= kBadContext;
  if (time < 0) reasons |= kBadTime;
  if (ids[2 * k] < -1) reasons |= kBadAnchor;
  if (!std::isfinite(sq_x)) reasons |= kBadQuery;
  if (has_grad && !std::isfinite(sq_grad)) reasons |= kBadGrad;

  // Feedback inputs (instant._feedback).
  const float q_eff = std::isnan(fb) ? q : fb;  // explicit feedback beats the estimate
  float n_used = 0.0f, n_unused = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    n_used += slots[j] >= 0 ? 1.0f : 0.0f;
    n_unused += slots[k + j] >= 0 ? 1.0f : 0.0f;
  }
  const bool gate =
      std::fabs(q_eff - 0.5f) > cfg.gate_margin || latency_ratio > cfg.gate_ratio;
  const bool open_gate = (n_used + n_unused > 0.0f) && gate;
  // y_base = x + s_base (x A_base) B_base, then diff = mean of used minus mean of unused memory
  // embeddings: one streaming pass per row (large dims stream well; `d` floats stay in L1).
  for (int64_t i = 0; i < d; ++i) {
    y_base[i] = 0.0f;
    diff[i] = 0.0f;
  }
  for (int64_t j = 0; j < rb; ++j) {
    const float c = xab[j];
    const float* row = base_b + j * d;
    for (int64_t i = 0; i < d; ++i) y_base[i] += c * row[i];
  }
  for (int64_t i = 0; i < d; ++i) y_base[i] = x[i] + cfg.base_scale * y_base[i];
  const float w_used = 1.0f / std::fmax(n_used, 1.0f), w_unused = -1.0f / std::fmax(n_unused, 1.0f);
  for (int64_t j = 0; j < 2 * k; ++j) {
    if (slots[j] < 0) continue;
    const float w = j < k ? w_used : w_unused;
    const float* row = emb + slots[j] * d;
    for (int64_t i = 0; i < d; ++i) diff[i] += w * row[i];
  }

  // The micro-LoRA step (instant._learn), masked by the acceptance decision.
  const StepIn in{x, y_base, diff, grad, q_eff, sq_x, sq_grad, lr, open_gate, has_grad};
  const StepOut step = MicroStep<R>(a, b, in, &reasons, d, sh.r, cfg.micro_scale, cfg.clip,
                                    chain_work);
  const bool ok = step.ok;
  int32_t changed = 0;
  if (ok) {
    // Hebbian row of the anchor, then the used memories' statistics (instant._edges, _nodes).
    const int32_t anchor = slots[2 * k];
    if (anchor >= 0) {
      changed = HebbianRow(edges + anchor * 3 * sh.K, sh.K, anchor, slots, slots + k, k,
                           cfg.strengthen, cfg.weaken);
    }
    for (int64_t j = 0; j < k; ++j) {
      if (slots[j] < 0) continue;
      int32_t* row = node + slots[j] * sh.fields;
      row[kAccess] = WrapAdd(row[kAccess], 1);
      row[kLastAccess] = time;
      row[kQuality] = Int((1.0f - cfg.ema) * Bits(row[kQuality]) + cfg.ema * q_eff);
    }
    // Records (instant._record_rows), pushed at each ring's head (buffer.push).
    float* srow = sig + HeadSlot(sig_meta, sh.sig_cap) * (d + 8);
    StreamCopy(srow, x, d);
    const float sscal[8] = {q_eff, q, latency_ratio, Bits(tier), Bits(context), fb, Bits(time),
                            Bits(ids[2 * k])};
    StreamCopy(srow + d, sscal, 8);
    AdvanceRing(sig_meta, sh.sig_cap);
    const float n_ret = n_used + n_unused;
    const float precision = n_ret > 0.0f ? n_used / std::fmax(n_ret, 1.0f) : 0.0f;
    float* trow = traj + HeadSlot(traj_meta, sh.traj_cap) * (d + 2 * k + 4);
    StreamCopy(trow, x, d);
    StreamCopy(trow + d, p + d, 2 * k);  // the ids, as their int32 bits
    const float tscal[4] = {precision, q_eff, Bits(time), Bits(ids[2 * k])};
    StreamCopy(trow + d + 2 * k, tscal, 4);
    AdvanceRing(traj_meta, sh.traj_cap);
  }
  // Counters (instant._counters) and the report row (instant._report).
  const bool updated = ok && step.active;
  counters[kProcessed] = WrapAdd(counters[kProcessed], ok);
  counters[kRejected] = WrapAdd(counters[kRejected], valid && !ok);
  counters[kMicroUpdates] = WrapAdd(counters[kMicroUpdates], updated);
  if (ok) counters[kLastTime] = std::max(counters[kLastTime], time);
  report[0] = ok ? 1.0f : 0.0f;
  report[1] = Bits(reasons);
  report[2] = updated ? 1.0f : 0.0f;
  report[3] = step.step_norm;
  report[4] = static_cast<float>(changed);
}

using LoopAFn = void (*)(float*, float*, int32_t*, int32_t*, float*, int32_t*, float*, int32_t*,
                         int32_t*, const float*, const float*, const float*, const float*, bool,
                         const LoopAShapes&, const LoopAConfig&, float*, std::vector<float>&,
                         std::vector<int32_t>&);

LoopAFn LoopAFor(int64_t r) {
  switch (r) {
    case 1: return LoopAOne<1>;
    case 2: return LoopAOne<2>;
    default: return LoopAOne<0>;
  }
}

template <typename T, typename In, typename Out>
T* InPlace(const In& in, Out& out) {  // the result aliased to its operand, or a copy of it
  T* o = out->typed_data();
  if (o != in.typed_data()) std::memcpy(o, in.typed_data(), in.size_bytes());
  return o;
}

// The state operands and results of SonaLoopA and SonaLoopATenants, in operand order.
#define SONA_LOOP_A_OPERANDS                                                                     \
  ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> edges,                 \
      ffi::Buffer<ffi::S32> node, ffi::Buffer<ffi::F32> sig, ffi::Buffer<ffi::S32> sig_meta,     \
      ffi::Buffer<ffi::F32> traj, ffi::Buffer<ffi::S32> traj_meta,                               \
      ffi::Buffer<ffi::S32> counters, ffi::Buffer<ffi::F32> base_a, ffi::Buffer<ffi::F32> base_b, \
      ffi::Buffer<ffi::F32> emb, ffi::Buffer<ffi::F32> packed
#define SONA_LOOP_A_ATTRS                                                                     \
  float micro_scale, float clip, float base_scale, float micro_lr, float gate_margin,         \
      float gate_ratio, float strengthen, float weaken, float ema, int32_t n_tiers
#define SONA_LOOP_A_RESULTS                                                                   \
  ffi::ResultBuffer<ffi::F32> a_out, ffi::ResultBuffer<ffi::F32> b_out,                       \
      ffi::ResultBuffer<ffi::S32> edges_out, ffi::ResultBuffer<ffi::S32> node_out,            \
      ffi::ResultBuffer<ffi::F32> sig_out, ffi::ResultBuffer<ffi::S32> sig_meta_out,          \
      ffi::ResultBuffer<ffi::F32> traj_out, ffi::ResultBuffer<ffi::S32> traj_meta_out,        \
      ffi::ResultBuffer<ffi::S32> counters_out, ffi::ResultBuffer<ffi::F32> report

// Runs n packed interactions in order. Every state operand may carry a leading tenant axis T (the
// same for all; T = 1 without one): interaction i goes to tenant `tenant_of(i)`, and is skipped
// (a report row of zeros) when that is outside [0, T). `valid(i)` false marks a padding row: run,
// never applied, never counted.
template <typename TenantOf, typename Valid>
ffi::Error RunLoopA(SONA_LOOP_A_OPERANDS, SONA_LOOP_A_ATTRS, SONA_LOOP_A_RESULTS,
                    TenantOf tenant_of, Valid valid) {
  auto ad = a.dimensions(), bad = base_a.dimensions(), ed = edges.dimensions(),
       nd = node.dimensions(), sd = sig.dimensions(), td = traj.dimensions(),
       md = emb.dimensions(), pd = packed.dimensions();
  if (ad.size() < 2 || bad.size() < 2 || ed.size() < 2 || nd.size() < 2 || sd.size() < 2 ||
      td.size() < 2 || md.size() < 2 || pd.size() != 2) {
    return ffi::Error::InvalidArgument("sona_loop_a: bad operand ranks");
  }
  auto last = [](auto dims, size_t i) { return dims[dims.size() - 1 - i]; };
  LoopAShapes sh;
  sh.d = last(ad, 1);
  sh.r = last(ad, 0);
  sh.rb = last(bad, 0);
  sh.N = last(md, 1);
  sh.K = last(ed, 0) / 3;
  sh.fields = last(nd, 0);
  sh.sig_cap = last(sd, 1);
  sh.traj_cap = last(td, 1);
  sh.k = (last(td, 0) - sh.d - 4) / 2;
  sh.width = pd[1];
  const int64_t n = pd[0];
  const int64_t sig_w = sh.d + 8, traj_w = sh.d + 2 * sh.k + 4, edge_w = 3 * sh.K;
  const int64_t T = sh.d * sh.r > 0 ? static_cast<int64_t>(a.element_count()) / (sh.d * sh.r) : 0;
  auto per = [T](const auto& buf, int64_t size) {
    return static_cast<int64_t>(buf.element_count()) == T * size;
  };
  if (T < 1 || sh.N < 1 || sh.sig_cap < 1 || sh.traj_cap < 1 || sh.k < 0 ||
      last(md, 0) != sh.d || last(bad, 1) != sh.d || last(ed, 0) % 3 != 0 ||
      sh.fields <= kGeneration || last(sd, 0) != sig_w || last(td, 0) != traj_w ||
      sh.width != 2 * sh.d + 2 * sh.k + kNScalars || !per(b, sh.d * sh.r) ||
      !per(edges, sh.N * edge_w) || !per(node, sh.N * sh.fields) ||
      !per(sig, sh.sig_cap * sig_w) || !per(sig_meta, 5) || !per(traj, sh.traj_cap * traj_w) ||
      !per(traj_meta, 5) || !per(counters, 4) || !per(base_a, sh.d * sh.rb) ||
      !per(base_b, sh.d * sh.rb) || !per(emb, sh.N * sh.d)) {
    return ffi::Error::InvalidArgument("sona_loop_a: operand shapes do not match");
  }
  if (sh.r > 64 || sh.rb > kMaxBaseRank) {
    return ffi::Error::InvalidArgument("sona_loop_a: rank above 64");
  }
  float* ao = InPlace<float>(a, a_out);
  float* bo = InPlace<float>(b, b_out);
  int32_t* eo = InPlace<int32_t>(edges, edges_out);
  int32_t* no = InPlace<int32_t>(node, node_out);
  float* so = InPlace<float>(sig, sig_out);
  int32_t* smo = InPlace<int32_t>(sig_meta, sig_meta_out);
  float* to = InPlace<float>(traj, traj_out);
  int32_t* tmo = InPlace<int32_t>(traj_meta, traj_meta_out);
  int32_t* co = InPlace<int32_t>(counters, counters_out);
  const LoopAConfig cfg{micro_scale, clip,    base_scale, micro_lr, gate_margin,
                        gate_ratio,  strengthen, weaken,  ema,      n_tiers};
  const LoopAFn one = LoopAFor(sh.r);
  thread_local std::vector<float> work;
  thread_local std::vector<int32_t> iwork;
  for (int64_t i = 0; i < n; ++i) {
    float* rep = report->typed_data() + i * 5;
    const int64_t t = tenant_of(i);
    if (t < 0 || t >= T) {
      std::fill(rep, rep + 5, 0.0f);
      continue;
    }
    const int64_t dr = sh.d * sh.r, drb = sh.d * sh.rb;
    one(ao + t * dr, bo + t * dr, eo + t * sh.N * edge_w, no + t * sh.N * sh.fields,
        so + t * sh.sig_cap * sig_w, smo + t * 5, to + t * sh.traj_cap * traj_w, tmo + t * 5,
        co + t * 4, base_a.typed_data() + t * drb, base_b.typed_data() + t * drb,
        emb.typed_data() + t * sh.N * sh.d, packed.typed_data() + i * sh.width, valid(i), sh, cfg,
        rep, work, iwork);
  }
  StreamFence();
  return ffi::Error::Success();
}

#define SONA_LOOP_A_ARGS                                                                     \
  a, b, edges, node, sig, sig_meta, traj, traj_meta, counters, base_a, base_b, emb, packed,  \
      micro_scale, clip, base_scale, micro_lr, gate_margin, gate_ratio, strengthen, weaken,  \
      ema, n_tiers, a_out, b_out, edges_out, node_out, sig_out, sig_meta_out, traj_out,      \
      traj_meta_out, counters_out, report

// One learner: rows at or past n_valid are padding.
ffi::Error LoopAImpl(SONA_LOOP_A_OPERANDS, ffi::Buffer<ffi::S32> n_valid, SONA_LOOP_A_ATTRS,
                     SONA_LOOP_A_RESULTS) {
  const int64_t n_ok = n_valid.typed_data()[0];
  return RunLoopA(SONA_LOOP_A_ARGS, [](int64_t) { return int64_t{0}; },
                  [n_ok](int64_t i) { return i < n_ok; });
}

// Stacked tenants: row i goes to tenant tids[i] (skipped when outside [0, T)).
ffi::Error LoopATenantsImpl(SONA_LOOP_A_OPERANDS, ffi::Buffer<ffi::S32> tids, SONA_LOOP_A_ATTRS,
                            SONA_LOOP_A_RESULTS) {
  const int32_t* ids = tids.typed_data();
  if (tids.element_count() != packed.dimensions()[0]) {
    return ffi::Error::InvalidArgument("sona_loop_a_tenants: one tenant id per row");
  }
  return RunLoopA(SONA_LOOP_A_ARGS, [ids](int64_t i) { return int64_t{ids[i]}; },
                  [](int64_t) { return true; });
}
}  // namespace

// Both handlers bind the same operands, attributes and results.
#define SONA_LOOP_A_BINDING                                  \
  ffi::Ffi::Bind()                                           \
  .Arg<ffi::Buffer<ffi::F32>>()  /* micro a */               \
  .Arg<ffi::Buffer<ffi::F32>>()  /* micro b */               \
  .Arg<ffi::Buffer<ffi::S32>>()  /* edges */                 \
  .Arg<ffi::Buffer<ffi::S32>>()  /* node */                  \
  .Arg<ffi::Buffer<ffi::F32>>()  /* signals */               \
  .Arg<ffi::Buffer<ffi::S32>>()  /* signal ring meta */      \
  .Arg<ffi::Buffer<ffi::F32>>()  /* trajectories */          \
  .Arg<ffi::Buffer<ffi::S32>>()  /* trajectory ring meta */  \
  .Arg<ffi::Buffer<ffi::S32>>()  /* counters */              \
  .Arg<ffi::Buffer<ffi::F32>>()  /* base a */                \
  .Arg<ffi::Buffer<ffi::F32>>()  /* base b */                \
  .Arg<ffi::Buffer<ffi::F32>>()  /* emb */                   \
  .Arg<ffi::Buffer<ffi::F32>>()  /* packed interactions */   \
  .Arg<ffi::Buffer<ffi::S32>>()  /* n_valid / tenant ids */  \
  .Attr<float>("micro_scale")                                \
  .Attr<float>("clip")                                       \
  .Attr<float>("base_scale")                                 \
  .Attr<float>("micro_lr")                                   \
  .Attr<float>("gate_margin")                                \
  .Attr<float>("gate_ratio")                                 \
  .Attr<float>("strengthen")                                 \
  .Attr<float>("weaken")                                     \
  .Attr<float>("ema")                                        \
  .Attr<int32_t>("n_tiers")                                  \
  .Ret<ffi::Buffer<ffi::F32>>()  /* micro a */               \
  .Ret<ffi::Buffer<ffi::F32>>()  /* micro b */               \
  .Ret<ffi::Buffer<ffi::S32>>()  /* edges */                 \
  .Ret<ffi::Buffer<ffi::S32>>()  /* node */                  \
  .Ret<ffi::Buffer<ffi::F32>>()  /* signals */               \
  .Ret<ffi::Buffer<ffi::S32>>()  /* signal ring meta */      \
  .Ret<ffi::Buffer<ffi::F32>>()  /* trajectories */          \
  .Ret<ffi::Buffer<ffi::S32>>()  /* trajectory ring meta */  \
  .Ret<ffi::Buffer<ffi::S32>>()  /* counters */              \
  .Ret<ffi::Buffer<ffi::F32>>()  /* report */

XLA_FFI_DEFINE_HANDLER_SYMBOL(SonaLoopA, LoopAImpl, SONA_LOOP_A_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SonaLoopATenants, LoopATenantsImpl, SONA_LOOP_A_BINDING);
