// Fused multi-LoRA for CPU (BGMV/SGMV-style): out[t] += (x[t] @ A[s_t]^T) @ B[s_t] for every token t
// with an adapter slot s_t, the tokens grouped by slot so each group reads its A and B once.
//
// The torch reference is loraplex.lora.ops.lora_reference; tests/test_lora_cpu_kernel.py holds them equal.
// Built by loraplex/lora/cpu_kernel.py with the machine's C++ compiler and called through ctypes: the
// code uses no torch headers, so it compiles in about a second.
//
// Shapes (row-major, contiguous):
//   x      [T, IN]          activations, float32 or bfloat16 (uint16 bits)
//   a      [S, R, IN]       slot A matrices; R = parts * max_rank, part p owns rows [p*max_rank, (p+1)*max_rank)
//   b      [S, max_rank*OUT] slot B matrices, compact: part p's block [max_rank, size_p] starts at
//                            max_rank * part_off[p]; the LoRA scaling is folded in
//   ranks  [S, P] int32     rows in use per slot and part (0 = the adapter does not touch the part)
//   order  [N] int64        token indices grouped by slot; groups [G, 3] int64: (slot, start in order, count)
//   out    [T, OUT]         the base layer's output; LoRA is added in place, accumulated in fp32, rounded once
//
// Why: in a decode step a group has a handful of tokens, so the work is streaming A and B (~3% of the
// base layer's FLOPs). One pass per slot with fp32 register accumulators reads each weight once, skips
// unused ranks, and reads B as one contiguous block per slot.
//
// Vectors (simd.h): kL fp32 lanes, 16 with AVX-512 and 8 with AVX2.
//
// bf16 pairs: 2*kL bf16 values loaded as kL uint32 give the even elements by a shift and the odd ones by
// a mask, two instructions for 2*kL values instead of a widening convert per kL. Dot products therefore
// run over (even, odd) halves: x is stored in that order per block of 2*kL (float32 data keeps its order).

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "simd.h"

