// The decoder's small per-layer ops for CPU, each one call instead of 5-12 torch ops: residual add + RMSNorm,
// rotary embeddings of q and k, and silu(gate) * up. At decode shapes each torch op costs ~5 us of dispatch
// for a few hundred ns of work; these ran ~10% of a batch-32 decode step.
//
// Each keeps the rounding of the torch code it replaces (models/layers.py RMSNorm, models/rope.py, the MLP):
// values are computed in fp32 and rounded to the model dtype wherever the torch code holds a model-dtype tensor,
// so bf16 results match to the last bit except where a sum's order differs. tests/test_cpu_fused.py holds them
// to the torch code. Built by loraplex/native.py, called through ctypes. bf16 travels as uint16 bits.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

namespace {

using namespace loraplex;

inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) {  // fp32 -> bf16 -> fp32, as a bf16 tensor holds it
  uint16_t h;
  store1(&h, v);
  return to_f32(h);
}

// residual[t] = x[t] + residual[t] (when add), then out[t] = w * (residual[t] * rsqrt(mean(residual[t]^2) + eps)).
template <typename T>
void add_rmsnorm(const T* x, T* residual, const T* w, float eps, T* out, int64_t rows, int64_t d, bool add,
                 int nthreads) {
  const int64_t vd = d / kL * kL;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && rows > 1)
  for (int64_t t = 0; t < rows; ++t) {
    T* r = residual + t * d;
    const T* xr = x + t * d;
    T* o = out + t * d;
    fvec acc = {};
    for (int64_t i = 0; i < vd; i += kL) {
      fvec v = loadv(r + i);
      if (add) {
        v = roundv(loadv(xr + i) + v, r);
        storev(r + i, v);
      }
      acc += v * v;
    }
    float ss = hsum(acc);
    for (int64_t i = vd; i < d; ++i) {
      float v = to_f32(r[i]);
      if (add) {
        v = round_to(to_f32(xr[i]) + v, r);
        store1(r + i, v);
      }
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / float(d) + eps);
    for (int64_t i = 0; i < vd; i += kL) storev(o + i, loadv(w + i) * roundv(loadv(r + i) * inv, o));
    for (int64_t i = vd; i < d; ++i) store1(o + i, to_f32(w[i]) * round_to(to_f32(r[i]) * inv, o));
  }
}

// NeoX-style rotation of `heads` rows of d at src into dst (contiguous): y = x*cos + rot(x)*sin with
// rot(x) = (-x[d/2:], x[:d/2]); cos and sin are the model's tables, in the model dtype as models/rope.py uses them.
template <typename T>
inline void rotate(const T* src, T* dst, int64_t heads, int64_t d, const T* cos, const T* sin) {
  const int64_t half = d / 2, vh = half / kL * kL;
  for (int64_t h = 0; h < heads; ++h) {
    const T* x = src + h * d;
    T* y = dst + h * d;
    for (int64_t i = 0; i < vh; i += kL) {
      const fvec x1 = loadv(x + i), x2 = loadv(x + half + i);
      const fvec c1 = loadv(cos + i), s1 = loadv(sin + i), c2 = loadv(cos + half + i), s2 = loadv(sin + half + i);
      storev(y + i, roundv(x1 * c1, y) + roundv((fvec{} - x2) * s1, y));
      storev(y + half + i, roundv(x2 * c2, y) + roundv(x1 * s2, y));
    }
    for (int64_t i = vh; i < half; ++i)
      for (int64_t j : {i, i + half}) {
        const float c = to_f32(cos[j]), s = to_f32(sin[j]);
        const float rot = j < half ? -to_f32(x[j + half]) : to_f32(x[j - half]);
        store1(y + j, round_to(to_f32(x[j]) * c, y) + round_to(rot * s, y));
      }
  }
}

template <typename T>
void rope(const T* qk, int64_t ld, int64_t rows, int64_t heads, int64_t kv_heads, int64_t d, const int64_t* positions,
          const T* cos, const T* sin, T* q_out, T* k_out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && rows > 1)
  for (int64_t t = 0; t < rows; ++t) {
    const T* c = cos + positions[t] * d;
    const T* s = sin + positions[t] * d;
    rotate(qk + t * ld, q_out + t * heads * d, heads, d, c, s);
    rotate(qk + t * ld + heads * d, k_out + t * kv_heads * d, kv_heads, d, c, s);
  }
}

// out[t] = silu(gate[t]) * up[t], gate and up the two halves of gate_up[t] (width 2*d).
template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t rows, int64_t d, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && rows > 1)
  for (int64_t t = 0; t < rows; ++t) {
    const T* g = gate_up + t * 2 * d;
    const T* u = g + d;
    T* o = out + t * d;
    int64_t i = 0;
    for (; i + kL <= d; i += kL) {
      const fvec x = loadv(g + i);
      const fvec act = x / (1.f + vexp(fvec{} - x));
      storev(o + i, roundv(act, o) * loadv(u + i));
    }
    for (; i < d; ++i) {
      const float x = to_f32(g[i]);
      store1(o + i, round_to(x / (1.f + std::exp(-x)), o) * to_f32(u[i]));
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = bfloat16; each returns 0, or -1 for an unknown dtype.
int loraplex_add_rmsnorm(int dtype, const void* x, void* residual, const void* w, float eps, void* out, int64_t rows,
                         int64_t d, int add, int nthreads) {
  if (dtype == 0)
    add_rmsnorm(static_cast<const float*>(x), static_cast<float*>(residual), static_cast<const float*>(w), eps,
                static_cast<float*>(out), rows, d, add != 0, nthreads);
  else if (dtype == 1)
    add_rmsnorm(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(residual), static_cast<const uint16_t*>(w),
                eps, static_cast<uint16_t*>(out), rows, d, add != 0, nthreads);
  else
    return -1;
  return 0;
}

int loraplex_rope(int dtype, const void* qk, int64_t ld, int64_t rows, int64_t heads, int64_t kv_heads, int64_t d,
                  const int64_t* positions, const void* cos, const void* sin, void* q_out, void* k_out,
                  int nthreads) {
  if (dtype == 0)
    rope(static_cast<const float*>(qk), ld, rows, heads, kv_heads, d, positions, static_cast<const float*>(cos),
         static_cast<const float*>(sin), static_cast<float*>(q_out), static_cast<float*>(k_out), nthreads);
  else if (dtype == 1)
    rope(static_cast<const uint16_t*>(qk), ld, rows, heads, kv_heads, d, positions, static_cast<const uint16_t*>(cos),
         static_cast<const uint16_t*>(sin), static_cast<uint16_t*>(q_out), static_cast<uint16_t*>(k_out), nthreads);
  else
    return -1;
  return 0;
}

int loraplex_silu_mul(int dtype, const void* gate_up, void* out, int64_t rows, int64_t d, int nthreads) {
  if (dtype == 0)
    silu_mul(static_cast<const float*>(gate_up), static_cast<float*>(out), rows, d, nthreads);
  else if (dtype == 1)
    silu_mul(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), rows, d, nthreads);
  else
    return -1;
  return 0;
}

}  // extern "C"
