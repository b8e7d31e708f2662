// catdog's CPU kernels for quantized Linear layers, registered as torch.library ops (catdog::...).
//
// Weights: "q4" = symmetric int4 in groups of 32 (w = (q - 8) * d, q in 0..15, one fp16 d per group: 4.5 bits a
// weight, as llama.cpp's Q4_0) or asymmetric (w = q * d + m, fp16 d and m: 5 bits, for weights that already lie on
// such a grid, as a Q4_1 GGUF's do), packed per row in chunks of 128 weights (64 bytes): byte j holds weight j in its low
// nibble and weight 64 + j in its high nibble, so one 64-byte load splits into two runs of 64 consecutive weights. A
// row whose length is 64 mod 128 ends with a chunk of 64 (32 bytes, weight j low, 32 + j high). "q8" = torch's int8
// rows with a scale per row (what Int8Linear holds).
//
// Few rows (decode): each activation row is quantized to int8 per block of 32 (scale = max|x| / 127, as llama.cpp's
// Q8_0) and multiplied with the weights' bytes by VNNI (vpdpbusd: unsigned weight bytes x signed activations into
// int32), scaled per block in fp32. The weights' offset (8 for q4, 128 for q8 stored as unsigned) is taken off through
// the accumulator's start value: -offset * sum(block's int8 activations) in the block's first lane.
// Many rows (prefill): the weights are dequantized a tile at a time and multiplied by torch's own GEMM (oneDNN, AMX
// where the CPU has it).
// The instruction set is chosen at run time from the CPU's flags; every path gives the same integers, so results
// differ between paths only by float summation order.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <string>
#include <vector>

#include <immintrin.h>

namespace catdog {

constexpr int64_t kGroup = 32;
// Trial scales for a group of weights: -(8 + step / 4) / max for step in -4..4 by this. Every other one (5 trials)
// quantizes 6 billion weights in half the time of all 9 for 0.7% more squared error (measured: 0.00660 against
// 0.00655 of the weights' energy on Gaussian weights; max -> -8 alone, as Q4_0: 0.0074).
constexpr int kScaleStep = 2;
// How far ahead of its loads a kernel asks for weight bytes: decode streams every weight from memory once, and the
// hardware prefetcher alone left a core at 8 of its 13 GiB/s (measured on a 2-core Xeon; 4 KiB ahead: 8.0, 8 KiB:
// 11.2, 16-32 KiB: 11.1).
constexpr int64_t kPrefetch = 16384;

enum Isa : int { kReference = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };
static const char* kIsaNames[] = {"reference", "avx2", "avx_vnni", "avx512_vnni"};

static bool isa_supported(int isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kReference:
      return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvxVnni:
      return isa_supported(kAvx2) && __builtin_cpu_supports("avxvnni");
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && isa_supported(kAvx2);
  }
  return false;
}

static int best_isa() {
  for (int isa = kAvx512Vnni; isa > kReference; --isa)
    if (isa_supported(isa)) return isa;
  return kReference;
}

static std::atomic<int> g_isa{-1};
static std::atomic<int64_t> g_max_small_rows{16};  // rows up to which the VNNI path runs; above: dequantize + GEMM

static int current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa);
  }
  return isa;
}

// ---- activations: int8 per block of 32, with the block's scale and start value spread over 8 lanes -------------
struct Activations {
  int64_t rows = 0, k = 0, blocks = 0;
  std::vector<int8_t> q;      // [rows, k]
  std::vector<float> scale;   // [rows, blocks, 8]: the block's scale in every lane
  std::vector<int32_t> bias;  // [rows, blocks, 8]: -offset * sum(q) in lane 0, 0 elsewhere
  std::vector<float> sum;     // [rows, blocks]: scale * sum(q), what a block's min multiplies (asymmetric weights)
};

static void quantize_activations(const float* x, int64_t rows, int64_t k, int32_t offset, Activations& a) {
  a.rows = rows;
  a.k = k;
  a.blocks = k / kGroup;
  a.q.resize(rows * k);
  a.scale.assign(rows * a.blocks * 8, 0.f);
  a.bias.assign(rows * a.blocks * 8, 0);
  a.sum.assign(rows * a.blocks, 0.f);
  at::parallel_for(0, rows * a.blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x + i * kGroup;  // rows are contiguous, so block i of the flat matrix
      int8_t* dst = a.q.data() + i * kGroup;
      float amax = 0.f;
      for (int t = 0; t < kGroup; ++t) amax = std::max(amax, std::fabs(src[t]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int t = 0; t < kGroup; ++t) {
        int v = (int)std::nearbyint(src[t] * id);
        v = std::min(127, std::max(-127, v));
        dst[t] = (int8_t)v;
        sum += v;
      }
      for (int t = 0; t < 8; ++t) a.scale[i * 8 + t] = d;
      a.bias[i * 8] = -offset * sum;
      a.sum[i] = d * (float)sum;
    }
  });
}

static inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// ---- reference: plain C++, the same integer arithmetic -----------------------------------------------------------
namespace ref {

static inline int q4_at(const uint8_t* row, int64_t k, int64_t j) {
  const int64_t chunk = j / 128, full = k / 128;
  const int64_t size = chunk < full ? 128 : 64;
  const int64_t in = j - chunk * 128, half = size / 2;
  const uint8_t byte = row[chunk * 64 + (in < half ? in : in - half)];
  return in < half ? (byte & 15) : (byte >> 4);
}

static void q4_rows(const Activations& a, const uint8_t* w, const uint16_t* s, float* y, int64_t n, int64_t n0,
                    int64_t n1) {
  const int64_t k = a.k, nb = a.blocks;
  for (int64_t r = n0; r < n1; ++r) {
    const uint8_t* row = w + r * (k / 2);
    for (int64_t m = 0; m < a.rows; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = a.bias[(m * nb + b) * 8];
        for (int t = 0; t < kGroup; ++t) dot += q4_at(row, k, b * kGroup + t) * a.q[m * k + b * kGroup + t];
        acc += (float)dot * (half_to_float(s[r * nb + b]) * a.scale[(m * nb + b) * 8]);
      }
      y[m * n + r] = acc;
    }
  }
}

static void q8_rows(const Activations& a, const int8_t* w, const float* s, float* y, int64_t n, int64_t n0,
                    int64_t n1) {
  const int64_t k = a.k, nb = a.blocks;
  for (int64_t r = n0; r < n1; ++r) {
    for (int64_t m = 0; m < a.rows; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = a.bias[(m * nb + b) * 8];
        for (int t = 0; t < kGroup; ++t)
          dot += ((int)w[r * k + b * kGroup + t] + 128) * a.q[m * k + b * kGroup + t];
        acc += (float)dot * a.scale[(m * nb + b) * 8];
      }
      y[m * n + r] = acc * s[r];
    }
  }
}

}  // namespace ref

// ---- AVX2 / AVX-VNNI: 256 bits, one block of 32 per vector --------------------------------------------------------
// The same code twice (kernels_256.h) under two target options; only the byte dot product differs. `#pragma GCC
// target` rather than function attributes, so the lambdas inside get the instructions too.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CATDOG_NS avx2
#define CATDOG_Q8_SIGNED 1
#define CATDOG_DOT(acc, u, s) \
  _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#include "kernels_256.h"
#undef CATDOG_NS
#undef CATDOG_DOT
#undef CATDOG_Q8_SIGNED
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define CATDOG_NS avxvnni
#define CATDOG_Q8_SIGNED 0
#define CATDOG_DOT(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#include "kernels_256.h"
#undef CATDOG_NS
#undef CATDOG_DOT
#undef CATDOG_Q8_SIGNED
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
static float min_dot(const uint16_t* mins, const float* sums, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mins + b))), _mm256_loadu_ps(sums + b), acc);
  float total = hsum(acc);
  for (; b < nb; ++b) total += half_to_float(mins[b]) * sums[b];
  return total;
}
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512 VNNI: 512 bits, two blocks per vector ----------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
namespace avx512 {

// NT consecutive weight rows against MT activation rows: NT > 1 keeps several rows' loads in flight (decode, one
// activation row), MT > 1 reuses each weight load for several activation rows. Two accumulators per pair of rows so
// that consecutive FMAs do not wait on each other.
template <int NT, int MT>
static inline void q4_tile(const Activations& a, int64_t m0, const uint8_t* row, const uint16_t* srow, float* y,
                           int64_t n) {
  const int64_t k = a.k, nb = a.blocks, full = k / 128, stride = k / 2;
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i second = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  __m512 acc[NT][MT][2];
  for (int r = 0; r < NT; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
  // two blocks (64 weights: blocks b and b + 1) against the activations from block b on
  auto pair = [&](__m512 (&out)[MT][2], int half, __m512i wq, int64_t b, __m512 ws) {
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i, at = (m * nb + b) * 8;
      const __m512i xq = _mm512_loadu_si512(a.q.data() + m * k + b * kGroup);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(a.bias.data() + at), wq, xq);
      out[i][half] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_loadu_ps(a.scale.data() + at)),
                                     out[i][half]);
    }
  };
  for (int64_t c = 0; c < full; ++c) {
    for (int r = 0; r < NT; ++r) {
      const uint8_t* bytes = row + r * stride + c * 64;
      _mm_prefetch((const char*)(bytes + kPrefetch), _MM_HINT_T0);
      if ((c & 7) == 0) _mm_prefetch((const char*)(srow + r * nb + c * 4) + kPrefetch / 16, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(bytes);
      const __m512 s = _mm512_cvtph_ps(
          _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i*)(srow + r * nb + c * 4))));
      pair(acc[r], 0, _mm512_and_si512(w, low), c * 4, _mm512_permutexvar_ps(first, s));
      pair(acc[r], 1, _mm512_and_si512(_mm512_srli_epi16(w, 4), low), c * 4 + 2, _mm512_permutexvar_ps(second, s));
    }
  }
  if (k % 128) {
    for (int r = 0; r < NT; ++r) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(row + r * stride + full * 64));
      const __m256i lo = _mm256_and_si256(w, _mm256_set1_epi8(15));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(15));
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      uint32_t two;
      std::memcpy(&two, srow + r * nb + full * 4, 4);
      const __m512 s = _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_cvtsi32_si128((int)two)));
      pair(acc[r], 0, both, full * 4, _mm512_permutexvar_ps(first, s));
    }
  }
  for (int r = 0; r < NT; ++r)
    for (int i = 0; i < MT; ++i) y[(m0 + i) * n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1]));
}