namespace {

using namespace loraplex;

#if defined(__AVX512F__)
constexpr int kNP = 2;  // pairs of vectors per output chunk: 2 x kTok x 2 = 16 of the 32 zmm accumulators
#else
constexpr int kNP = 1;  // 1 x kTok x 2 = 8 of the 16 ymm registers, the rest for B and the coefficient
#endif

constexpr int kB = 2 * kL;   // elements per (even, odd) block
constexpr int kTok = 4;      // tokens computed together against one pass over weights
constexpr int kRows = 8;     // A rows per shrink work item
constexpr int kItemCols = 256;  // output columns per expand work item at most

// kB values -> two fp32 vectors: (even, odd) elements for bf16, (first kL, last kL) for float32.
inline void load_pair(const float* p, fvec& lo, fvec& hi) {
  lo = loadv(p);
  hi = loadv(p + kL);
}
inline void load_pair(const uint16_t* p, fvec& lo, fvec& hi) {
  uvec w;
  std::memcpy(&w, p, sizeof w);
  uvec e = w << 16, o = w & 0xffff0000u;
  std::memcpy(&lo, &e, sizeof lo);
  std::memcpy(&hi, &o, sizeof hi);
}

// The inverse for stores: (lo, hi) of load_pair's order back to kB values in memory order.
inline void unpair(const float*, fvec lo, fvec hi, fvec& first, fvec& second) {
  first = lo;
  second = hi;
}
inline void unpair(const uint16_t*, fvec e, fvec o, fvec& first, fvec& second) {
#if defined(__AVX512F__)
  first = __builtin_shufflevector(e, o, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  second = __builtin_shufflevector(e, o, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#else
  first = __builtin_shufflevector(e, o, 0, 8, 1, 9, 2, 10, 3, 11);
  second = __builtin_shufflevector(e, o, 4, 12, 5, 13, 6, 14, 7, 15);
#endif
}

// x row -> fp32 in load_pair's order per block of kB (a tail of IN % kB in memory order).
inline void convert_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void convert_row(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kB <= n; j += kB)
    for (int i = 0; i < kL; ++i) {
      dst[j + i] = to_f32(src[j + 2 * i]);
      dst[j + kL + i] = to_f32(src[j + 2 * i + 1]);
    }
  for (; j < n; ++j) dst[j] = to_f32(src[j]);
}

// res[r][t] = dot(x[t], w[r]) for NR rows of A and NT tokens (xs: fp32 in pair order), each weight read
// once; two accumulators per (row, token) so the FMAs do not form one dependent chain.
template <int NR, int NT, typename T>
inline void dot_block(const float* const* xs, const T* w, int64_t n, float (*res)[kTok]) {
  fvec acc[NR][NT][2] = {};
  int64_t j = 0;
  for (; j + kB <= n; j += kB) {
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      fvec lo, hi;
      load_pair(w + r * n + j, lo, hi);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        acc[r][t][0] += loadv(xs[t] + j) * lo;
        acc[r][t][1] += loadv(xs[t] + j + kL) * hi;
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) {
      float s = hsum(acc[r][t][0] + acc[r][t][1]);
      for (int64_t k = j; k < n; ++k) s += xs[t][k] * to_f32(w[r * n + k]);
      res[r][t] = s;
    }
}

template <int NT, typename T>
inline void shrink_rows(const float* const* xs, const T* w, int64_t in, int64_t rows, float (*res)[kTok]) {
  constexpr int NR = NT == 1 ? 2 : 1;
  int64_t i = 0;
  for (; i + NR <= rows; i += NR) dot_block<NR, NT>(xs, w + i * in, in, res + i);
  for (; i < rows; ++i) dot_block<1, NT>(xs, w + i * in, in, res + i);
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
// The shrink for bf16 on CPUs with AVX512-BF16: x stays bf16 and one vdpbf16ps multiplies 32 pairs of
// elements into fp32 accumulators (products exact, sums in fp32), half the instructions of converting.
template <int NR, int NT>
inline void dot_block_bf16(const uint16_t* const* xs, const uint16_t* w, int64_t n, float (*res)[kTok]) {
  __m512 acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m512i xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_si512(xs[t] + j);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      __m512i wv = _mm512_loadu_si512(w + r * n + j);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)xv[t], (__m512bh)wv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) {
      float s = _mm512_reduce_add_ps(acc[r][t]);
      for (int64_t k = j; k < n; ++k) s += to_f32(xs[t][k]) * to_f32(w[r * n + k]);
      res[r][t] = s;
    }
}

template <int NT>
inline void shrink_rows_bf16(const uint16_t* const* xs, const uint16_t* w, int64_t in, int64_t rows,
                             float (*res)[kTok]) {
  constexpr int NR = NT == 1 ? 4 : 2;
  int64_t i = 0;
  for (; i + NR <= rows; i += NR) dot_block_bf16<NR, NT>(xs, w + i * in, in, res + i);
  for (; i < rows; ++i) dot_block_bf16<1, NT>(xs, w + i * in, in, res + i);
}
#else
constexpr bool kBf16Dot = false;
#endif

// outs[t][0 : kB*NP] += sum_i coef[t][i] * b[i*ld + 0 : kB*NP] for NT tokens, in registers.
template <int NT, int NP, typename T>
inline void expand_chunk(const float* const* coef, int rank, const T* b, int64_t ld, T* const* outs) {
  fvec acc[NT][NP][2] = {};
  for (int i = 0; i < rank; ++i) {
    fvec w[NP][2];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) load_pair(b + i * ld + kB * q, w[q][0], w[q][1]);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      fvec c = fvec{} + coef[t][i];
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) {
        acc[t][q][0] += c * w[q][0];
        acc[t][q][1] += c * w[q][1];
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < NP; ++q) {
      fvec first, second;
      unpair(b, acc[t][q][0], acc[t][q][1], first, second);
      T* o = outs[t] + kB * q;
      for (int i = 0; i < kL; ++i) store1(o + i, to_f32(o[i]) + first[i]);
      for (int i = 0; i < kL; ++i) store1(o + kL + i, to_f32(o[kL + i]) + second[i]);
    }
}

