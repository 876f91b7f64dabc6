// Vector basics shared by loraplex's C++ kernels (lora/csrc, models/csrc): the vector width this build may
// use, bf16 <-> fp32 conversions, loads and a horizontal sum. Included by each kernel, which loraplex/native.py
// compiles with -I pointing here (and hashes this header into the build's cache key).
//
// Width: 16 floats (one zmm) where the compiler may use AVX-512, else 8 (one ymm: AVX2). Generic 64-byte
// vectors built without AVX-512 are split and spilled by the compiler: the LoRA kernel ran ~5x slower so.
// bfloat16 travels as its uint16 bits.

#pragma once

#include <cstdint>
#include <cstring>

namespace loraplex {

#if defined(__AVX512F__)
constexpr int kL = 16;  // fp32 lanes per vector
typedef float fvec __attribute__((vector_size(64)));
typedef uint32_t uvec __attribute__((vector_size(64)));
typedef int32_t ivec __attribute__((vector_size(64)));
typedef uint16_t hvec __attribute__((vector_size(32)));
#else
constexpr int kL = 8;
typedef float fvec __attribute__((vector_size(32)));
typedef uint32_t uvec __attribute__((vector_size(32)));
typedef int32_t ivec __attribute__((vector_size(32)));
typedef uint16_t hvec __attribute__((vector_size(16)));
#endif

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *p = uint16_t((u >> 16) | 0x40);  // NaN stays NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  *p = uint16_t(u >> 16);
}

// kL consecutive values as fp32 (bf16 widened).
inline fvec loadv(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline fvec loadv(const uint16_t* p) {
  hvec h;
  std::memcpy(&h, p, sizeof h);
  uvec u = __builtin_convertvector(h, uvec) << 16;
  fvec v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// fp32 -> the nearest-even bf16 -> fp32, kL at a time (what storing to and loading from a bf16 tensor does);
// NaN stays a quiet NaN, as in store1.
inline fvec round_bf16(fvec v) {
  uvec u;
  std::memcpy(&u, &v, sizeof u);
  const uvec nan = (uvec)((u & 0x7fffffffu) > 0x7f800000u);
  uvec r = ((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u & ~nan) | ((u | 0x400000u) & 0xffff0000u & nan);
  fvec out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

// Rounding to the dtype of `p`'s tensor (identity for fp32), and kL-wide stores that round like store1.
inline fvec roundv(fvec v, const float*) { return v; }
inline fvec roundv(fvec v, const uint16_t*) { return round_bf16(v); }
inline void storev(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }
inline void storev(uint16_t* p, fvec v) {
  fvec r = round_bf16(v);
  uvec u;
  std::memcpy(&u, &r, sizeof u);
  hvec h = __builtin_convertvector(u >> 16, hvec);
  std::memcpy(p, &h, sizeof h);
}

// exp(x), kL at a time: Cephes' expf, x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for exp(r), then 2^n
// in the exponent bits. About 1 ulp over [-87.3, 88.3]; x is clamped to that range (below it the result is
// ~1e-38 where libm gives a denormal or 0; above it, the largest finite values).
inline fvec vexp(fvec x) {
  const fvec lo = fvec{} - 87.3f, hi = fvec{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  fvec fx = x * 1.44269504088896341f + 0.5f;
  ivec n = __builtin_convertvector(fx, ivec);  // truncation; floor below
  fvec fn = __builtin_convertvector(n, fvec);
  n += (ivec)(fn > fx);  // -1 where truncation rounded a negative value up
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

inline float hsum(fvec v) {  // a tree of shuffles: log2(kL) dependent adds, not kL
#if defined(__AVX512F__)
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
#endif
  return v[0];
}

}  // namespace loraplex
