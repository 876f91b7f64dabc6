// Fused quantized linears for CPU: y = x W^T (+ bias), with W held as bitsandbytes' codes and never dequantized as
// a whole: each thread decodes a few rows of W at a time into a buffer of a few KiB and multiplies the rows of x
// against them. Two weight formats:
//   4-bit (loraplex_q4_*): NF4 or FP4 codes in blocks, with or without double quantization (below);
//   int8 (loraplex_q8_*): codes [N, K] int8 with one scale per output row, W[n, k] = codes[n, k] * scale[n].
//
// The torch reference is F.linear(x, QuantLinear.dequantize(), bias) (quant/linear.py); tests/test_quant_kernels.py
// holds the two equal. Built by loraplex/native.py with the machine's C++ compiler, called through ctypes.
//
// Shapes of the 4-bit format (row-major, contiguous):
//   x       [M, K]            fp32 or bf16 (uint16 bits)
//   codes   [ceil(N*K / 2)]   uint8: W flattened row-major, two codes a byte, the first in the high nibble
//   table   [16] fp32         the values of the 16 codes (QuantState.code: NF4 or FP4)
//   absmax  [ceil(N*K / bs)]  fp32 block scales; with double quantization uint8 codes of them, decoded as
//                             absmax[b] = code2[q[b]] * absmax2[b / bs2] + offset (bitsandbytes' nested state)
//   bias    [N] or null       x's dtype
//   out     [M, ldo]          x's dtype: W's outputs go to columns [0, N) of each row (a packed layer's parts are
//                             separate 4-bit matrices, each written to its own columns)
// W[n, k] = table[code(n*K + k)] * absmax[(n*K + k) / bs], in fp32, rounded to x's dtype: what
// bitsandbytes.functional.dequantize_4bit returns for the model's dtype. int8: codes [N, K] int8, scale [N] in x's
// dtype, W[n, k] = codes[n, k] * scale[n] in fp32, rounded to x's dtype (QuantLinear.dequantize).
//
// Batch invariance (issue 41): y[m, n] is the sum over k of x[m, k] * W[n, k] in kL fp32 lanes (lane k mod kL,
// in k order), then a fixed tree of shuffles, plus the k past the last full vector in k order, plus the bias,
// rounded once. That order depends on K alone: not on M, not on the rows beside m, not on the thread count (each
// output is one thread's), whichever register tile computes it.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <immintrin.h>

#include "simd.h"

namespace {

using namespace loraplex;

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

struct Q4 {
  const uint8_t* codes;
  float pairs[256][2];  // byte -> the values of its two codes (high nibble first)
  const float* table;
  const float* absmax;  // fp32 scales, or null with double quantization
  const uint8_t* absmax_q;
  const float* absmax2;
  const float* code2;
  float offset;
  int64_t bs, bs2, K;
  bool bf16;

  float scale(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    float p = code2[absmax_q[b]] * absmax2[b / bs2];
    asm("" : "+x"(p));  // rounded before the add, as bitsandbytes computes it: the compiler may not fuse the two
    return p + offset;
  }

  // The table values of the codes from byte c on, into w[k ...], a vector of bytes at a time (while a whole one
  // fits before K); returns the k it stopped at. A byte's two codes are looked up as two vectors (high nibbles,
  // low nibbles) and interleaved back into code order.
  int64_t lookup(const uint8_t* c, float* w, int64_t k) const {
#if defined(__AVX512F__)
    const __m512 tab = _mm512_loadu_ps(table);
    const __m512i nib = _mm512_set1_epi32(15);
    const __m512i lo_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; k + 32 <= K; k += 32, c += 16) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
      const __m512 first = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);  // codes 0, 2, ..., 30
      const __m512 second = _mm512_permutexvar_ps(_mm512_and_si512(v, nib), tab);  // codes 1, 3, ..., 31
      _mm512_storeu_ps(w + k, _mm512_permutex2var_ps(first, lo_half, second));
      _mm512_storeu_ps(w + k + 16, _mm512_permutex2var_ps(first, hi_half, second));
    }
