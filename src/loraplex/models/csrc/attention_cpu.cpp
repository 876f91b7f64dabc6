// Paged decode attention for CPU: one query token per sequence against its keys and values read in place
// from the paged KV cache, grouped-query heads sharing each K/V row read.
//
// The torch reference is PagedAttention._attend_group (models/attention.py); tests/test_cpu_attention.py
// holds the two equal. Built by loraplex/native.py with the machine's C++ compiler, called through ctypes.
//
// Shapes (row-major, contiguous):
//   q        [B, H, D]        the decode queries, float32 or bfloat16 (uint16 bits)
//   k, v     [S, KVH, D]      the layer's cache; token slot = block_id * block_size + offset
//   tables   [B, NB] int64    block ids per sequence (padding never read: ctx_lens bounds the keys)
//   ctx_lens [B] int64        keys 0 .. ctx-1 are attended; the query sits at position ctx-1
//   window   int64            0 = full causal; else only keys at positions > ctx-1 - window
//   out      [B, H, D]        softmax(q k^T * scale) v, computed in fp32, rounded once
// Query head h reads KV head h / (H / KVH), as transformers' repeat_kv lays them out.
//
// Why: the torch path gathers every sequence's blocks into a padded copy, transposes it (another copy)
// and multiplies; at decode shapes those copies were a quarter of a step. Here each K and V row is read
// once, for all the query heads that share it, with fp32 accumulators in registers.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

namespace {

using namespace loraplex;

constexpr int kMaxGroup = 16;  // query heads per KV head handled in registers
constexpr int kMaxChunks = 32;  // head_dim up to kMaxChunks * kL: 512 with AVX-512, 256 with AVX2

// exp(x) for x <= 0 (softmax inputs after the max is subtracted), Cephes' expf: x = n ln2 + r, |r| <= ln2/2,
// a degree-6 polynomial for exp(r), then 2^n in the exponent bits. About 1 ulp; below -87.3 it returns
// exp(-87.3) ~ 1e-38 where libm would give a denormal or 0, the same to fp32 softmax.
inline fvec vexp(fvec x) {
  const fvec lo = fvec{} - 87.3f;
  x = x < lo ? lo : x;
  fvec fx = x * 1.44269504088896341f + 0.5f;
  ivec n = __builtin_convertvector(fx, ivec);  // truncation; floor below
  fvec fn = __builtin_convertvector(n, fvec);
  ivec gt = fn > fx;  // -1 where truncation rounded up (negative fx)
  n += gt;
  fn = __builtin_convertvector(n, fvec);
  x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const fvec z = x * x;
  fvec y = fvec{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.f;
  ivec bits = (n + 127) << 23;
  fvec pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);
  return y * pow2n;
}

// One (sequence, KV head): G query heads of dimension D against keys [lo, ctx). `rows` and `scores` are the
// calling thread's scratch.
template <typename T, int G>
void attend(const T* q, const T* k, const T* v, const int64_t* table, int64_t lo, int64_t ctx, int64_t kvh,
            int64_t h0, int64_t d, int64_t block_size, int64_t kv_heads, float scale, T* out,
            std::vector<int64_t>& rows, std::vector<float>& scores) {
  const int64_t n = ctx - lo;
  const int64_t chunks = d / kL, td = chunks * kL;  // full vectors; a tail of d % kL runs in scalars
  rows.resize(size_t(n));
  scores.resize(size_t(n) * G);
  for (int64_t p = lo; p < ctx; ++p)  // where each key's row starts, from the block table
    rows[size_t(p - lo)] = ((table[p / block_size] * block_size + p % block_size) * kv_heads + kvh) * d;
  fvec qv[G][kMaxChunks];
  float qt[G][kL];  // the tail
  for (int g = 0; g < G; ++g) {
    const T* qg = q + (h0 + g) * d;
    for (int64_t c = 0; c < chunks; ++c) qv[g][c] = loadv(qg + c * kL) * scale;
    for (int64_t i = td; i < d; ++i) qt[g][i - td] = to_f32(qg[i]) * scale;
  }
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  // Pass 1: scores and their row maxima; each key row read once for the G heads.
  constexpr int64_t kAhead = 8;  // keys prefetched ahead: rows are scattered over blocks, strided within one
  const int64_t row_bytes = d * int64_t(sizeof(T));
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + rows[size_t(j)];
    if (j + kAhead < n) {
      const char* ahead = reinterpret_cast<const char*>(k + rows[size_t(j + kAhead)]);
      for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off);
    }
    fvec acc[G] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const fvec kc = loadv(kr + c * kL);
      for (int g = 0; g < G; ++g) acc[g] += qv[g][c] * kc;
    }
    for (int g = 0; g < G; ++g) {
      float s = hsum(acc[g]);
      for (int64_t i = td; i < d; ++i) s += qt[g][i - td] * to_f32(kr[i]);
      scores[size_t(g) * n + j] = s;
      mx[g] = s > mx[g] ? s : mx[g];
    }
  }
  // exp(s - max) over each head's row of scores, kL at a time.
  float sum[G] = {};
  for (int g = 0; g < G; ++g) {
    float* row = &scores[size_t(g) * n];
    const fvec m = fvec{} + mx[g];
    fvec acc = {};
    int64_t j = 0;
    for (; j + kL <= n; j += kL) {
      const fvec e = vexp(loadv(row + j) - m);
      std::memcpy(row + j, &e, sizeof e);
      acc += e;
    }
    sum[g] = hsum(acc);
    for (; j < n; ++j) {
      row[j] = std::exp(row[j] - mx[g]);
      sum[g] += row[j];
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = 1.f / sum[g];
  // Pass 2: the weighted sum of values, one vector of D at a time so the G accumulators stay in registers
  // (the sequence's V rows stay in L1/L2 between chunks).
  for (int64_t c = 0; c < chunks; ++c) {
    fvec acc[G] = {};
    for (int64_t j = 0; j < n; ++j) {
      if (c == 0 && j + kAhead < n) {  // the first chunk's pass brings every row of V in
        const char* ahead = reinterpret_cast<const char*>(v + rows[size_t(j + kAhead)]);
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off);
      }
      const fvec vc = loadv(v + rows[size_t(j)] + c * kL);
      for (int g = 0; g < G; ++g) acc[g] += scores[size_t(g) * n + j] * vc;
    }
    for (int g = 0; g < G; ++g) {
      T* o = out + (h0 + g) * d + c * kL;
      for (int i = 0; i < kL; ++i) store1(o + i, acc[g][i] * inv[g]);
    }
  }
  for (int64_t i = td; i < d; ++i) {
    float acc[G] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float vi = to_f32(v[rows[size_t(j)] + i]);
      for (int g = 0; g < G; ++g) acc[g] += scores[size_t(g) * n + j] * vi;
    }
    for (int g = 0; g < G; ++g) store1(out + (h0 + g) * d + i, acc[g] * inv[g]);
  }
}