template <int NT, int MT>
static inline void q8_tile(const Activations& a, int64_t m0, const int8_t* row, const float* sw, float* y, int64_t n) {
  const int64_t k = a.k, nb = a.blocks;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  __m512 acc[NT][MT][2];
  for (int r = 0; r < NT; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 2) {  // k % 64 == 0: whole pairs of blocks
    for (int r = 0; r < NT; ++r) {
      const int8_t* bytes = row + r * k + b * kGroup;
      _mm_prefetch((const char*)(bytes + kPrefetch), _MM_HINT_T0);
      const __m512i wq = _mm512_xor_si512(_mm512_loadu_si512(bytes), flip);
      for (int i = 0; i < MT; ++i) {
        const int64_t m = m0 + i, at = (m * nb + b) * 8;
        const __m512i xq = _mm512_loadu_si512(a.q.data() + m * k + b * kGroup);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(a.bias.data() + at), wq, xq);
        const int half = (b / 2) & 1;
        acc[r][i][half] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(a.scale.data() + at), acc[r][i][half]);
      }
    }
  }
  for (int r = 0; r < NT; ++r)
    for (int i = 0; i < MT; ++i)
      y[(m0 + i) * n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1])) * sw[r];
}

// quantize_group_plain with two vectors per group: the 9 trial scales of 6 billion weights took 90 s in plain C++
static float quantize_group(const float* g, int8_t* L) {
  const __m512 a0 = _mm512_loadu_ps(g), a1 = _mm512_loadu_ps(g + 16);
  const __m512 abs0 = _mm512_abs_ps(a0), abs1 = _mm512_abs_ps(a1);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(abs0, abs1));
  std::memset(L, 0, kGroup);
  if (amax == 0.f) return 0.f;
  // the signed value of largest magnitude, the first one on a tie as the plain loop
  const __mmask16 m0 = _mm512_cmp_ps_mask(abs0, _mm512_set1_ps(amax), _CMP_EQ_OQ);
  const __mmask16 m1 = _mm512_cmp_ps_mask(abs1, _mm512_set1_ps(amax), _CMP_EQ_OQ);
  const float max = m0 ? g[__builtin_ctz(m0)] : g[16 + __builtin_ctz(m1)];
  const __m512 lo = _mm512_set1_ps(-8.f), hi = _mm512_set1_ps(7.f);
  float best = -1.f, scale = 0.f;
  __m512 keep0 = _mm512_setzero_ps(), keep1 = _mm512_setzero_ps();
  for (int step = -4; step <= 4; step += kScaleStep) {
    const __m512 iscale = _mm512_set1_ps(-(8.f + 0.25f * (float)step) / max);
    const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 l0 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(a0, iscale), round), lo), hi);
    const __m512 l1 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(a1, iscale), round), lo), hi);
    const float sumlx = _mm512_reduce_add_ps(_mm512_fmadd_ps(a1, l1, _mm512_mul_ps(a0, l0)));
    const float suml2 = _mm512_reduce_add_ps(_mm512_fmadd_ps(l1, l1, _mm512_mul_ps(l0, l0)));
    if (suml2 > 0.f && sumlx * sumlx > best * suml2) {
      best = sumlx * sumlx / suml2;
      scale = sumlx / suml2;
      keep0 = l0;
      keep1 = l1;
    }
  }
  _mm_storeu_si128((__m128i*)L, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(keep0)));
  _mm_storeu_si128((__m128i*)(L + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(keep1)));
  return scale;
}

// sum over blocks of min (fp16) x the block's activation sum: the asymmetric format's extra term for one row
static float min_dot(const uint16_t* mins, const float* sums, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= nb; b += 16)
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mins + b))), _mm512_loadu_ps(sums + b),
                          acc);
  float total = _mm512_reduce_add_ps(acc);
  for (; b < nb; ++b) total += half_to_float(mins[b]) * sums[b];
  return total;
}

