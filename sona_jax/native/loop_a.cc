// Loop A's sequential parts on CPU as XLA FFI custom calls (sona_jax/native/__init__.py):
// SonaMicroChain, the micro-LoRA chain, and SonaGraphWrites, the Hebbian edge and node updates.
//
// SonaMicroChain.
// The reference is the pure-JAX rule: `sona_jax.loops.instant._learn` (the feedback direction in
// the tangent space of the adapted query) followed by `sona_jax.lora.micro_update_fast` (the
// clipped rank-r step), applied interaction by interaction and masked by the acceptance decision.
// Every step reads the adapter the previous one wrote, so the chain is sequential; on XLA:CPU each
// step of it is ~18 small kernels at ~1 us each, while here it is a few passes over `dim`.
//
// Operands (leading batch dims `T...`, e.g. from vmap, are looped over):
//   a:       f32[T..., d, r]   micro-LoRA A
//   b:       f32[T..., r, d]   micro-LoRA B
//   vecs:    f32[T..., n, 4, d] per interaction: query x, x through the base LoRA, the weighted
//            difference of used and unused memory embeddings, the supervised gradient
//   scalars: f32[T..., n, 8]   q_eff, open_gate, has_grad, |x|^2, |grad|^2, reasons (int32 bits),
//            learning rate, time (int32 bits, < 0 when unset)
//   newest:  s32[T...]         the newest accepted time before the chain
// Attributes: scale (s = alpha / r), clip (maximum norm of each factor's step; < 0: no clip).
// Results: a, b (aliased to the operands), out f32[T..., n, 4] = [reasons (bits), active,
// step norm (0 when rejected), time (bits, unset times resolved)], newest s32[T...].

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// One adapter (a: [d, r], b: [r, d]) through n interactions. `R` is the rank when known at
// compile time (0: the runtime `r`): the passes over `dim` then fuse every product of a pass into
// one loop of kLanes-wide partial sums, which the compiler vectorises.
template <int R>
void Chain(float* a, float* b, const float* vecs, const float* scalars, int32_t* newest, float* out,
           int64_t n, int64_t d, int64_t r_runtime, float scale, float clip,
           std::vector<float>& work) {
  const int64_t r = R > 0 ? R : r_runtime;
  constexpr int kMaxR = R > 0 ? R : 64;
  work.resize(2 * d);
  float* y = work.data();  // adapted query y_hat
  float* t = y + d;        // feedback direction (tangent part of the difference)
  float xa[kMaxR], bt[kMaxR], bg[kMaxR], gb[kMaxR], cb[kMaxR];
  for (int64_t k = 0; k < n; ++k) {
    const float* x = vecs + k * 4 * d;
    const float* y_base = x + d;
    const float* diff = x + 2 * d;
    const float* grad = x + 3 * d;
    const float* sc = scalars + k * 8;
    const float q_eff = sc[0];
    const bool open_gate = sc[1] > 0.0f, has_grad = sc[2] > 0.0f;
    const float sq_x = sc[3], sq_grad = sc[4], lr = sc[6];
    int32_t reasons = Int(sc[5]);
    int32_t time = Int(sc[7]);
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
    // Pass 3: t = diff - (diff . u) u with u = y_hat / |y_hat|; |t|^2, B t, B grad.
    float sq_t;
    {
      float att[kLanes] = {}, abt[kMaxR][kLanes] = {}, abg[kMaxR][kLanes] = {};
      auto body = [&](int64_t i, int l) {
        const float ti = diff[i] - along * y[i];
        t[i] = ti;
        att[l] += ti * ti;
        for (int64_t j = 0; j < r; ++j) {
          abt[j][l] += b[j * d + i] * ti;
          abg[j][l] += b[j * d + i] * grad[i];
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
    }
    const float t_norm = std::sqrt(sq_t);
    const float fb_scale = -(1.0f - q_eff) / std::fmax(t_norm, 1e-12f);
    const bool active = has_grad || (open_gate && t_norm > 1e-12f);
    // lora.micro_update_fast with g = grad (supervised) or fb_scale * t (feedback).
    float sq_gb = 0.0f, sq_xa = 0.0f;
    for (int64_t j = 0; j < r; ++j) {
      gb[j] = has_grad ? bg[j] : fb_scale * bt[j];
      sq_gb += gb[j] * gb[j];
      sq_xa += xa[j] * xa[j];
    }
    const float sq_g = has_grad ? sq_grad : fb_scale * fb_scale * sq_t;
    const float coef = lr * (active ? 1.0f : 0.0f) * scale;
    const float norm_a = std::fabs(coef) * std::sqrt(sq_x * sq_gb);
    const float norm_b = std::fabs(coef) * std::sqrt(sq_xa * sq_g);
    const float step_norm = std::sqrt(norm_a * norm_a + norm_b * norm_b);
    float coef_a = coef, coef_b = coef;
    if (clip >= 0.0f) {
      coef_a = coef * std::fmin(1.0f, clip / std::fmax(norm_a, kTiny));
      coef_b = coef * std::fmin(1.0f, clip / std::fmax(norm_b, kTiny));
    }
    if (!std::isfinite(step_norm)) reasons |= kNonfiniteStep;
    const bool ok = reasons == 0;
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
    if (time < 0) time = *newest;  // an unset time: the newest accepted so far
    if (ok && time > *newest) *newest = time;
    float* o = out + k * 4;
    o[0] = Bits(reasons);
    o[1] = active ? 1.0f : 0.0f;
    o[2] = ok ? step_norm : 0.0f;
    o[3] = Bits(time);
  }
}

using ChainFn = void (*)(float*, float*, const float*, const float*, int32_t*, float*, int64_t,
                         int64_t, int64_t, float, float, std::vector<float>&);

ChainFn ChainFor(int64_t r) {
  switch (r) {
    case 1: return Chain<1>;  // SonaConfig.micro_rank is 1 or 2
    case 2: return Chain<2>;
    default: return Chain<0>;
  }
}

ffi::Error MicroChainImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                          ffi::Buffer<ffi::F32> vecs, ffi::Buffer<ffi::F32> scalars,
                          ffi::Buffer<ffi::S32> newest, float scale, float clip,
                          ffi::ResultBuffer<ffi::F32> a_out, ffi::ResultBuffer<ffi::F32> b_out,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::S32> newest_out) {
  auto ad = a.dimensions();
  auto vd = vecs.dimensions();
  if (ad.size() < 2 || vd.size() < 3 || vd[vd.size() - 2] != 4) {
    return ffi::Error::InvalidArgument("sona_micro_chain: bad operand ranks");
  }
  const int64_t d = ad[ad.size() - 2], r = ad[ad.size() - 1];
  const int64_t n = vd[vd.size() - 3];
  if (vd[vd.size() - 1] != d || b.element_count() != a.element_count()) {
    return ffi::Error::InvalidArgument("sona_micro_chain: operand shapes do not match");
  }
  const int64_t batch = static_cast<int64_t>(a.element_count()) / (d * r);
  if (static_cast<int64_t>(newest.element_count()) != batch ||
      static_cast<int64_t>(vecs.element_count()) != batch * n * 4 * d ||
      static_cast<int64_t>(scalars.element_count()) != batch * n * 8) {
    return ffi::Error::InvalidArgument("sona_micro_chain: batch dimensions do not match");
  }
  float* ao = a_out->typed_data();
  float* bo = b_out->typed_data();
  if (ao != a.typed_data()) std::memcpy(ao, a.typed_data(), a.size_bytes());
  if (bo != b.typed_data()) std::memcpy(bo, b.typed_data(), b.size_bytes());
  if (r > 64) return ffi::Error::InvalidArgument("sona_micro_chain: rank above 64");
  const ChainFn chain = ChainFor(r);
  std::vector<float> work;
  for (int64_t p = 0; p < batch; ++p) {
    int32_t latest = newest.typed_data()[p];
    chain(ao + p * d * r, bo + p * r * d, vecs.typed_data() + p * n * 4 * d,
          scalars.typed_data() + p * n * 8, &latest, out->typed_data() + p * n * 4, n, d, r, scale,
          clip, work);
    newest_out->typed_data()[p] = latest;
  }
  return ffi::Error::Success();
}


// Loop A's graph writes (sona_jax.graph.hebbian_row on the anchor's edge row, then the access
// count, last access and quality EMA of the used memories), interaction by interaction.
// Reference: `sona_jax.loops.instant._edges` and `_nodes`; the same f32 operations in the same
// order (built without FMA contraction), so the results are bit-identical to them.
constexpr int32_t kHebbian = 0;                               // graph.HEBBIAN
constexpr int kAccess = 0, kLastAccess = 1, kQuality = 3;     // graph's node columns

// graph.hebbian_row on one packed row i32[3K]; returns the number of ids that changed an edge.
int32_t HebbianRow(int32_t* row, int64_t K, int32_t anchor, const int32_t* used,
                   const int32_t* unused, int64_t k, float s, float rate,
                   std::vector<int32_t>& work) {
  work.resize(4 * K + 3 * k);
  int32_t* nbr0 = work.data();  // the row's neighbours before the update
  int32_t* position = nbr0 + K;
  int32_t* inserted = position + K;
  int32_t* new_id = inserted + K;
  int32_t* u_has = new_id + K;
  int32_t* u_ins = u_has + k;
  int32_t* target = u_ins + k;
  int32_t* nbr = row;
  float* w = reinterpret_cast<float*>(row + K);
  int32_t* kind = row + 2 * K;
  std::memcpy(nbr0, nbr, K * sizeof(int32_t));
  std::vector<uint8_t> strengthened(K, 0), weakened(K, 0);
  std::vector<float> key(K);
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

ffi::Error GraphWritesImpl(ffi::Buffer<ffi::S32> edges, ffi::Buffer<ffi::S32> node,
                           ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> info,
                           float strengthen, float weaken, float ema,
                           ffi::ResultBuffer<ffi::S32> edges_out,
                           ffi::ResultBuffer<ffi::S32> node_out,
                           ffi::ResultBuffer<ffi::S32> changed_out) {
  auto ed = edges.dimensions(), nd = node.dimensions(), id = ids.dimensions();
  if (ed.size() < 2 || nd.size() < 2 || id.size() < 2) {
    return ffi::Error::InvalidArgument("sona_graph_writes: bad operand ranks");
  }
  const int64_t N = ed[ed.size() - 2], width = ed[ed.size() - 1], fields = nd[nd.size() - 1];
  const int64_t n = id[id.size() - 2], k = (id[id.size() - 1] - 1) / 2;
  if (width % 3 != 0 || nd[nd.size() - 2] != N || fields <= kQuality ||
      id[id.size() - 1] != 2 * k + 1) {
    return ffi::Error::InvalidArgument("sona_graph_writes: operand shapes do not match");
  }
  const int64_t K = width / 3;
  const int64_t batch = static_cast<int64_t>(edges.element_count()) / (N * width);
  if (static_cast<int64_t>(node.element_count()) != batch * N * fields ||
      static_cast<int64_t>(ids.element_count()) != batch * n * (2 * k + 1) ||
      static_cast<int64_t>(info.element_count()) != batch * n * 3) {
    return ffi::Error::InvalidArgument("sona_graph_writes: batch dimensions do not match");
  }
  int32_t* eo = edges_out->typed_data();
  int32_t* no = node_out->typed_data();
  if (eo != edges.typed_data()) std::memcpy(eo, edges.typed_data(), edges.size_bytes());
  if (no != node.typed_data()) std::memcpy(no, node.typed_data(), node.size_bytes());
  std::vector<int32_t> work;
  for (int64_t p = 0; p < batch; ++p) {
    int32_t* E = eo + p * N * width;
    int32_t* V = no + p * N * fields;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* it_ids = ids.typed_data() + (p * n + i) * (2 * k + 1);
      const int32_t* it_info = info.typed_data() + (p * n + i) * 3;
      int32_t changed = 0;
      if (it_info[0] != 0) {  // accepted
        const int32_t anchor = it_ids[2 * k];
        if (anchor >= 0 && anchor < N) {
          changed = HebbianRow(E + anchor * width, K, anchor, it_ids, it_ids + k, k, strengthen,
                               weaken, work);
        }
        const float q_eff = Bits(it_info[1]);
        for (int64_t j = 0; j < k; ++j) {
          const int32_t u = it_ids[j];
          if (u < 0 || u >= N) continue;
          int32_t* row = V + u * fields;
          row[kAccess] += 1;
          row[kLastAccess] = it_info[2];
          row[kQuality] = Int((1.0f - ema) * Bits(row[kQuality]) + ema * q_eff);
        }
      }
      changed_out->typed_data()[p * n + i] = changed;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SonaMicroChain, MicroChainImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vecs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scalars
                                  .Arg<ffi::Buffer<ffi::S32>>()  // newest
                                  .Attr<float>("scale")
                                  .Attr<float>("clip")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a
                                  .Ret<ffi::Buffer<ffi::F32>>()  // b
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::S32>>()  // newest
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SonaGraphWrites, GraphWritesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // edges
                                  .Arg<ffi::Buffer<ffi::S32>>()  // node
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // info
                                  .Attr<float>("strengthen")
                                  .Attr<float>("weaken")
                                  .Attr<float>("ema")
                                  .Ret<ffi::Buffer<ffi::S32>>()  // edges
                                  .Ret<ffi::Buffer<ffi::S32>>()  // node
                                  .Ret<ffi::Buffer<ffi::S32>>()  // changed
);