template <int NT, typename T>
inline void expand_cols(const float* const* coef, int rank, const T* b, int64_t ld, int64_t cols, T* const* outs) {
  int64_t c = 0;
  T* o[kTok];
  for (; c + kNP * kB <= cols; c += kNP * kB) {
    for (int t = 0; t < NT; ++t) o[t] = outs[t] + c;
    expand_chunk<NT, kNP>(coef, rank, b + c, ld, o);
  }
  if (kNP > 1 && c + kB <= cols) {
    for (int t = 0; t < NT; ++t) o[t] = outs[t] + c;
    expand_chunk<NT, 1>(coef, rank, b + c, ld, o);
    c += kB;
  }
  for (; c < cols; ++c)  // a tail of cols % kB, one scalar at a time
    for (int t = 0; t < NT; ++t) {
      float s = 0.f;
      for (int i = 0; i < rank; ++i) s += coef[t][i] * to_f32(b[i * ld + c]);
      store1(outs[t] + c, to_f32(outs[t][c]) + s);
    }
}

// f(std::integral_constant<int, nt>{}) for a token block of nt = 1..kTok: the kernels are templates on it.
template <typename F>
inline void by_tokens(int nt, F&& f) {
  switch (nt) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

struct ShrinkItem { int64_t group, part, row0, rows; };
// Ranks are read once, here: items carry them (slots are written only between steps, never during one).
struct ExpandItem { int64_t group, part, col0, cols, rank; };

template <typename T>
void lora_add(const T* x, int64_t in, const T* a, const T* b, int64_t r_total, int64_t out_f,
              const int64_t* order, const int64_t* groups, int64_t n_groups, const int32_t* ranks,
              int64_t n_parts, int64_t max_rank, const int64_t* part_off, T* out, int nthreads) {
  int64_t n = 0;  // tokens with an adapter
  for (int64_t g = 0; g < n_groups; ++g) n += groups[3 * g + 2];
  if (n == 0) return;
  // Scratch kept between calls (grow-only, per calling thread): fresh heap blocks of this size go
  // back to the OS on free and would be page-faulted in again on every call.
  thread_local std::vector<float> xf_buf, xa_buf;
  thread_local std::vector<ShrinkItem> shrink;
  thread_local std::vector<ExpandItem> expand;
  constexpr bool kReadsX = kBf16Dot && std::is_same_v<T, uint16_t>;  // the bf16 dot reads x as it is
  if (!kReadsX && xf_buf.size() < size_t(n * in)) xf_buf.resize(n * in);
  if (xa_buf.size() < size_t(n * r_total)) xa_buf.resize(n * r_total);
  float* const xf = xf_buf.data();  // [N, IN] x in fp32, group order, pair order
  float* const xa = xa_buf.data();  // [N, R] x @ A^T (only the rows in use are written and read)
  shrink.clear();
  expand.clear();
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t slot = groups[3 * g];
    for (int64_t p = 0; p < n_parts; ++p) {
      const int64_t rank = ranks[slot * n_parts + p];
      if (rank == 0) continue;
      for (int64_t r0 = 0; r0 < rank; r0 += kRows) shrink.push_back({g, p, r0, rank - r0 < kRows ? rank - r0 : kRows});
      for (int64_t c0 = part_off[p]; c0 < part_off[p + 1]; c0 += kItemCols)
        expand.push_back({g, p, c0, part_off[p + 1] - c0 < kItemCols ? part_off[p + 1] - c0 : kItemCols, rank});
    }
  }
  const int64_t n_shrink = int64_t(shrink.size()), n_expand = int64_t(expand.size());
  // Plain pointers for the parallel region: a thread_local named inside it is each worker's own.
  const ShrinkItem* const shrink_items = shrink.data();
  const ExpandItem* const expand_items = expand.data();

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    if (!kReadsX) {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < n; ++k) convert_row(x + order[k] * in, xf + k * in, in);
    }