static inline __m256i to_bf16(__m512 f) {  // round to nearest even, as c10::BFloat16 (weights are finite)
  __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

template <typename T>
static void dequantize_q4_row(const uint8_t* row, const uint16_t* srow, const uint16_t* mrow, int64_t k, T* out) {
  const int64_t full = k / 128;
  const __m512i offset = _mm512_set1_epi32(mrow ? 0 : 8);
  auto store = [&](T* dst, __m128i bytes, int64_t b) {
    const float scale = half_to_float(srow[b]), min = mrow ? half_to_float(mrow[b]) : 0.f;
    // (q - offset) * scale + min, rounded once (an fma) as the plain loop's float expression
    const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), offset)),
                                     _mm512_set1_ps(scale), _mm512_set1_ps(min));
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(dst, v);
    } else {
      _mm256_storeu_si256((__m256i*)dst, to_bf16(v));
    }
  };
  for (int64_t c = 0; c < full; ++c) {
    const __m512i w = _mm512_loadu_si512(row + c * 64);
    const __m512i lo = _mm512_and_si512(w, _mm512_set1_epi8(15));
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(15));
    const int64_t b = c * 4;
    T* dst = out + c * 128;
    store(dst + 0, _mm512_extracti32x4_epi32(lo, 0), b);
    store(dst + 16, _mm512_extracti32x4_epi32(lo, 1), b);
    store(dst + 32, _mm512_extracti32x4_epi32(lo, 2), b + 1);
    store(dst + 48, _mm512_extracti32x4_epi32(lo, 3), b + 1);
    store(dst + 64, _mm512_extracti32x4_epi32(hi, 0), b + 2);
    store(dst + 80, _mm512_extracti32x4_epi32(hi, 1), b + 2);
    store(dst + 96, _mm512_extracti32x4_epi32(hi, 2), b + 3);
    store(dst + 112, _mm512_extracti32x4_epi32(hi, 3), b + 3);
  }
  if (k % 128) {
    const __m256i w = _mm256_loadu_si256((const __m256i*)(row + full * 64));
    const __m256i lo = _mm256_and_si256(w, _mm256_set1_epi8(15));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(15));
    T* dst = out + full * 128;
    store(dst + 0, _mm256_extracti128_si256(lo, 0), full * 4);
    store(dst + 16, _mm256_extracti128_si256(lo, 1), full * 4);
    store(dst + 32, _mm256_extracti128_si256(hi, 0), full * 4 + 1);
    store(dst + 48, _mm256_extracti128_si256(hi, 1), full * 4 + 1);
  }
}

}  // namespace avx512
#pragma GCC pop_options

// ---- driving the tiles: rows of the weight in parallel ------------------------------------------------------------
constexpr int kRowTile = 4;

template <typename Tile4, typename Tile1>
static void for_each_tile(int64_t m_rows, Tile4 tile4, Tile1 tile1) {
  int64_t m0 = 0;
  for (; m0 + kRowTile <= m_rows; m0 += kRowTile) tile4(m0);
  for (; m0 < m_rows; ++m0) tile1(m0);
}

// Few rows of x: y[m, r] for every weight row r, through the chosen instruction set.
// Asymmetric weights: + the sum over blocks of min x (scale x sum of the block's int8 activations), for rows [n0, n1).
static void add_min_terms(int isa, const Activations& a, const uint16_t* mins, float* y, int64_t n, int64_t n0,
                          int64_t n1) {
  const int64_t nb = a.blocks;
  for (int64_t r = n0; r < n1; ++r)
    for (int64_t i = 0; i < a.rows; ++i) {
      const uint16_t* row = mins + r * nb;
      const float* sums = a.sum.data() + i * nb;
      float extra = 0.f;
      if (isa == kAvx512Vnni) {
        extra = avx512::min_dot(row, sums, nb);
      } else if (isa != kReference) {
        extra = avx2::min_dot(row, sums, nb);
      } else {
        for (int64_t b = 0; b < nb; ++b) extra += half_to_float(row[b]) * sums[b];
      }
      y[i * n + r] += extra;
    }
}

static void q4_rows_any(int isa, const Activations& a, const uint8_t* w, const uint16_t* s, float* y, int64_t n,
                        int64_t n0, int64_t n1);

static void q4_small(int isa, const Activations& a, const uint8_t* w, const uint16_t* s, const uint16_t* mins,
                     float* y, int64_t n) {
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    q4_rows_any(isa, a, w, s, y, n, n0, n1);
    if (mins) add_min_terms(isa, a, mins, y, n, n0, n1);  // while this thread's rows are in its cache
  });
}

