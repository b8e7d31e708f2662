// The lean decoder's small ops, fused, included by kernels.cpp: RMSNorm (with the residual add before it), rotary
// embeddings (in place on queries and keys) and SiLU(gate) * up. Each replaces 3-12 aten ops per call; at one token a
// step that is where a small model's decode time went (SmolLM2: 30 layers x ~35 ops of ~10 us each, against ~4 ms
// of weight reading). Each rounds where the transformers module it stands for rounds (bf16 after every product),
// so results match those modules to the last bit or within one rounding.

namespace catdog {
namespace fused {

template <typename T>
static inline float rnd(float v) {  // what storing v as T and reading it back gives
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return static_cast<float>(static_cast<T>(v));
}

// rows x width: y = weight * T(x * rsqrt(mean(x^2) + eps)), and sum = x + residual first when there is one
template <typename T>
static void rms_norm_rows(const T* x, const T* residual, const T* weight, T* sum, T* y, int64_t rows, int64_t width,
                          float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(width);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * width;
      // the mean square in double: torch's fp32 sum rounds in an order of its own (it differs between its AVX2 and
      // AVX-512 builds), so no fp32 order would match it everywhere; double is at least the exact value's nearest
      double squares = 0;
      for (int64_t i = 0; i < width; ++i) {
        float v = static_cast<float>(xr[i]);
        if (residual != nullptr) {
          v = rnd<T>(v + static_cast<float>(residual[r * width + i]));
          sum[r * width + i] = static_cast<T>(v);
        }
        row[i] = v;
        squares += static_cast<double>(v) * v;
      }
      const float mean = static_cast<float>(squares / static_cast<double>(width));
      const float inv = 1.f / std::sqrt(mean + eps);
      T* yr = y + r * width;
      for (int64_t i = 0; i < width; ++i)
        yr[i] = static_cast<T>(static_cast<float>(weight[i]) * rnd<T>(row[i] * inv));
    }
  });
}

// x [tokens, heads, head_dim] in place. cos/sin [tokens, width]. Halves (Llama): pairs (i, i + width/2), angle
// columns i and i + width/2. Interleaved (GLM): pairs (2i, 2i+1), angle column i, width/2 pairs; dimensions past
// the rotated ones pass unchanged.
template <typename T>
static void rope_rows(T* x, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t head_dim, int64_t width,
                      bool interleaved) {
  const int64_t half = width / 2;
  at::parallel_for(0, tokens * heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / heads;
      T* v = x + task * head_dim;
      const T* c = cos + t * width;
      const T* s = sin + t * width;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        const int64_t ca = interleaved ? i : a, cb = interleaved ? i : b;
        const float xa = static_cast<float>(v[a]), xb = static_cast<float>(v[b]);
        // x * cos + rotate_half(x) * sin, each product rounded as torch rounds it
        const float ya = rnd<T>(rnd<T>(xa * static_cast<float>(c[ca])) + rnd<T>(-xb * static_cast<float>(s[ca])));
        const float yb = rnd<T>(rnd<T>(xb * static_cast<float>(c[cb])) + rnd<T>(xa * static_cast<float>(s[cb])));
        v[a] = static_cast<T>(ya);
        v[b] = static_cast<T>(yb);
      }
    }
  });
}

