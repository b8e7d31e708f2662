// Decode attention, included by kernels.cpp: one new token for each of B requests, all of them in one call, each
// against its own KV cache, a tensor [layers, 2 (keys, values), kv_heads, capacity, head_dim]. The call first writes
// the token's key and value at the request's length, then attends over length + 1 positions.
//
// Why: attention per request through SDPA costs a dozen small ops and their dispatch per request and layer (16
// requests x 30 layers of SmolLM2 = 480 SDPA calls a step), which at one query per request is far more time than the
// arithmetic. Here a request's grouped query heads read each cached key and value once (GQA: ChatGLM3 has 16 query
// heads per key head), the scores stay in fp32, and softmax uses a vectorized exp.

namespace catdog {
namespace attention {

struct Dims {
  int64_t group;  // query heads per key/value head
  int64_t d;      // head_dim
  int64_t n;      // positions attended (cached + the new one)
  float scale;
};

static inline float to_float(float v) { return v; }
static inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// The plain version: any head_dim, any CPU; also the reference the vectorized one is tested against.
template <typename T>
static void attend_plain(const float* q, const T* keys, const T* values, float* scores, float* out, const Dims& s) {
  for (int64_t t = 0; t < s.n; ++t) {
    const T* k = keys + t * s.d;
    for (int64_t h = 0; h < s.group; ++h) {
      float dot = 0.f;
      for (int64_t i = 0; i < s.d; ++i) dot += q[h * s.d + i] * to_float(k[i]);
      scores[h * s.n + t] = dot * s.scale;
    }
  }
  for (int64_t h = 0; h < s.group; ++h) {
    float* row = scores + h * s.n;
    float top = row[0], sum = 0.f;
    for (int64_t t = 1; t < s.n; ++t) top = std::max(top, row[t]);
    for (int64_t t = 0; t < s.n; ++t) sum += (row[t] = std::exp(row[t] - top));
    for (int64_t t = 0; t < s.n; ++t) row[t] /= sum;
  }
  std::fill(out, out + s.group * s.d, 0.f);
  for (int64_t t = 0; t < s.n; ++t) {
    const T* v = values + t * s.d;
    for (int64_t h = 0; h < s.group; ++h) {
      const float p = scores[h * s.n + t];
      for (int64_t i = 0; i < s.d; ++i) out[h * s.d + i] += p * to_float(v[i]);
    }
  }
}

}  // namespace attention
}  // namespace catdog

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace catdog {
namespace attention {
namespace avx2 {

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp: Cephes' expf, range reduction by ln 2 in two parts and a degree-6 polynomial, relative error ~1e-7; x is
// clamped to [-87, 88] (exp(-87) ~ 1.6e-38 is as good as 0 for softmax and SiLU, exp(88) ~ 1.7e38 as infinity)
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

// head_dim a multiple of 8
template <typename T>
static void attend(const float* q, const T* keys, const T* values, float* scores, float* out, const Dims& s) {
  const int64_t chunks = s.d / 8;
  for (int64_t t = 0; t < s.n; ++t) {
    const T* k = keys + t * s.d;
    for (int64_t h0 = 0; h0 < s.group; h0 += 4) {  // four query heads per pass over the key row (GQA)
      const int64_t hs = std::min<int64_t>(4, s.group - h0);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t c = 0; c < chunks; ++c) {
        const __m256 kc = load8(k + c * 8);
        for (int64_t j = 0; j < hs; ++j)
          acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (h0 + j) * s.d + c * 8), kc, acc[j]);
      }
      for (int64_t j = 0; j < hs; ++j) scores[(h0 + j) * s.n + t] = hsum(acc[j]) * s.scale;
    }
  }
  for (int64_t h = 0; h < s.group; ++h) {
    float* row = scores + h * s.n;
    float top = row[0];
    for (int64_t t = 1; t < s.n; ++t) top = std::max(top, row[t]);
    const __m256 shift = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= s.n; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), shift));
      _mm256_storeu_ps(row + t, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; t < s.n; ++t) sum += (row[t] = std::exp(row[t] - top));
    const float inv = 1.f / sum;
    for (t = 0; t < s.n; ++t) row[t] *= inv;
  }
  // out = P V, eight columns and four heads at a time: the sums stay in registers over all positions
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t h0 = 0; h0 < s.group; h0 += 4) {
      const int64_t hs = std::min<int64_t>(4, s.group - h0);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      const float* p = scores + h0 * s.n;
      for (int64_t t = 0; t < s.n; ++t) {
        const __m256 vc = load8(values + t * s.d + c * 8);
        for (int64_t j = 0; j < hs; ++j) acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(p[j * s.n + t]), vc, acc[j]);
      }
      for (int64_t j = 0; j < hs; ++j) _mm256_storeu_ps(out + (h0 + j) * s.d + c * 8, acc[j]);
    }
  }
}

}  // namespace avx2
}  // namespace attention
}  // namespace catdog
#pragma GCC pop_options