static void q4_rows_any(int isa, const Activations& a, const uint8_t* w, const uint16_t* s, float* y, int64_t n,
                        int64_t n0, int64_t n1) {
  const int64_t k = a.k, nb = a.blocks;
  {
    if (isa == kReference) return ref::q4_rows(a, w, s, y, n, n0, n1);
    int64_t r = n0;
    if (isa == kAvx512Vnni) {  // four weight rows at a time against one activation row, four against one row
      for (; r + 4 <= n1; r += 4) {
        const uint8_t* row = w + r * (k / 2);
        const uint16_t* srow = s + r * nb;
        for_each_tile(
            a.rows, [&](int64_t m0) { avx512::q4_tile<1, kRowTile>(a, m0, row, srow, y + r, n);
                                      avx512::q4_tile<1, kRowTile>(a, m0, row + k / 2, srow + nb, y + r + 1, n);
                                      avx512::q4_tile<1, kRowTile>(a, m0, row + k, srow + 2 * nb, y + r + 2, n);
                                      avx512::q4_tile<1, kRowTile>(a, m0, row + 3 * k / 2, srow + 3 * nb, y + r + 3, n); },
            [&](int64_t m0) { avx512::q4_tile<4, 1>(a, m0, row, srow, y + r, n); });
      }
    }
    for (; r < n1; ++r) {
      const uint8_t* row = w + r * (k / 2);
      const uint16_t* srow = s + r * nb;
      float* out = y + r;
      switch (isa) {
        case kAvx512Vnni:
          for_each_tile(
              a.rows, [&](int64_t m0) { avx512::q4_tile<1, kRowTile>(a, m0, row, srow, out, n); },
              [&](int64_t m0) { avx512::q4_tile<1, 1>(a, m0, row, srow, out, n); });
          break;
        case kAvxVnni:
          for_each_tile(
              a.rows, [&](int64_t m0) { avxvnni::q4_tile<kRowTile>(a, m0, row, srow, out, n); },
              [&](int64_t m0) { avxvnni::q4_tile<1>(a, m0, row, srow, out, n); });
          break;
        default:
          for_each_tile(
              a.rows, [&](int64_t m0) { avx2::q4_tile<kRowTile>(a, m0, row, srow, out, n); },
              [&](int64_t m0) { avx2::q4_tile<1>(a, m0, row, srow, out, n); });
      }
    }
  }
}

static void q8_small(int isa, const Activations& a, const int8_t* w, const float* s, float* y, int64_t n) {
  const int64_t k = a.k;
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    if (isa == kReference) return ref::q8_rows(a, w, s, y, n, n0, n1);
    int64_t r = n0;
    if (isa == kAvx512Vnni) {
      for (; r + 4 <= n1; r += 4) {
        const int8_t* row = w + r * k;
        for_each_tile(
            a.rows, [&](int64_t m0) { for (int j = 0; j < 4; ++j)
                                        avx512::q8_tile<1, kRowTile>(a, m0, row + j * k, s + r + j, y + r + j, n); },
            [&](int64_t m0) { avx512::q8_tile<4, 1>(a, m0, row, s + r, y + r, n); });
      }
    }
    for (; r < n1; ++r) {
      const int8_t* row = w + r * k;
      float* out = y + r;
      switch (isa) {
        case kAvx512Vnni:
          for_each_tile(
              a.rows, [&](int64_t m0) { avx512::q8_tile<1, kRowTile>(a, m0, row, s + r, out, n); },
              [&](int64_t m0) { avx512::q8_tile<1, 1>(a, m0, row, s + r, out, n); });
          break;
        case kAvxVnni:
          for_each_tile(
              a.rows, [&](int64_t m0) { avxvnni::q8_tile<kRowTile>(a, m0, row, s[r], out, n); },
              [&](int64_t m0) { avxvnni::q8_tile<1>(a, m0, row, s[r], out, n); });
          break;
        default:
          for_each_tile(
              a.rows, [&](int64_t m0) { avx2::q8_tile<kRowTile>(a, m0, row, s[r], out, n); },
              [&](int64_t m0) { avx2::q8_tile<1>(a, m0, row, s[r], out, n); });
      }
    }
  });
}

// ---- dequantization (prefill tiles, embedding rows, tests) --------------------------------------------------------
template <typename T>
static void dequantize_q4_row_plain(const uint8_t* row, const uint16_t* srow, const uint16_t* mrow, int64_t k,
                                    T* out) {
  const int offset = mrow ? 0 : 8;
  const int64_t full = k / 128;
  for (int64_t c = 0; c * 128 < k; ++c) {
    const int64_t size = c < full ? 128 : 64, half = size / 2;
    const uint8_t* bytes = row + c * 64;
    T* dst = out + c * 128;
    const int64_t b0 = c * 4;
    for (int64_t j = 0; j < half; ++j) {
      const int64_t lo_b = b0 + j / kGroup, hi_b = b0 + (half + j) / kGroup;
      const float lo_m = mrow ? half_to_float(mrow[lo_b]) : 0.f, hi_m = mrow ? half_to_float(mrow[hi_b]) : 0.f;
      dst[j] = static_cast<T>((float)((bytes[j] & 15) - offset) * half_to_float(srow[lo_b]) + lo_m);
      dst[half + j] = static_cast<T>((float)((bytes[j] >> 4) - offset) * half_to_float(srow[hi_b]) + hi_m);
    }
  }
}

static const uint16_t* half_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() ? reinterpret_cast<const uint16_t*>(t->data_ptr<at::Half>())
                                                     : nullptr;
}