#elif defined(__AVX2__)
    const __m256 tab_lo = _mm256_loadu_ps(table), tab_hi = _mm256_loadu_ps(table + 8);
    const __m256i nib = _mm256_set1_epi32(15);
    const auto look = [&](__m256i i) {  // 16 entries: two 8-entry permutes, bit 3 of the code picks one
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tab_lo, i), _mm256_permutevar8x32_ps(tab_hi, i),
                              _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
    };
    for (; k + 16 <= K; k += 16, c += 8) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
      const __m256 first = look(_mm256_srli_epi32(v, 4)), second = look(_mm256_and_si256(v, nib));
      const __m256 u0 = _mm256_unpacklo_ps(first, second), u1 = _mm256_unpackhi_ps(first, second);
      _mm256_storeu_ps(w + k, _mm256_permute2f128_ps(u0, u1, 0x20));
      _mm256_storeu_ps(w + k + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
    }
#endif
    return k;
  }

  // W[n, 0:K] into w (fp32 values, rounded to bf16 where the model is bf16).
  void decode_row(int64_t n, float* w) const {
    const int64_t f = n * K;
    int64_t k = 0;
    const uint8_t* c = codes + (f >> 1);
    if (f & 1) {  // the row starts in a byte's low nibble
      w[0] = table[*c & 15];
      k = 1;
      ++c;
    }
    k = lookup(c, w, k);  // vectors of codes; then pairs of codes, a byte at a time
    c = codes + ((f + k) >> 1);
    for (; k + 1 < K; k += 2, ++c) std::memcpy(w + k, pairs[*c], 8);
    if (k < K) w[k] = table[*c >> 4];
    for (int64_t k0 = 0; k0 < K;) {  // one scale per block of bs codes of the flattened W
      const int64_t b = (f + k0) / bs;
      const int64_t end = std::min(K, (b + 1) * bs - f);
      const float s = scale(b);
      for (int64_t j = k0; j < end; ++j) w[j] *= s;
      k0 = end;
    }
    if (bf16) round_row(w, K);
  }
};

// int8 codes with one scale per output row.
struct Q8 {
  const int8_t* codes;
  const void* scale;  // [N] fp32 or bf16 bits
  int64_t K;
  bool bf16;

  void decode_row(int64_t n, float* w) const {
    const float s = bf16 ? to_f32(static_cast<const uint16_t*>(scale)[n]) : static_cast<const float*>(scale)[n];
    const int8_t* c = codes + n * K;
    for (int64_t k = 0; k < K; ++k) w[k] = float(c[k]) * s;
    if (bf16) round_row(w, K);
  }
};

// out[m0 + i, n0 + j] for i < MR, j < NR: x rows against the decoded W rows w[j * K ...].
template <int MR, int NR, typename T>
void tile(const T* x, const float* w, int64_t K, int64_t ldo, int64_t m0, int64_t n0, const T* bias, T* out) {
  fvec acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = fvec{};
  const int64_t kv = K - K % kL;
  for (int64_t k = 0; k < kv; k += kL) {
    fvec xv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) xv[i] = loadv(x + (m0 + i) * K + k);
    for (int j = 0; j < NR; ++j) wv[j] = loadv(w + j * K + k);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = fmadd(xv[i], wv[j], acc[i][j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float tail = 0.f;
      for (int64_t k = kv; k < K; ++k) tail += to_f32(x[(m0 + i) * K + k]) * w[j * K + k];
      float y = hsum(acc[i][j]) + tail;
      if (bias != nullptr) y += to_f32(bias[n0 + j]);
      store1(out + (m0 + i) * ldo + n0 + j, y);
    }
}

template <int NR, typename T>
void rows(const T* x, const float* w, int64_t M, int64_t K, int64_t ldo, int64_t n0, const T* bias, T* out) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) tile<kMR, NR>(x, w, K, ldo, m, n0, bias, out);
  for (; m < M; ++m) tile<1, NR>(x, w, K, ldo, m, n0, bias, out);  // each row's sums are the same in any tile
}

