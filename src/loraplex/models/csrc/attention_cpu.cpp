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

// The sums of 4 vectors, one per key, in out[0..3]: a transposing tree of shuffles (8 shuffles and 5 adds for the
// 4, against 4 separate horizontal sums' 16 and 16).
inline void reduce4(fvec a0, fvec a1, fvec a2, fvec a3, float* out) {
#if defined(__AVX512F__)
  const fvec t01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const fvec t23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // 4 lanes per key: key 0 in lanes 0-3, 1 in 4-7, 2 in 8-11, 3 in 12-15
  fvec u = __builtin_shufflevector(t01, t23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(t01, t23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  u += __builtin_shufflevector(u, u, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  u += __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = u[0], out[1] = u[4], out[2] = u[8], out[3] = u[12];
#else
  const fvec t01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const fvec t23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  // 2 lanes per key: key 0 in lanes 0-1, 1 in 2-3, 2 in 4-5, 3 in 6-7
  fvec u = __builtin_shufflevector(t01, t23, 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(t01, t23, 2, 3, 6, 7, 10, 11, 14, 15);
  u += __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6);
  out[0] = u[0], out[1] = u[2], out[2] = u[4], out[3] = u[6];
#endif
}

// Pass 2's vectors of d per group: the largest divisor of C with G x it accumulators in registers (24 of the 32
// zmm, 12 of the 16 ymm), at least 1.
constexpr int vectors_per_group(int g, int c) {
  const int regs = kL == 16 ? 24 : 12;
  int best = 1;
  for (int x = 1; x <= c; ++x)
    if (c % x == 0 && g * x <= regs) best = x;
  return best;
}

// One (sequence, KV head): G query heads of dimension d against keys [lo, ctx). C = d / kL vectors per row when
// d is a multiple of kL the dispatch knows at compile time (the loops unroll and the accumulators stay in
// registers), else 0: d at run time, with a scalar tail. `rows` and `scores` are the calling thread's scratch.
template <typename T, int G, int C>
void attend(const T* q, const T* k, const T* v, const int64_t* table, int64_t lo, int64_t ctx, int64_t kvh,
            int64_t h0, int64_t d, int64_t block_size, int64_t kv_heads, float scale, T* out,
            std::vector<int64_t>& rows, std::vector<float>& scores) {
  const int64_t n = ctx - lo;
  const int64_t chunks = C > 0 ? C : d / kL, td = chunks * kL;  // full vectors; a tail of d % kL in scalars
  rows.resize(size_t(n) + 4);
  scores.resize(size_t(n + 4) * G);
  for (int64_t blk = lo / block_size, p = lo; p < ctx; ++blk) {  // where each key's row starts (no division per key)
    const int64_t shift = (table[blk] - blk) * block_size;  // slot = position + shift within this block
    const int64_t end = (blk + 1) * block_size < ctx ? (blk + 1) * block_size : ctx;
    for (; p < end; ++p) rows[size_t(p - lo)] = ((p + shift) * kv_heads + kvh) * d;
  }
  for (int64_t j = n; j < n + 4; ++j) rows[size_t(j)] = rows[0];  // padding for the last group of 4 keys
  fvec qv[G][C > 0 ? C : kMaxChunks];
  float qt[G][kL];  // the tail
  for (int g = 0; g < G; ++g) {
    const T* qg = q + (h0 + g) * d;
    for (int64_t c = 0; c < chunks; ++c) qv[g][c] = loadv(qg + c * kL) * scale;
    for (int64_t i = td; i < d; ++i) qt[g][i - td] = to_f32(qg[i]) * scale;
  }
  constexpr int64_t kAhead = 8;  // keys prefetched ahead: rows are scattered over blocks, strided within one
  const int64_t row_bytes = d * int64_t(sizeof(T));
  float* const sc = scores.data();
  const int64_t ld = n + 4;  // scores row stride: [G][n + 4], the padding keys land past n
  // Pass 1: scores, 4 keys at a time, each K row read once for the G heads.
  for (int64_t j = 0; j < n; j += 4) {
    const T* kr[4] = {k + rows[size_t(j)], k + rows[size_t(j + 1)], k + rows[size_t(j + 2)], k + rows[size_t(j + 3)]};
    for (int64_t a = j + kAhead; a < j + kAhead + 4 && a < n; ++a) {
      const char* ahead = reinterpret_cast<const char*>(k + rows[size_t(a)]);
      for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off);
    }
    fvec acc[G][4] = {};
    for (int64_t c = 0; c < chunks; ++c)
      for (int t = 0; t < 4; ++t) {
        const fvec kc = loadv(kr[t] + c * kL);
        for (int g = 0; g < G; ++g) acc[g][t] += qv[g][c] * kc;
      }
    for (int g = 0; g < G; ++g) {
      float s[4];
      reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], s);
      for (int t = 0; t < 4; ++t) {
        for (int64_t i = td; i < d; ++i) s[t] += qt[g][i - td] * to_f32(kr[t][i]);
        sc[g * ld + j + t] = s[t];
      }
    }
  }
  // exp(s - max) over each head's row of scores, kL at a time.
  float sum[G], inv[G];
  for (int g = 0; g < G; ++g) {
    float* row = sc + g * ld;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
    const fvec m = fvec{} + mx;
    fvec acc = {};
    int64_t j = 0;
    for (; j + kL <= n; j += kL) {
      const fvec e = vexp(loadv(row + j) - m);
      std::memcpy(row + j, &e, sizeof e);
      acc += e;
    }
    sum[g] = hsum(acc);
    for (; j < n; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum[g] += row[j];
    }
    inv[g] = 1.f / sum[g];
  }
  // Pass 2: the weighted sum of values, CG vectors of d at a time so the G x CG accumulators stay in registers
  // (the sequence's V rows stay in L1/L2 between groups of vectors).
  constexpr int CG = C > 0 ? vectors_per_group(G, C) : 1;
  for (int64_t c0 = 0; c0 < chunks; c0 += CG) {
    const int cg = int(chunks - c0 < CG ? chunks - c0 : CG);
    fvec acc[G][CG] = {};
    for (int64_t j = 0; j < n; ++j) {
      if (c0 == 0 && j + kAhead < n) {  // the first pass brings every row of V in
        const char* ahead = reinterpret_cast<const char*>(v + rows[size_t(j + kAhead)]);
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off);
      }
      const T* vr = v + rows[size_t(j)] + c0 * kL;
      for (int cc = 0; cc < (C > 0 ? CG : cg); ++cc) {
        const fvec vc = loadv(vr + cc * kL);
        for (int g = 0; g < G; ++g) acc[g][cc] += sc[g * ld + j] * vc;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int cc = 0; cc < (C > 0 ? CG : cg); ++cc) {
        T* o = out + (h0 + g) * d + (c0 + cc) * kL;
        for (int i = 0; i < kL; ++i) store1(o + i, acc[g][cc][i] * inv[g]);
      }
  }
  for (int64_t i = td; i < d; ++i) {
    float acc[G] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float vi = to_f32(v[rows[size_t(j)] + i]);
      for (int g = 0; g < G; ++g) acc[g] += sc[g * ld + j] * vi;
    }
    for (int g = 0; g < G; ++g) store1(out + (h0 + g) * d + i, acc[g] * inv[g]);
  }
}