template <typename T, int G>
void decode(const T* q, const T* k, const T* v, const int64_t* tables, int64_t nb, const int64_t* ctx_lens,
            int64_t b, int64_t h, int64_t kvh, int64_t d, int64_t block_size, int64_t window, float scale, T* out,
            int nthreads) {
  const int64_t items = b * kvh;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1)
  {
    std::vector<int64_t> rows;
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t s = it / kvh, head = it % kvh;
      const int64_t ctx = ctx_lens[s];
      const int64_t lo = window > 0 && ctx > window ? ctx - window : 0;
      attend<T, G>(q + s * h * d, k, v, tables + s * nb, lo, ctx, head, head * G, d, block_size, kvh, scale,
                   out + s * h * d, rows, scores);
    }
  }
}

template <typename T>
int dispatch(int group, const T* q, const T* k, const T* v, const int64_t* tables, int64_t nb,
             const int64_t* ctx_lens, int64_t b, int64_t h, int64_t kvh, int64_t d, int64_t block_size,
             int64_t window, float scale, T* out, int nthreads) {
#define LORAPLEX_GROUP(G) \
  case G: decode<T, G>(q, k, v, tables, nb, ctx_lens, b, h, kvh, d, block_size, window, scale, out, nthreads); return 0;
  switch (group) {
    LORAPLEX_GROUP(1) LORAPLEX_GROUP(2) LORAPLEX_GROUP(3) LORAPLEX_GROUP(4) LORAPLEX_GROUP(5) LORAPLEX_GROUP(6)
    LORAPLEX_GROUP(7) LORAPLEX_GROUP(8) LORAPLEX_GROUP(12) LORAPLEX_GROUP(16)
    default: return -2;
  }
#undef LORAPLEX_GROUP
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = bfloat16. Returns 0; -1 for an unknown dtype, -2 for a head grouping or a
// head_dim this build does not handle (the caller then takes the torch path).
int loraplex_paged_decode(int dtype, const void* q, const void* k, const void* v, const int64_t* tables, int64_t nb,
                          const int64_t* ctx_lens, int64_t b, int64_t h, int64_t kvh, int64_t d, int64_t block_size,
                          int64_t window, float scale, void* out, int nthreads) {
  if (kvh <= 0 || h % kvh != 0 || d > kMaxChunks * kL || h / kvh > kMaxGroup) return -2;
  const int group = int(h / kvh);
  if (dtype == 0)
    return dispatch(group, static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
                    tables, nb, ctx_lens, b, h, kvh, d, block_size, window, scale, static_cast<float*>(out), nthreads);
  if (dtype == 1)
    return dispatch(group, static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k),
                    static_cast<const uint16_t*>(v), tables, nb, ctx_lens, b, h, kvh, d, block_size, window, scale,
                    static_cast<uint16_t*>(out), nthreads);
  return -1;
}

}  // extern "C"