static at::Tensor dequantize_q4_rows(const at::Tensor& qweight, const at::Tensor& scales,
                                     const c10::optional<at::Tensor>& mins, at::ScalarType dtype, int64_t n0,
                                     int64_t n1) {
  const uint16_t* m = half_ptr(mins);
  const int64_t k = qweight.size(1) * 2, nb = k / kGroup;
  auto out = at::empty({n1 - n0, k}, qweight.options().dtype(dtype));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const bool fast = current_isa() == kAvx512Vnni;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dequantize_q4", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(n0, n1, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
          if (fast) {
            avx512::dequantize_q4_row(w + r * (k / 2), s + r * nb, m ? m + r * nb : nullptr, k, dst + (r - n0) * k);
            continue;
          }
        }
        dequantize_q4_row_plain(w + r * (k / 2), s + r * nb, m ? m + r * nb : nullptr, k, dst + (r - n0) * k);
      }
    });
  });
  return out;
}

// ---- quantization of weights: symmetric int4 per group, scale chosen for the least squared error --------------------
// One group of 32, symmetric: as llama.cpp's make_qx_quants, a few reciprocal scales around max -> -8; for each, the
// least-squares scale of its levels; keep the one that explains the most of the group (sum(xl)^2 / sum(l^2)).
static float quantize_group_plain(const float* g, int8_t* L) {
  float amax = 0.f, max = 0.f;
  for (int t = 0; t < kGroup; ++t)
    if (std::fabs(g[t]) > amax) amax = std::fabs(g[t]), max = g[t];
  std::memset(L, 0, kGroup);
  float scale = 0.f;
  if (amax == 0.f) return scale;
  float best = -1.f;
  int8_t trial[kGroup];
  for (int step = -4; step <= 4; step += kScaleStep) {
    const float iscale = -(8.f + 0.25f * (float)step) / max;
    float sumlx = 0.f, suml2 = 0.f;
    for (int t = 0; t < kGroup; ++t) {
      int l = (int)std::nearbyint(iscale * g[t]);
      l = std::min(7, std::max(-8, l));
      trial[t] = (int8_t)l;
      sumlx += g[t] * (float)l;
      suml2 += (float)(l * l);
    }
    if (suml2 > 0.f && sumlx * sumlx > best * suml2) {
      best = sumlx * sumlx / suml2;
      scale = sumlx / suml2;
      std::memcpy(L, trial, kGroup);
    }
  }
  return scale;
}

static void quantize_q4_row_asymmetric(const float* x, int64_t k, int8_t* levels, uint16_t* srow, uint16_t* mrow) {
  for (int64_t b = 0; b < k / kGroup; ++b) {
    const float* g = x + b * kGroup;
    float lo = g[0], hi = g[0];
    for (int t = 1; t < kGroup; ++t) lo = std::min(lo, g[t]), hi = std::max(hi, g[t]);
    srow[b] = c10::detail::fp16_ieee_from_fp32_value((hi - lo) / 15.f);
    mrow[b] = c10::detail::fp16_ieee_from_fp32_value(lo);
    // levels against the stored (fp16) scale and min, so that weights on such a grid land on it exactly
    const float d = half_to_float(srow[b]), m = half_to_float(mrow[b]);
    for (int t = 0; t < kGroup; ++t) {
      const int l = d > 0.f ? (int)std::nearbyint((g[t] - m) / d) : 0;
      levels[b * kGroup + t] = (int8_t)(std::min(15, std::max(0, l)) - 8);  // stored as the symmetric levels are
    }
  }
}

static void quantize_q4_row(const float* x, int64_t k, uint8_t* row, uint16_t* srow, uint16_t* mrow) {
  std::vector<int8_t> levels(k);
  if (mrow) quantize_q4_row_asymmetric(x, k, levels.data(), srow, mrow);
  const bool fast = current_isa() == kAvx512Vnni;
  for (int64_t b = 0; b < (mrow ? 0 : k / kGroup); ++b) {
    const float scale = fast ? avx512::quantize_group(x + b * kGroup, levels.data() + b * kGroup)
                             : quantize_group_plain(x + b * kGroup, levels.data() + b * kGroup);
    srow[b] = c10::detail::fp16_ieee_from_fp32_value(scale);
  }
  const int64_t full = k / 128;
  for (int64_t c = 0; c * 128 < k; ++c) {
    const int64_t half = (c < full ? 128 : 64) / 2;
    const int8_t* L = levels.data() + c * 128;
    for (int64_t j = 0; j < half; ++j) row[c * 64 + j] = (uint8_t)((L[j] + 8) | ((L[half + j] + 8) << 4));
  }
}

// ---- the ops ------------------------------------------------------------------------------------------------------
static void check_q4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "catdog::q4 kernels run on the CPU");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "q4 weight: a contiguous uint8 [N, K/2] tensor");
  const int64_t k = qweight.size(1) * 2;
  TORCH_CHECK(k % 64 == 0, "q4 weight: K must be a multiple of 64, got ", k);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == qweight.size(0) && scales.size(1) == k / kGroup,
              "q4 scales: a contiguous fp16 [N, K/32] tensor");
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features, the weight ", k);
}