#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_shrink; ++it) {
      const ShrinkItem& s = shrink_items[it];
      const int64_t slot = groups[3 * s.group], start = groups[3 * s.group + 1], count = groups[3 * s.group + 2];
      const int64_t row0 = s.part * max_rank + s.row0;
      const T* w = a + (slot * r_total + row0) * in;
      // Token blocks outer, rows inner: the item's rows of A (kRows x IN) and one block of x stay in L1.
      for (int64_t k = start; k < start + count; k += kTok) {
        const int nt = int(start + count - k < kTok ? start + count - k : kTok);
        float res[kRows][kTok];
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, uint16_t>) {
          const uint16_t* xb[kTok];
          for (int t = 0; t < nt; ++t) xb[t] = x + order[k + t] * in;
          by_tokens(nt, [&](auto NT) { shrink_rows_bf16<decltype(NT)::value>(xb, w, in, s.rows, res); });
        } else
#endif
        {
          const float* xs[kTok];
          for (int t = 0; t < nt; ++t) xs[t] = xf + (k + t) * in;
          by_tokens(nt, [&](auto NT) { shrink_rows<decltype(NT)::value>(xs, w, in, s.rows, res); });
        }
        for (int64_t i = 0; i < s.rows; ++i)
          for (int t = 0; t < nt; ++t) xa[(k + t) * r_total + row0 + i] = res[i][t];
      }
    }

#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_expand; ++it) {
      const ExpandItem& e = expand_items[it];
      const int64_t slot = groups[3 * e.group], start = groups[3 * e.group + 1], count = groups[3 * e.group + 2];
      const int rank = int(e.rank);
      const int64_t row0 = e.part * max_rank, size = part_off[e.part + 1] - part_off[e.part];
      // The part's compact block [max_rank, size], from column e.col0 on.
      const T* bp = b + slot * max_rank * out_f + max_rank * part_off[e.part] + (e.col0 - part_off[e.part]);
      for (int64_t k = start; k < start + count; k += kTok) {
        const int nt = int(start + count - k < kTok ? start + count - k : kTok);
        const float* coef[kTok];
        T* outs[kTok];
        for (int t = 0; t < nt; ++t) {
          coef[t] = xa + (k + t) * r_total + row0;
          outs[t] = out + order[k + t] * out_f + e.col0;
        }
        by_tokens(nt, [&](auto NT) { expand_cols<decltype(NT)::value>(coef, rank, bp, size, e.cols, outs); });
      }
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = bfloat16. Returns 0, or -1 for an unknown dtype.
int loraplex_lora_add(int dtype, const void* x, int64_t in, const void* a, const void* b, int64_t r_total,
                      int64_t out_f, const int64_t* order, const int64_t* groups, int64_t n_groups,
                      const int32_t* ranks, int64_t n_parts, int64_t max_rank, const int64_t* part_off, void* out,
                      int nthreads) {
  if (dtype == 0) {
    lora_add(static_cast<const float*>(x), in, static_cast<const float*>(a), static_cast<const float*>(b), r_total,
             out_f, order, groups, n_groups, ranks, n_parts, max_rank, part_off, static_cast<float*>(out), nthreads);
    return 0;
  }
  if (dtype == 1) {
    lora_add(static_cast<const uint16_t*>(x), in, static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b),
             r_total, out_f, order, groups, n_groups, ranks, n_parts, max_rank, part_off,
             static_cast<uint16_t*>(out), nthreads);
    return 0;
  }
  return -1;
}

}  // extern "C"