template <typename T, int G, int C>
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
      attend<T, G, C>(q + s * h * d, k, v, tables + s * nb, lo, ctx, head, head * G, d, block_size, kvh, scale,
                      out + s * h * d, rows, scores);
    }
  }
}

// head_dim 64 and 128 (most Llama-family models) with compile-time vector counts; any other size at run time.
template <typename T, int G>
void by_dim(const T* q, const T* k, const T* v, const int64_t* tables, int64_t nb, const int64_t* ctx_lens, int64_t b,
            int64_t h, int64_t kvh, int64_t d, int64_t block_size, int64_t window, float scale, T* out, int nthreads) {
  if (d == 64)
    decode<T, G, 64 / kL>(q, k, v, tables, nb, ctx_lens, b, h, kvh, d, block_size, window, scale, out, nthreads);
  else if (d == 128)
    decode<T, G, 128 / kL>(q, k, v, tables, nb, ctx_lens, b, h, kvh, d, block_size, window, scale, out, nthreads);
  else
    decode<T, G, 0>(q, k, v, tables, nb, ctx_lens, b, h, kvh, d, block_size, window, scale, out, nthreads);
}

template <typename T>
int dispatch(int group, const T* q, const T* k, const T* v, const int64_t* tables, int64_t nb,
             const int64_t* ctx_lens, int64_t b, int64_t h, int64_t kvh, int64_t d, int64_t block_size,
             int64_t window, float scale, T* out, int nthreads) {
#define LORAPLEX_GROUP(G) \
  case G: by_dim<T, G>(q, k, v, tables, nb, ctx_lens, b, h, kvh, d, block_size, window, scale, out, nthreads); return 0;
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