static void check_mins(const at::Tensor& scales, const c10::optional<at::Tensor>& mins) {
  if (mins.has_value() && mins->defined() && mins->numel())
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->sizes() == scales.sizes(),
                "q4 mins: a contiguous fp16 tensor shaped as the scales");
}

// y [rows, n] (fp32 from the few-rows path, x's dtype from the GEMM) + bias, as x's dtype and leading shape
static at::Tensor finish(at::Tensor y, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t n) {
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return y.to(x.scalar_type()).view(sizes);
}

// The few-rows paths read x as floats and write y in x's dtype with loops of their own rather than `to()`: two
// tensor ops fewer per call, where a decode step makes 4 calls a layer (SmolLM2: ~0.7 ms of a 7.5 ms step).
template <typename F>
static void as_float_rows(const at::Tensor& x2, F use) {
  if (x2.scalar_type() == at::kFloat && x2.is_contiguous()) return use(x2.data_ptr<float>());
  if (x2.scalar_type() == at::kBFloat16 && x2.is_contiguous()) {
    thread_local std::vector<float> buffer;
    const int64_t count = x2.numel();
    buffer.resize(count);
    const c10::BFloat16* src = x2.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(src[i]);
    return use(buffer.data());
  }
  auto xf = x2.to(at::kFloat).contiguous();
  use(xf.data_ptr<float>());
}

// y (float [rows, n]) + bias, in x's dtype and shape
static at::Tensor finish_small(const float* y, int64_t rows, int64_t n, const at::Tensor& x,
                               const c10::optional<at::Tensor>& bias) {
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    bp = b.data_ptr<float>();
  }
  auto out = at::empty(sizes, x.options());
  auto write = [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) o[r * n + j] = static_cast<T>(y[r * n + j] + (bp ? bp[j] : 0.f));
  };
  if (x.scalar_type() == at::kFloat)
    write(out.data_ptr<float>());
  else if (x.scalar_type() == at::kBFloat16)
    write(out.data_ptr<c10::BFloat16>());
  else {
    auto yf = at::from_blob(const_cast<float*>(y), {rows, n}, x.options().dtype(at::kFloat));
    if (bp) yf = yf + b;
    out.copy_(yf.view(sizes));
  }
  return out;
}

// Many rows: rows of the weight dequantized to x's dtype a tile at a time (a 4 MiB temporary, not the whole weight)
// into torch's GEMM (oneDNN: AMX / AVX-512 bf16 for bf16 activations). dequantize(n0, n1) -> [n1 - n0, k].
template <typename Dequantize>
static at::Tensor many_rows(const at::Tensor& x2, int64_t n, int64_t k, Dequantize dequantize) {
  auto y = at::empty({x2.size(0), n}, x2.options());
  const int64_t tile = std::max<int64_t>(64, (int64_t(4) << 20) / (k * x2.element_size()));
  for (int64_t n0 = 0; n0 < n; n0 += tile) {
    const int64_t n1 = std::min(n, n0 + tile);
    y.narrow(1, n0, n1 - n0).copy_(at::mm(x2, dequantize(n0, n1).t()));
  }
  return y;
}

// path: 0 = by the row count, 1 = int8 activations (few rows), 2 = dequantized weights into a GEMM (many rows). A
// caller that needs a row's result not to depend on what else shares the call (a request in a batch) says which.
static bool use_small(int64_t rows, int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (auto), 1 (few rows) or 2 (many rows)");
  return path == 1 || (path == 0 && rows <= g_max_small_rows.load());
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& bias, int64_t path) {
  check_q4(x, qweight, scales);
  check_mins(scales, mins);
  const uint16_t* m = half_ptr(mins);
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  auto x2 = x.reshape({-1, k});
  const int64_t rows = x2.size(0);
  if (!use_small(rows, path)) {
    auto y = many_rows(x2, n, k, [&](int64_t n0, int64_t n1) {
      return dequantize_q4_rows(qweight, scales, mins, x.scalar_type(), n0, n1);
    });
    return finish(y, x, bias, n);
  }
  thread_local Activations a;  // kept between calls: decode calls this hundreds of times a token
  // symmetric levels are stored as l + 8
  as_float_rows(x2, [&](const float* xf) { quantize_activations(xf, rows, k, m ? 0 : 8, a); });
  thread_local std::vector<float> y;
  y.resize(rows * n);
  q4_small(current_isa(), a, qweight.data_ptr<uint8_t>(),
           reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), m, y.data(), n);
  return finish_small(y.data(), rows, n, x, bias);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t path) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "catdog::q8 kernels run on the CPU");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2, "q8 weight: an int8 [N, K] tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k % 64 == 0, "q8 weight: K must be a multiple of 64, got ", k);
  TORCH_CHECK(scales.numel() == n, "q8 scales: one per row");
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features, the weight ", k);
  auto x2 = x.reshape({-1, k});
  const int64_t rows = x2.size(0);
  if (!use_small(rows, path)) {
    const auto s = scales.to(x.scalar_type());
    auto y = many_rows(x2, n, k, [&](int64_t n0, int64_t n1) {
      return weight.narrow(0, n0, n1 - n0).to(x.scalar_type()).mul_(s.narrow(0, n0, n1 - n0).unsqueeze(1));
    });
    return finish(y, x, bias, n);
  }
  auto w = weight.contiguous();
  auto s = scales.to(at::kFloat).contiguous();
  const int isa = current_isa();
  thread_local Activations a;  // kept between calls: decode calls this hundreds of times a token
  // the weights' bytes enter VNNI as unsigned (w + 128); AVX2's path multiplies signed bytes, with no offset
  as_float_rows(x2, [&](const float* xf) { quantize_activations(xf, rows, k, isa == kAvx2 ? 0 : 128, a); });
  thread_local std::vector<float> y;
  y.resize(rows * n);
  q8_small(isa, a, w.data_ptr<int8_t>(), s.data_ptr<float>(), y.data(), n);
  return finish_small(y.data(), rows, n, x, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q4_quantize(const at::Tensor& weight, bool asymmetric) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % 64 == 0, "q4_quantize: a [N, K] weight with K % 64 == 0");
  auto w = weight.to(at::kFloat).contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  auto packed = at::empty({n, k / 2}, w.options().dtype(at::kByte));
  auto scales = at::empty({n, k / kGroup}, w.options().dtype(at::kHalf));
  const float* src = w.data_ptr<float>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  uint16_t* s = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
  auto mins = at::empty({asymmetric ? n : 0, k / kGroup}, w.options().dtype(at::kHalf));
  uint16_t* m = asymmetric ? reinterpret_cast<uint16_t*>(mins.data_ptr<at::Half>()) : nullptr;
  const int64_t nb = k / kGroup;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_q4_row(src + r * k, k, dst + r * (k / 2), s + r * nb, m ? m + r * nb : nullptr);
  });
  return {packed, scales, mins};
}