// silu of a row of gates into floats: plain, and AVX2 with the vectorized exp (ChatGLM3's 13,696 gates per token and
// layer made a scalar exp cost ~2 ms a step)
template <typename T>
static void silu_row_plain(const T* g, float* out, int64_t width) {
  for (int64_t i = 0; i < width; ++i) {
    const float v = static_cast<float>(g[i]);
    out[i] = v / (1.f + std::exp(-v));
  }
}

}  // namespace fused
}  // namespace catdog

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace catdog {
namespace fused {
template <typename T>
static void silu_row_avx2(const T* g, float* out, int64_t width) {
  int64_t i = 0;
  for (; i + 8 <= width; i += 8) {
    const __m256 v = attention::avx2::load8(g + i);
    const __m256 e = attention::avx2::exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
    _mm256_storeu_ps(out + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
  }
  for (; i < width; ++i) {
    const float v = static_cast<float>(g[i]);
    out[i] = v / (1.f + std::exp(-v));
  }
}
}  // namespace fused
}  // namespace catdog
#pragma GCC pop_options

namespace catdog {
namespace fused {

// [rows, 2 * width] = [gate | up] -> [rows, width]: T(silu(gate)) * up
template <typename T>
static void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t width) {
  const bool vectorized = current_isa() >= kAvx2;
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> act(width);
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * width;
      const T* u = g + width;
      T* o = out + r * width;
      if (vectorized)
        silu_row_avx2(g, act.data(), width);
      else
        silu_row_plain(g, act.data(), width);
      for (int64_t i = 0; i < width; ++i) o[i] = static_cast<T>(rnd<T>(act[i]) * static_cast<float>(u[i]));
    }
  });
}

template <typename F>
static void on_dtype(const at::Tensor& t, const char* op, F f) {
  if (t.scalar_type() == at::kFloat)
    f(float{});
  else if (t.scalar_type() == at::kBFloat16)
    f(c10::BFloat16{});
  else
    TORCH_CHECK(false, op, ": float32 or bfloat16, got ", t.scalar_type());
}

}  // namespace fused

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0) && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [width] of x's dtype");
  auto xc = x.contiguous(), wc = weight.contiguous();
  auto y = at::empty_like(xc);
  const int64_t width = x.size(-1), rows = width ? xc.numel() / width : 0;
  fused::on_dtype(x, "rms_norm", [&](auto zero) {
    using T = decltype(zero);
    fused::rms_norm_rows<T>(xc.data_ptr<T>(), nullptr, wc.data_ptr<T>(), nullptr, y.data_ptr<T>(), rows, width,
                            static_cast<float>(eps));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0) && weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: weight must be [width] of x's dtype");
  auto xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  auto sum = at::empty_like(xc), y = at::empty_like(xc);
  const int64_t width = x.size(-1), rows = width ? xc.numel() / width : 0;
  fused::on_dtype(x, "add_rms_norm", [&](auto zero) {
    using T = decltype(zero);
    fused::rms_norm_rows<T>(xc.data_ptr<T>(), rc.data_ptr<T>(), wc.data_ptr<T>(), sum.data_ptr<T>(), y.data_ptr<T>(),
                            rows, width, static_cast<float>(eps));
  });
  return {sum, y};
}

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  for (at::Tensor* x : {&q, &k}) {
    TORCH_CHECK(x->dim() == 3 && x->is_contiguous(), "rope_: q and k must be contiguous [tokens, heads, head_dim]");
    TORCH_CHECK(x->size(0) == cos.size(0) && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
                    cos.size(1) <= x->size(2) && cos.size(1) % 2 == 0,
                "rope_: cos and sin must be [tokens, even width <= head_dim]");
    TORCH_CHECK(cos.scalar_type() == x->scalar_type() && sin.scalar_type() == x->scalar_type(),
                "rope_: cos and sin must have q's dtype");
  }
  auto cc = cos.contiguous(), sc = sin.contiguous();
  for (at::Tensor* x : {&q, &k}) {
    fused::on_dtype(*x, "rope_", [&](auto zero) {
      using T = decltype(zero);
      fused::rope_rows<T>(x->data_ptr<T>(), cc.data_ptr<T>(), sc.data_ptr<T>(), x->size(0), x->size(1), x->size(2),
                          cc.size(1), interleaved);
    });
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "silu_mul: the last dimension must be [gate | up]");
  auto gc = gate_up.contiguous();
  const int64_t width = gate_up.size(-1) / 2, rows = width ? gc.numel() / (2 * width) : 0;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto out = at::empty(sizes, gate_up.options());
  fused::on_dtype(gate_up, "silu_mul", [&](auto zero) {
    using T = decltype(zero);
    fused::silu_mul_rows<T>(gc.data_ptr<T>(), out.data_ptr<T>(), rows, width);
  });
  return out;
}

}  // namespace catdog
