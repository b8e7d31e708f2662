// The 256-bit kernels (one block of 32 per vector), included twice by kernels.cpp: as AVX2 and as AVX-VNNI, under
// `#pragma GCC target` and with CATDOG_NS / CATDOG_DOT set. Only the byte dot product differs between the two.

namespace CATDOG_NS {
  static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <int MT>
  static void q4_tile(const Activations& a, int64_t m0, const uint8_t* row,
                                                      const uint16_t* srow, float* y, int64_t n) {
    const int64_t k = a.k, nb = a.blocks, full = k / 128;
    const __m256i low = _mm256_set1_epi8(15);
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    auto block = [&](__m256i wq, int64_t b, float sw) {
      const __m256 ws = _mm256_set1_ps(sw);
      for (int i = 0; i < MT; ++i) {
        const int64_t m = m0 + i, at = (m * nb + b) * 8;
        const __m256i xq = _mm256_loadu_si256((const __m256i*)(a.q.data() + m * k + b * kGroup));
        const __m256i dot = CATDOG_DOT(_mm256_loadu_si256((const __m256i*)(a.bias.data() + at)), wq, xq);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_loadu_ps(a.scale.data() + at)),
                                 acc[i]);
      }
    };
    for (int64_t c = 0; c < full; ++c) {
      _mm_prefetch((const char*)(row + c * 64 + kPrefetch), _MM_HINT_T0);
      const __m256i w0 = _mm256_loadu_si256((const __m256i*)(row + c * 64));
      const __m256i w1 = _mm256_loadu_si256((const __m256i*)(row + c * 64 + 32));
      const __m128 sw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(srow + c * 4)));
      float s4[4];
      _mm_storeu_ps(s4, sw);
      block(_mm256_and_si256(w0, low), c * 4 + 0, s4[0]);
      block(_mm256_and_si256(w1, low), c * 4 + 1, s4[1]);
      block(_mm256_and_si256(_mm256_srli_epi16(w0, 4), low), c * 4 + 2, s4[2]);
      block(_mm256_and_si256(_mm256_srli_epi16(w1, 4), low), c * 4 + 3, s4[3]);
    }
    if (k % 128) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(row + full * 64));
      block(_mm256_and_si256(w, low), full * 4, half_to_float(srow[full * 4]));
      block(_mm256_and_si256(_mm256_srli_epi16(w, 4), low), full * 4 + 1, half_to_float(srow[full * 4 + 1]));
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * n] = hsum(acc[i]);
  }
  template <int MT>
  static void q8_tile(const Activations& a, int64_t m0, const int8_t* row,
                                                      float sw, float* y, int64_t n) {
    const int64_t k = a.k, nb = a.blocks;
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      if ((b & 1) == 0) _mm_prefetch((const char*)(row + b * kGroup + kPrefetch), _MM_HINT_T0);
      const __m256i raw = _mm256_loadu_si256((const __m256i*)(row + b * kGroup));
#if CATDOG_Q8_SIGNED
      // maddubs would saturate on 255 x 127 pairs: |w| x (x with w's sign) instead, activations without offset
      const __m256i wq = _mm256_abs_epi8(raw);
#else
      const __m256i wq = _mm256_xor_si256(raw, flip);
#endif
      for (int i = 0; i < MT; ++i) {
        const int64_t m = m0 + i, at = (m * nb + b) * 8;
        const __m256i xq = _mm256_loadu_si256((const __m256i*)(a.q.data() + m * k + b * kGroup));
#if CATDOG_Q8_SIGNED
        const __m256i dot = CATDOG_DOT(_mm256_loadu_si256((const __m256i*)(a.bias.data() + at)), wq,
                                       _mm256_sign_epi8(xq, raw));
#else
        const __m256i dot = CATDOG_DOT(_mm256_loadu_si256((const __m256i*)(a.bias.data() + at)), wq, xq);
#endif
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(a.scale.data() + at), acc[i]);
      }
    }
    for (int i = 0; i < MT; ++i) y[(m0 + i) * n] = hsum(acc[i]) * sw;
  }
  }
