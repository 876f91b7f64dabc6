// Register tiles shared by the fused quantized linears (quant_cpu.cpp: bitsandbytes' 4-bit and int8 formats, and
// gguf_blocks.h: GGUF's block formats): the 16-entry code tables and their lookup, and y = x W^T over W rows decoded
// into a buffer. Every output ends in finish(): the lanes' sum, the tail, the bias, one rounding.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "simd.h"

namespace loraplex {
namespace {

#if defined(__AVX512F__)
constexpr int kMR = 4;  // rows of x per register tile
#else
constexpr int kMR = 2;  // 16 ymm registers: 2 x 4 accumulators, 2 x and 4 W vectors
#endif
constexpr int kNR = 4;  // rows of W decoded together

inline fvec fmadd(fvec a, fvec b, fvec c) {  // a * b + c, one rounding where the CPU fuses
#if defined(__AVX512F__)
  return (fvec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (fvec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// w[0:K] rounded to bf16 values (nearest even), kept as fp32: what a weight stored in bf16 holds.
inline void round_row(float* w, int64_t K) {
  int64_t j = 0;
  for (; j + kL <= K; j += kL) {
    const fvec r = round_bf16(loadv(w + j));
    std::memcpy(w + j, &r, sizeof r);
  }
  for (; j < K; ++j) {
    uint16_t h;
    store1(&h, w[j]);
    w[j] = to_f32(h);
  }
}

// round_bf16 for values that are never fp32 subnormals (zero, normal, inf or NaN): the CPU's own conversion where it
// has AVX512-BF16 (vcvtneps2bf16: nearest even, a NaN quiet with its upper payload, as round_bf16; it flushes
// subnormals, which these values are not), 3 instructions instead of about 10. A GGUF Q8_0 weight, q * d with q an
// int8 and d an fp16 (zero, or at least 2^-24 in magnitude), is one.
inline fvec round_bf16_normal(fvec v) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const __m256i h = (__m256i)_mm512_cvtneps_pbh((__m512)v);
  return (fvec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
  return round_bf16(v);
#endif
}

#if defined(__AVX512F__) || defined(__AVX2__)
constexpr bool kHasChunks = true;  // lookup_chunk below exists in this build
#else
constexpr bool kHasChunks = false;
#endif
constexpr int kChunk = 2 * kL;  // codes per chunk: kL bytes

// A 16-entry table of code values: one vector (AVX-512), or 16 floats that AVX2 loads as two (entries 0-7, 8-15).
struct Tab {
#if defined(__AVX512F__)
  fvec v;
  static Tab load(const float* t) { return Tab{loadv(t)}; }
  Tab times(float s, bool bf16) const {  // each entry * s, rounded to bf16 values where asked
    const fvec p = v * s;
    return Tab{bf16 ? round_bf16(p) : p};
  }
#else
  alignas(32) float e[16];  // in memory: 8 ymm tables for a 4-row tile spilled worse (1.3x slower at batch 1)
  static Tab load(const float* t) {
    Tab r;
    std::memcpy(r.e, t, sizeof r.e);
    return r;
  }
  Tab times(float s, bool bf16) const {
    fvec a = loadv(e) * s, b = loadv(e + kL) * s;
    if (bf16) a = round_bf16(a), b = round_bf16(b);
    Tab r;
    std::memcpy(r.e, &a, sizeof a);
    std::memcpy(r.e + kL, &b, sizeof b);
    return r;
  }
#endif
};

// The values of the 2kL codes in the kL bytes at c, looked up in t: we = the high nibbles' (codes 0, 2, ...,
// 2kL - 2), wo = the low nibbles' (codes 1, 3, ..., 2kL - 1). The permutes read only an index's low bits (4 with
// AVX-512; 3, and bit 3 moved to the sign for the blend, with AVX2), so a low nibble needs no mask.
inline void lookup_chunk(const uint8_t* c, const Tab& t, fvec& we, fvec& wo) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  we = (fvec)_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), (__m512)t.v);
  wo = (fvec)_mm512_permutexvar_ps(v, (__m512)t.v);
#elif defined(__AVX2__)
  const auto look = [&](__m256i i) {  // 16 entries: two 8-entry permutes, bit 3 of the code picks one
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(t.e), i),
                            _mm256_permutevar8x32_ps(_mm256_load_ps(t.e + 8), i),
                            _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
  };
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  we = (fvec)look(_mm256_srli_epi32(v, 4));
  wo = (fvec)look(v);
#else
  (void)c, (void)t;
  we = wo = fvec{};
#endif
}

// kL int8 values widened to fp32, by intrinsics: g++ converts a generic int8 vector one lane at a time (10x slower).
inline fvec widen_i8(const int8_t* c) {
#if defined(__AVX512F__)
  return (fvec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
#elif defined(__AVX2__)
  return (fvec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
#else
  fvec w;
  for (int l = 0; l < kL; ++l) w[l] = float(c[l]);
  return w;
#endif
}

// out[n] = the lanes' sum, then the tail, then the bias, rounded once: the one way every path ends an output. The
// tails' products are added by std::fma, never by a * b + c: g++ contracts that into an FMA in some inlined copies
// and not in others (C++ builds contract by default), which gave a row other bits alone than in a batch.
template <typename T>
inline void finish(fvec acc, float tail, const T* bias, int64_t n, T* out) {
  float y = hsum(acc) + tail;
  if (bias != nullptr) y += to_f32(bias[n]);
  store1(out + n, y);
}

// finish() for each output of an MR x kNR tile: rows out + i * ldo, columns n0 .. n0 + kNR; every k was in the
// lanes (no tail).
template <int MR, typename T>
inline void finish_tile(const fvec (&acc)[MR][kNR], const T* bias, int64_t n0, T* out, int64_t ldo) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) finish(acc[i][j], 0.f, bias, n0 + j, out + i * ldo);
}

// out[m0 + i, n0 + j] for i < MR, j < NR: rows of x (fp32 or x's dtype) against decoded W rows w[j * K ...].
template <int MR, int NR, typename X, typename T>
void tile(const X* x, const float* w, int64_t K, int64_t ldo, int64_t m0, int64_t n0, const T* bias, T* out) {
  fvec acc[MR][NR] = {};
  const int64_t kv = K - K % kL;
  for (int64_t k = 0; k < kv; k += kL) {
    fvec xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = loadv(x + (m0 + i) * K + k);
    for (int j = 0; j < NR; ++j) {  // one W vector at a time: MR x NR accumulators + MR x vectors + 1 fit 16 ymm
      const fvec wv = loadv(w + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = fmadd(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float tail = 0.f;
      for (int64_t k = kv; k < K; ++k) tail = std::fma(to_f32(x[(m0 + i) * K + k]), w[j * K + k], tail);
      finish(acc[i][j], tail, bias, n0 + j, out + (m0 + i) * ldo);
    }
}

#if defined(__AVX512F__)
constexpr int kTileMR = 4;  // rows of x per tile over decoded W rows
#else
constexpr int kTileMR = 3;  // 12 accumulators, 3 x vectors and the W vector streamed: 16 ymm registers
#endif

template <int NR, typename X, typename T>
void rows(const X* x, const float* w, int64_t M, int64_t K, int64_t ldo, int64_t n0, const T* bias, T* out) {
  int64_t m = 0;  // each row's sums are the same in any tile
  for (; m + kTileMR <= M; m += kTileMR) tile<kTileMR, NR>(x, w, K, ldo, m, n0, bias, out);
  for (; m + 2 <= M; m += 2) tile<2, NR>(x, w, K, ldo, m, n0, bias, out);
  for (; m < M; ++m) tile<1, NR>(x, w, K, ldo, m, n0, bias, out);
}

}  // namespace
}  // namespace loraplex