at::Tensor q4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                         at::ScalarType dtype) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, "q4 weight: uint8 [N, K/2]");
  TORCH_CHECK(qweight.size(1) % 32 == 0, "q4 weight: K must be a multiple of 64, got ", qweight.size(1) * 2);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.size(0) == qweight.size(0) &&
                  scales.size(1) == qweight.size(1) * 2 / kGroup,
              "q4 scales: fp16 [N, K/32]");
  auto m = mins.has_value() && mins->defined() ? c10::optional<at::Tensor>(mins->contiguous()) : mins;
  check_mins(scales, m);
  return dequantize_q4_rows(qweight.contiguous(), scales.contiguous(), m, dtype, 0, qweight.size(0));
}

// ---- Python-side controls (tests and benchmarks): which instruction set, up to how many rows the VNNI path runs ---
static std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int isa = kReference; isa <= kAvx512Vnni; ++isa)
    if (isa_supported(isa)) out.push_back(kIsaNames[isa]);
  return out;
}

static std::string get_isa() { return kIsaNames[current_isa()]; }

static void set_isa(const std::string& name) {
  for (int isa = kReference; isa <= kAvx512Vnni; ++isa) {
    if (name == kIsaNames[isa]) {
      TORCH_CHECK(isa_supported(isa), "this CPU lacks the instructions of the ", name, " kernels");
      g_isa.store(isa);
      return;
    }
  }
  TORCH_CHECK(name == "auto", "unknown kernel path ", name);
  g_isa.store(best_isa());
}

static int64_t get_max_small_rows() { return g_max_small_rows.load(); }
static void set_max_small_rows(int64_t rows) { g_max_small_rows.store(rows); }

}  // namespace catdog

#include "attention.h"
#include "fused.h"

TORCH_LIBRARY(catdog, m) {
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins=None, Tensor? bias=None, int path=0) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias=None, int path=0) -> Tensor");
  m.def("q4_quantize(Tensor weight, bool asymmetric=False) -> (Tensor, Tensor, Tensor)");
  m.def("q4_dequantize(Tensor qweight, Tensor scales, Tensor? mins, ScalarType dtype) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool interleaved) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!)[] caches, int layer, int[] lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(catdog, CPU, m) {
  m.impl("q4_linear", &catdog::q4_linear);
  m.impl("q8_linear", &catdog::q8_linear);
  m.impl("q4_quantize", &catdog::q4_quantize);
  m.impl("q4_dequantize", &catdog::q4_dequantize);
  m.impl("decode_attention", &catdog::decode_attention);
  m.impl("rms_norm", &catdog::rms_norm);
  m.impl("add_rms_norm", &catdog::add_rms_norm);
  m.impl("rope_", &catdog::rope_);
  m.impl("silu_mul", &catdog::silu_mul);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("supported_isas", &catdog::supported_isas, "kernel paths this CPU can run, plainest first");
  module.def("isa", &catdog::get_isa, "the kernel path in use");
  module.def("set_isa", &catdog::set_isa, "use this kernel path (or 'auto')");
  module.def("max_small_rows", &catdog::get_max_small_rows);
  module.def("set_max_small_rows", &catdog::set_max_small_rows);
}