template <typename Q, typename T>
void linear(const T* x, const Q& q, int64_t M, int64_t N, int64_t ldo, const T* bias, T* out, int nthreads) {
  const int64_t K = q.K;
  const int64_t tiles = (N + kNR - 1) / kNR;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    std::vector<float> w(kNR * K);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * kNR;
      const int nr = int(std::min<int64_t>(kNR, N - n0));
      for (int j = 0; j < nr; ++j) q.decode_row(n0 + j, w.data() + j * K);
      switch (nr) {
        case 4: rows<4>(x, w.data(), M, K, ldo, n0, bias, out); break;
        case 3: rows<3>(x, w.data(), M, K, ldo, n0, bias, out); break;
        case 2: rows<2>(x, w.data(), M, K, ldo, n0, bias, out); break;
        default: rows<1>(x, w.data(), M, K, ldo, n0, bias, out); break;
      }
    }
  }
}

Q4 q4(const uint8_t* codes, const float* table, const float* absmax, const uint8_t* absmax_q, const float* absmax2,
      const float* code2, float offset, int64_t bs, int64_t bs2, int64_t K, bool bf16) {
  Q4 q{codes, {}, table, absmax, absmax_q, absmax2, code2, offset, bs, bs2, K, bf16};
  for (int v = 0; v < 256; ++v) q.pairs[v][0] = table[v >> 4], q.pairs[v][1] = table[v & 15];
  return q;
}

template <typename Q>
int run(int dtype, const void* x, const Q& q, int64_t M, int64_t N, const void* bias, void* out, int64_t ldo,
        int nthreads) {
  if (dtype == 0)
    linear(static_cast<const float*>(x), q, M, N, ldo, static_cast<const float*>(bias), static_cast<float*>(out),
           nthreads);
  else
    linear(static_cast<const uint16_t*>(x), q, M, N, ldo, static_cast<const uint16_t*>(bias),
           static_cast<uint16_t*>(out), nthreads);
  return 0;
}

}  // namespace

extern "C" {

// dtype: 0 fp32, 1 bf16. absmax (fp32) or, with double quantization, absmax_q + absmax2 + code2 + offset.
// Returns 0, or 1 for an unknown dtype.
int loraplex_q4_linear(int dtype, const void* x, int64_t M, int64_t K, int64_t N, const uint8_t* codes,
                       const float* table, const float* absmax, const uint8_t* absmax_q, const float* absmax2,
                       const float* code2, float offset, int64_t bs, int64_t bs2, const void* bias, void* out,
                       int64_t ldo, int nthreads) {
  if (dtype != 0 && dtype != 1) return 1;
  const Q4 q = q4(codes, table, absmax, absmax_q, absmax2, code2, offset, bs, bs2, K, dtype == 1);
  return run(dtype, x, q, M, N, bias, out, ldo, nthreads);
}

// The decoded W [N, K] in fp32 (rounded to bf16 values where dtype is 1): what the kernel multiplies by, for the
// tests to hold against bitsandbytes' dequantize_4bit.
int loraplex_q4_dequantize(int dtype, int64_t K, int64_t N, const uint8_t* codes, const float* table,
                           const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code2,
                           float offset, int64_t bs, int64_t bs2, float* w) {
  if (dtype != 0 && dtype != 1) return 1;
  const Q4 q = q4(codes, table, absmax, absmax_q, absmax2, code2, offset, bs, bs2, K, dtype == 1);
  for (int64_t n = 0; n < N; ++n) q.decode_row(n, w + n * K);
  return 0;
}

// int8 codes [N, K] with per-row scales [N] (x's dtype). Returns 0, or 1 for an unknown dtype.
int loraplex_q8_linear(int dtype, const void* x, int64_t M, int64_t K, int64_t N, const int8_t* codes,
                       const void* scale, const void* bias, void* out, int64_t ldo, int nthreads) {
  if (dtype != 0 && dtype != 1) return 1;
  return run(dtype, x, Q8{codes, scale, K, dtype == 1}, M, N, bias, out, ldo, nthreads);
}

int loraplex_q8_dequantize(int dtype, int64_t K, int64_t N, const int8_t* codes, const void* scale, float* w) {
  if (dtype != 0 && dtype != 1) return 1;
  const Q8 q{codes, scale, K, dtype == 1};
  for (int64_t n = 0; n < N; ++n) q.decode_row(n, w + n * K);
  return 0;
}

}  // extern "C"
