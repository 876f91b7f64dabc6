// Fused quantized linears for CPU: y = x W^T (+ bias), with W held as its codes and never dequantized as a whole:
// each thread decodes a few rows of W at a time (into registers, or a buffer of a few KiB) and multiplies the rows
// of x against them. Three weight formats:
//   4-bit (loraplex_q4_*): bitsandbytes' NF4 or FP4 codes in blocks, with or without double quantization (below);
//   int8 (loraplex_q8_*): codes [N, K] int8 with one scale per output row, W[n, k] = codes[n, k] * scale[n];
//   GGUF (loraplex_gguf_*): Q4_0, Q4_1 and Q8_0 blocks as the file ships them (gguf_blocks.h).
//   bf16 (loraplex_bf16_linear): a bf16 checkpoint's weights [N, K] as stored, widened to fp32 exactly; for a
//     CPU without native bf16, which computes in fp32.
// The register tiles they share are in quant_tiles.h.
//
// The torch reference is F.linear(x, dequantized W, bias) (QuantLinear.dequantize in quant/linear.py; gguf-py's
// dequantize for GGUF); tests/test_quant_kernels.py holds them equal. Built by loraplex/native.py with the machine's
// C++ compiler, called through ctypes.
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
// Batch invariance (issue 41): y[m, n] is the sum over k of x[m, k] * W[n, k] in kL fp32 lanes, then a fixed tree
// of shuffles, plus the k past the last full vector in k order, plus the bias, rounded once. Lane l takes k = l mod
// kL in k order, except in a 4-bit matrix whose rows are whole blocks of whole 2*kL-code chunks (K % bs == 0,
// bs % 2kL == 0: every shape of the served models): there each chunk's high-nibble codes (even k) go through the
// lanes first, then its low-nibble codes (odd k), so that a code's value is looked up straight into its lane (x is
// permuted to match once per call). Which order depends on K and bs alone: not on M, not on the rows beside m, not
// on the thread count (each output is one thread's), whichever path computes it: W decoded a chunk at a time into
// registers (calls of up to kMR rows) or a few rows at a time into a buffer.
//
// A 4-bit block's values are its scaled table, table[c] * scale (rounded to bf16 where x is bf16), 16 products a
// block instead of one per code: the same fp32 product, so the same weights.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <immintrin.h>

#include "gguf_blocks.h"
#include "quant_tiles.h"
#include "simd.h"

namespace {

using namespace loraplex;

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
  bool chunked;  // rows are whole blocks of whole chunks: the chunk layout (top of the file)
  int shift2;    // log2(bs2) where bs2 is a power of two (bitsandbytes' 256), else -1: no division per block

  float scale(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    float p = code2[absmax_q[b]] * absmax2[shift2 >= 0 ? b >> shift2 : b / bs2];
    asm("" : "+x"(p));  // rounded before the add, as bitsandbytes computes it: the compiler may not fuse the two
    return p + offset;
  }

  // table[c] * scale(b), rounded to bf16 values where the model is bf16: block b's weight of each code.
  Tab scaled_table(int64_t b) const { return Tab::load(table).times(scale(b), bf16); }

