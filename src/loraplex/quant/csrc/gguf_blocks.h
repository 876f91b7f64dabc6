// GGUF's block formats, read as the file ships them (ggml's layout): 32 weights a block, each row's blocks
// contiguous, a row of K weights in K / 32 blocks.
//   Q4_0 (ggml type 2): fp16 d, 16 bytes of codes      W = (code - 8) * d
//   Q4_1 (ggml type 3): fp16 d, fp16 m, 16 bytes       W = code * d + m   (the product rounded, then the add)
//   Q8_0 (ggml type 8): fp16 d, 32 int8                W = q * d
// Byte j of a 4-bit block holds weight j in its low nibble and weight j + 16 in its high nibble. Each value is
// computed in fp32 in that order (gguf.quants.dequantize, which transformers loads a GGUF with) and rounded to bf16
// where x is bf16. A 4-bit block's values come from its 16-entry table, built once a block.
//
// Shapes: data [stored rows, row_bytes] uint8; rows [N] int64 or null: output n reads stored row rows[n] (llama's
// q and k rows are stored permuted for llama.cpp's rotary layout; the map undoes it without a copy).
// Sums run in k order (lane k mod kL), as the buffer path's tile() sums a decoded row: a row's bits do not depend
// on the batch.

#pragma once

#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "quant_tiles.h"
#include "simd.h"

namespace loraplex {
namespace {

constexpr int kGgufBlock = 32;
constexpr int kGgufQ4_0 = 2, kGgufQ4_1 = 3, kGgufQ8_0 = 8;  // ggml's type ids

inline int gguf_block_bytes(int type) {  // 0 for a type these kernels do not read
  return type == kGgufQ4_0 ? 18 : type == kGgufQ4_1 ? 20 : type == kGgufQ8_0 ? 34 : 0;
}

// A row of K weights of `type` is whole blocks and row_bytes long: what the kernels can read.
inline bool gguf_rows_fit(int type, int64_t K, int64_t row_bytes) {
  return gguf_block_bytes(type) != 0 && K % kGgufBlock == 0 && row_bytes == K / kGgufBlock * gguf_block_bytes(type);
}

inline float half_to_float(const uint8_t* p) {  // exact, as numpy's float16 -> float32
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 31u, man = h & 1023u;
  uint32_t u;
  if (exp == 31)
    u = sign | 0x7f800000u | (man << 13);  // inf, NaN
  else if (exp != 0)
    u = sign | ((exp + 112) << 23) | (man << 13);
  else {
    const float f = float(man) * 5.9604644775390625e-8f;  // subnormal: man * 2^-24, exact
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Gguf {
  const uint8_t* data;
  const int64_t* rows;
  int type;
  int64_t K, row_bytes;
  bool bf16;

  const uint8_t* block(int64_t n, int64_t b) const {
    return data + (rows != nullptr ? rows[n] : n) * row_bytes + b * gguf_block_bytes(type);
  }

  // A 4-bit block's weight of each code: code * d + m (Q4_1) or (code - 8) * d (Q4_0), rounded as the weights are.
  Tab table(const uint8_t* p) const {
    alignas(64) static const float codes1[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    alignas(64) static const float codes0[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
    const float d = half_to_float(p), m = type == kGgufQ4_1 ? half_to_float(p + 2) : 0.f;
    alignas(64) float t[16];
    for (int h = 0; h < 16; h += kL) {
      fvec v = loadv((type == kGgufQ4_1 ? codes1 : codes0) + h) * d;
      // rounded before the add, as gguf-py computes it: the compiler may not fuse the two
#if defined(__AVX__)
      asm("" : "+v"(v));
#else
      asm("" : : "r"(&v) : "memory");  // a 32-byte vector fits no SSE register: through memory
#endif
      if (type == kGgufQ4_1) v = v + m;
      if (bf16) v = round_bf16(v);
#if defined(__AVX512F__)
      return Tab{v};  // one vector holds all 16
#endif
      std::memcpy(t + h, &v, sizeof v);
    }
    return Tab::load(t);
  }

  // Block b of output row n: its 32 weights in k order, as 32 / kL vectors.
  void values(int64_t n, int64_t b, fvec* w) const {
    const uint8_t* p = block(n, b);
    if (type == kGgufQ8_0) {
      const fvec d = fvec{} + half_to_float(p);
      for (int v = 0; v < kGgufBlock / kL; ++v) {
        w[v] = widen_i8(reinterpret_cast<const int8_t*>(p + 2) + v * kL) * d;
        if (bf16) w[v] = round_bf16_normal(w[v]);  // q * d: never subnormal
      }
      return;
    }
    const Tab t = table(p);
    const uint8_t* c = p + (type == kGgufQ4_1 ? 4 : 2);
#if defined(__AVX512F__)
    lookup_chunk(c, t, w[1], w[0]);  // low nibbles: weights 0-15; high: 16-31
#elif defined(__AVX2__)
    lookup_chunk(c, t, w[2], w[0]);  // bytes 0-7: weights 0-7 (low), 16-23 (high)
    lookup_chunk(c + 8, t, w[3], w[1]);  // bytes 8-15: weights 8-15, 24-31
#else
    alignas(64) float e[16], o[kGgufBlock];
    std::memcpy(e, &t, sizeof e);
    for (int j = 0; j < 16; ++j) o[j] = e[c[j] & 15], o[j + 16] = e[c[j] >> 4];
    std::memcpy(w, o, sizeof o);
#endif
  }

  void decode(int64_t n, float* w) const {  // row n into w[0:K], in k order
    fvec v[kGgufBlock / kL];
    for (int64_t b = 0; b < K / kGgufBlock; ++b) {
      values(n, b, v);
      std::memcpy(w + b * kGgufBlock, v, sizeof v);
    }
  }
};

// All MR (<= kMR) rows of x against output rows n0 .. n0 + kNR, a block at a time into registers: the sums of
// tile() over Gguf::decode, without the buffer.
template <int MR, typename T>
void direct(const T* x, const Gguf& q, int64_t ldo, int64_t n0, const T* bias, T* out) {
  const int64_t K = q.K;
  fvec acc[MR][kNR] = {};
  for (int64_t b = 0; b < K / kGgufBlock; ++b)
    for (int j = 0; j < kNR; ++j) {
      fvec w[kGgufBlock / kL];
      q.values(n0 + j, b, w);
      for (int v = 0; v < kGgufBlock / kL; ++v)
        for (int i = 0; i < MR; ++i) acc[i][j] = fmadd(loadv(x + i * K + b * kGgufBlock + v * kL), w[v], acc[i][j]);
    }
  finish_tile(acc, bias, n0, out, ldo);
}

}  // namespace
}  // namespace loraplex