namespace catdog {
namespace attention {

template <typename T>
static void run(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::TensorList& caches,
                int64_t layer, const std::vector<int64_t>& lengths, float scale, bool vectorized, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k_new.size(1);
  const int64_t group = heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_new.data_ptr<T>();
  const T* vp = v_new.data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::vector<T*> bases(batch);
  std::vector<int64_t> capacities(batch);
  for (int64_t b = 0; b < batch; ++b) {
    bases[b] = caches[b].data_ptr<T>();
    capacities[b] = caches[b].size(3);
  }
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * d), result(group * d), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads, length = lengths[b], cap = capacities[b];
      T* keys = bases[b] + ((layer * 2 + 0) * kv_heads + g) * cap * d;
      T* values = bases[b] + ((layer * 2 + 1) * kv_heads + g) * cap * d;
      std::memcpy(keys + length * d, kp + (b * kv_heads + g) * d, d * sizeof(T));
      std::memcpy(values + length * d, vp + (b * kv_heads + g) * d, d * sizeof(T));
      const T* qh = qp + (b * heads + g * group) * d;
      for (int64_t i = 0; i < group * d; ++i) query[i] = to_float(qh[i]);
      const Dims dims{group, d, length + 1, scale};
      scores.resize(group * dims.n);
      if (vectorized)
        avx2::attend(query.data(), keys, values, scores.data(), result.data(), dims);
      else
        attend_plain(query.data(), keys, values, scores.data(), result.data(), dims);
      T* o = op + (b * heads + g * group) * d;
      for (int64_t i = 0; i < group * d; ++i) o[i] = static_cast<T>(result[i]);
    }
  });
}

}  // namespace attention

// q [B, heads, D]; k_new, v_new [B, kv_heads, D]; caches: B tensors [layers, 2, kv_heads, capacity, D] of q's dtype,
// written at lengths[b] in `layer`. Returns [B, heads, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            at::TensorList caches, int64_t layer, at::IntArrayRef lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3, "decode_attention: q [B, H, D], k/v [B, Hkv, D]");
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k_new.size(1);
  TORCH_CHECK(k_new.sizes() == v_new.sizes() && k_new.size(0) == batch && k_new.size(2) == d,
              "decode_attention: k and v must be [B, kv_heads, head_dim] like q");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode_attention: heads must be a multiple of kv_heads");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k_new.scalar_type() == q.scalar_type() && v_new.scalar_type() == q.scalar_type(),
              "decode_attention: q, k and v must share a dtype");
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == batch && static_cast<int64_t>(lengths.size()) == batch,
              "decode_attention: one cache and one length per request");
  for (int64_t b = 0; b < batch; ++b) {
    const at::Tensor& c = caches[b];
    TORCH_CHECK(c.dim() == 5 && c.size(1) == 2 && c.size(2) == kv_heads && c.size(4) == d && c.is_contiguous() &&
                    c.scalar_type() == q.scalar_type() && c.device().is_cpu(),
                "decode_attention: cache ", b, " must be a contiguous [layers, 2, kv_heads, capacity, head_dim] of q's dtype");
    TORCH_CHECK(layer >= 0 && layer < c.size(0), "decode_attention: layer ", layer, " out of range");
    TORCH_CHECK(lengths[b] >= 0 && lengths[b] < c.size(3), "decode_attention: cache ", b, " is full (length ",
                lengths[b], ", capacity ", c.size(3), ")");
  }
  auto qc = q.contiguous(), kc = k_new.contiguous(), vc = v_new.contiguous();
  auto out = at::empty_like(qc);
  if (batch == 0) return out;
  std::vector<int64_t> lens(lengths.begin(), lengths.end());
  const bool vectorized = current_isa() >= kAvx2 && d % 8 == 0;
  if (q.scalar_type() == at::kFloat)
    attention::run<float>(qc, kc, vc, caches, layer, lens, static_cast<float>(scale), vectorized, out);
  else
    attention::run<c10::BFloat16>(qc, kc, vc, caches, layer, lens, static_cast<float>(scale), vectorized, out);
  return out;
}

}  // namespace catdog