  // The table values of the codes from byte c on, into w[k ...], a vector of bytes at a time (while a whole one
  // fits before K); returns the k it stopped at. A byte's two codes are looked up as two vectors (high nibbles,
  // low nibbles) and interleaved back into code order.
  int64_t lookup(const uint8_t* c, float* w, int64_t k) const {
#if defined(__AVX512F__)
    const __m512i lo_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const Tab t = Tab::load(table);
    for (; k + kChunk <= K; k += kChunk, c += kL) {
      fvec first, second;
      lookup_chunk(c, t, first, second);
      _mm512_storeu_ps(w + k, _mm512_permutex2var_ps((__m512)first, lo_half, (__m512)second));
      _mm512_storeu_ps(w + k + 16, _mm512_permutex2var_ps((__m512)first, hi_half, (__m512)second));
    }
#elif defined(__AVX2__)
    const Tab t = Tab::load(table);
    for (; k + kChunk <= K; k += kChunk, c += kL) {
      fvec first, second;
      lookup_chunk(c, t, first, second);
      const __m256 u0 = _mm256_unpacklo_ps((__m256)first, (__m256)second);
      const __m256 u1 = _mm256_unpackhi_ps((__m256)first, (__m256)second);
      _mm256_storeu_ps(w + k, _mm256_permute2f128_ps(u0, u1, 0x20));
      _mm256_storeu_ps(w + k + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
    }
#endif
    return k;
  }

  // W[n, 0:K] into w in k order (fp32 values, rounded to bf16 where the model is bf16).
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

  // W[n, 0:K] into w in the chunk layout (chunked matrices): each block's codes looked up in its scaled table.
  void decode_chunks(int64_t n, float* w) const {
    for (int64_t k0 = 0, b = n * (K / bs); k0 < K; k0 += bs, ++b) {  // rows are whole blocks
      const Tab t = scaled_table(b);
      for (int64_t k = k0; k < k0 + bs; k += kChunk) {
        fvec we, wo;
        lookup_chunk(codes + ((n * K + k) >> 1), t, we, wo);
        std::memcpy(w + k, &we, sizeof we);
        std::memcpy(w + k + kL, &wo, sizeof wo);
      }
    }
  }

  void decode(int64_t n, float* w) const { chunked ? decode_chunks(n, w) : decode_row(n, w); }
};

// int8 codes with one scale per output row.
struct Q8 {
  const int8_t* codes;
  const void* scale;  // [N] fp32 or bf16 bits
  int64_t K;
  bool bf16;

  float row_scale(int64_t n) const {
    return bf16 ? to_f32(static_cast<const uint16_t*>(scale)[n]) : static_cast<const float*>(scale)[n];
  }
  fvec vec(int64_t n, int64_t k, fvec s) const {  // W[n, k:k+kL]
    const fvec w = widen_i8(codes + n * K + k) * s;
    return bf16 ? round_bf16(w) : w;
  }
  float at(int64_t n, int64_t k, float s) const {  // W[n, k], rounded as vec rounds
    float w = float(codes[n * K + k]) * s;
    if (bf16) {
      uint16_t h;
      store1(&h, w);
      w = to_f32(h);
    }
    return w;
  }
  void decode(int64_t n, float* w) const {
    const float s = row_scale(n);
    const int64_t kv = K - K % kL;
    for (int64_t k = 0; k < kv; k += kL) {
      const fvec v = vec(n, k, fvec{} + s);
      std::memcpy(w + k, &v, sizeof v);
    }
    for (int64_t k = kv; k < K; ++k) w[k] = at(n, k, s);
  }
};

// bf16 weights [N, K] (their uint16 bits), widened to fp32 as they are read: exact (a shift), so a bf16 checkpoint
// computed in fp32 (a CPU without native bf16) multiplies by the very weights an fp32 copy would hold, reading half
// the bytes. The interface of Q8 with a scale of 1, so the two share direct().
struct Bf16Rows {
  const uint16_t* w;
  int64_t K;

  float row_scale(int64_t) const { return 1.f; }
  fvec vec(int64_t n, int64_t k, fvec) const { return loadv(w + n * K + k); }  // W[n, k:k+kL]
  float at(int64_t n, int64_t k, float) const { return to_f32(w[n * K + k]); }
  void decode(int64_t n, float* out) const {
    const int64_t kv = K - K % kL;
    for (int64_t k = 0; k < kv; k += kL) {
      const fvec v = loadv(w + n * K + k);
      std::memcpy(out + k, &v, sizeof v);
    }
    for (int64_t k = kv; k < K; ++k) out[k] = at(n, k, 1.f);
  }
};

template <typename Q>
constexpr bool kRowsInOrder = std::is_same_v<Q, Q8> || std::is_same_v<Q, Bf16Rows>;

// All MR (<= kMR) rows of x against W rows n0 .. n0 + kNR of a chunked 4-bit matrix, each chunk looked up straight
// into registers: the sums of tile() over decode_chunks, without the buffer. xp: x in the chunk layout, fp32.
template <int MR, typename T>
void direct(const float* xp, const Q4& q, int64_t ldo, int64_t n0, const T* bias, T* out) {
  const int64_t K = q.K;
  fvec acc[MR][kNR] = {};
  Tab t[kNR];
  const int64_t blocks = K / q.bs;  // a row's: rows are whole blocks
  for (int64_t k0 = 0, b = n0 * blocks; k0 < K; k0 += q.bs, ++b) {
    for (int j = 0; j < kNR; ++j) t[j] = q.scaled_table(b + j * blocks);
    for (int64_t k = k0; k < k0 + q.bs; k += kChunk) {
      fvec xe[MR], xo[MR];
      for (int i = 0; i < MR; ++i) xe[i] = loadv(xp + i * K + k), xo[i] = loadv(xp + i * K + k + kL);
      for (int j = 0; j < kNR; ++j) {
        fvec we, wo;
        lookup_chunk(q.codes + (((n0 + j) * K + k) >> 1), t[j], we, wo);
        for (int i = 0; i < MR; ++i) acc[i][j] = fmadd(xo[i], wo, fmadd(xe[i], we, acc[i][j]));
      }
    }
  }
  finish_tile(acc, bias, n0, out, ldo);
}

// The same for int8 and bf16 rows, k in order: the sums of tile() over their decode(), without the buffer.
template <int MR, typename T, typename Q, typename = std::enable_if_t<kRowsInOrder<Q>>>
void direct(const T* x, const Q& q, int64_t ldo, int64_t n0, const T* bias, T* out) {
  const int64_t K = q.K, kv = K - K % kL;
  fvec acc[MR][kNR] = {}, s[kNR];
  float sj[kNR];
  for (int j = 0; j < kNR; ++j) sj[j] = q.row_scale(n0 + j), s[j] = fvec{} + sj[j];
  for (int64_t k = 0; k < kv; k += kL) {
    fvec xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = loadv(x + i * K + k);
    for (int j = 0; j < kNR; ++j) {
      const fvec w = q.vec(n0 + j, k, s[j]);
      for (int i = 0; i < MR; ++i) acc[i][j] = fmadd(xv[i], w, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) {
      float tail = 0.f;
      for (int64_t k = kv; k < K; ++k) tail = std::fma(to_f32(x[i * K + k]), q.at(n0 + j, k, sj[j]), tail);
      finish(acc[i][j], tail, bias, n0 + j, out + i * ldo);
    }
}

// y = x W^T over tiles of kNR rows of W, split between the threads. A whole tile of a call of up to kMR rows goes
// through direct() when `registers` (no buffer: at batch 1 the decode is the cost); the rest decode their W rows
// into a per-thread buffer and run the register tiles over every row of x.
template <typename Q, typename X, typename T>
void linear(const X* x, const Q& q, int64_t M, int64_t N, int64_t ldo, const T* bias, T* out, int nthreads,
            bool registers) {
  const int64_t K = q.K;
  const int64_t tiles = (N + kNR - 1) / kNR;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    std::vector<float> w;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * kNR;
      const int nr = int(std::min<int64_t>(kNR, N - n0));
      if constexpr (!std::is_same_v<Q, Q4> || std::is_same_v<X, float>) {  // a direct() exists for these
        if (registers && nr == kNR && M <= kMR) {
          switch (M) {
            case 1: direct<1>(x, q, ldo, n0, bias, out); break;
            case 2: direct<2>(x, q, ldo, n0, bias, out); break;
#if defined(__AVX512F__)
            case 3: direct<3>(x, q, ldo, n0, bias, out); break;
            case 4: direct<4>(x, q, ldo, n0, bias, out); break;
#endif
          }
          continue;
        }
      }
      w.resize(kNR * K);
      for (int j = 0; j < nr; ++j) q.decode(n0 + j, w.data() + j * K);
      switch (nr) {
        case 4: rows<4>(x, w.data(), M, K, ldo, n0, bias, out); break;
        case 3: rows<3>(x, w.data(), M, K, ldo, n0, bias, out); break;
        case 2: rows<2>(x, w.data(), M, K, ldo, n0, bias, out); break;
        default: rows<1>(x, w.data(), M, K, ldo, n0, bias, out); break;
      }
    }
  }
}
static_assert(kMR == 4 || kMR == 2, "direct() is dispatched for M up to kMR");

Q4 q4(const uint8_t* codes, const float* table, const float* absmax, const uint8_t* absmax_q, const float* absmax2,
      const float* code2, float offset, int64_t bs, int64_t bs2, int64_t K, bool bf16) {
  const bool chunked = kHasChunks && bs > 0 && K % bs == 0 && bs % kChunk == 0;
  int shift2 = -1;
  for (int i = 0; i < 62; ++i)
    if (bs2 == int64_t(1) << i) shift2 = i;
  Q4 q{codes, {}, table, absmax, absmax_q, absmax2, code2, offset, bs, bs2, K, bf16, chunked, shift2};
  for (int v = 0; v < 256; ++v) q.pairs[v][0] = table[v >> 4], q.pairs[v][1] = table[v & 15];
  return q;
}

// x [M, K] as fp32 in the chunk layout: each chunk's even k first, then its odd k (K % kChunk == 0).
template <typename T>
std::vector<float> chunk_layout(const T* x, int64_t M, int64_t K) {
  std::vector<float> xp(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += kChunk)
      for (int l = 0; l < kL; ++l) {
        xp[m * K + k + l] = to_f32(x[m * K + k + 2 * l]);
        xp[m * K + k + kL + l] = to_f32(x[m * K + k + 2 * l + 1]);
      }
  return xp;
}

template <typename T>
void run(const T* x, const Q4& q, int64_t M, int64_t N, const T* bias, T* out, int64_t ldo, int nthreads) {
  if (q.chunked)
    linear(chunk_layout(x, M, q.K).data(), q, M, N, ldo, bias, out, nthreads, true);
  else
    linear(x, q, M, N, ldo, bias, out, nthreads, false);
}

template <typename T, typename Q>  // int8 rows, GGUF blocks: k order, x as it is
void run(const T* x, const Q& q, int64_t M, int64_t N, const T* bias, T* out, int64_t ldo, int nthreads) {
  linear(x, q, M, N, ldo, bias, out, nthreads, true);
}

template <typename Q>
int run(int dtype, const void* x, const Q& q, int64_t M, int64_t N, const void* bias, void* out, int64_t ldo,
        int nthreads) {
  if (dtype == 0)
    run(static_cast<const float*>(x), q, M, N, static_cast<const float*>(bias), static_cast<float*>(out), ldo,
        nthreads);
  else
    run(static_cast<const uint16_t*>(x), q, M, N, static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(out),
        ldo, nthreads);
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
  std::vector<float> row(K);
  for (int64_t n = 0; n < N; ++n) {
    if (!q.chunked) {
      q.decode_row(n, w + n * K);
      continue;
    }
    q.decode_chunks(n, row.data());  // back into k order
    for (int64_t k = 0; k < K; k += kChunk)
      for (int l = 0; l < kL; ++l) w[n * K + k + 2 * l] = row[k + l], w[n * K + k + 2 * l + 1] = row[k + kL + l];
  }
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
  for (int64_t n = 0; n < N; ++n) q.decode(n, w + n * K);
  return 0;
}

// bf16 weights [N, K] (uint16 bits), widened exactly. Returns 0, or 1 for an unknown dtype.
int loraplex_bf16_linear(int dtype, const void* x, int64_t M, int64_t K, int64_t N, const uint16_t* w,
                         const void* bias, void* out, int64_t ldo, int nthreads) {
  if (dtype != 0 && dtype != 1) return 1;
  return run(dtype, x, Bf16Rows{w, K}, M, N, bias, out, ldo, nthreads);
}

// GGUF blocks (gguf_blocks.h): data [stored rows, row_bytes] as in the file, rows [N] int64 or null. Returns 0, 1
// for an unknown dtype, 2 for a type these kernels do not read or a K that is not whole blocks of it.
int loraplex_gguf_linear(int dtype, const void* x, int64_t M, int64_t K, int64_t N, int type, const uint8_t* data,
                         int64_t row_bytes, const int64_t* rows, const void* bias, void* out, int64_t ldo,
                         int nthreads) {
  if (dtype != 0 && dtype != 1) return 1;
  if (!gguf_rows_fit(type, K, row_bytes)) return 2;
  return run(dtype, x, Gguf{data, rows, type, K, row_bytes, dtype == 1}, M, N, bias, out, ldo, nthreads);
}

int loraplex_gguf_dequantize(int dtype, int64_t K, int64_t N, int type, const uint8_t* data, int64_t row_bytes,
                             const int64_t* rows, float* w, int nthreads) {
  if (dtype != 0 && dtype != 1) return 1;
  if (!gguf_rows_fit(type, K, row_bytes)) return 2;
  const Gguf q{data, rows, type, K, row_bytes, dtype == 1};
  // Every call of more than a decode step's rows dequantizes (quant/linear.py): rows split between the threads.
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t n = 0; n < N; ++n) q.decode(n, w + n * K);
  return 0;
}

}  // extern "C"
