// The estimator's float32 CPU passes as loops, compiled at first use by hf_batch_entropy/cpu_kernel.py.
//
// For a chunk of L same-shaped float32 layers x_l of shape (B, U), row-major, it computes what entropy.py's PyTorch
// operators compute, with the same rounding, in one call per chunk instead of a few operations per layer:
//
//   forward:   μ_lu = (Σ_b x_lbu) / B               (torch.mean over the batch: a sum, then a division)
//              S_lu = Σ_b (x_lbu − μ_lu)²           (mse_loss without reduction, then torch.sum over the batch)
//   backward:  ∂/∂x_lbu = (x_lbu − μ_lu) · (2·g_lu)  (mse_loss_backward; doubling is exact)
//
// Same rounding: PyTorch's CPU sum over a dimension that is not the innermost adds each column's values in a fixed
// order (aten/src/ATen/native/cpu/SumKernel.cpp, `multi_row_sum`: blocks of 16 rows summed into the first of four
// accumulators, cascaded into the next level every 16 blocks; `row_sum`: the same over the rows taken four by four,
// for the last columns of a row that do not fill ATen's widest column block). `column_sums` follows that order for
// every column, so the values and gradients are bit-identical to the operators' (the tests compare them bit for bit).
// Which columns take which order depends on ATen's vector width; cpu_kernel.py passes it (`cascade_columns`) and uses
// this file only where it knows that width. No fused multiply-add (-ffp-contract=off): a product and a sum round
// separately, as in ATen's kernels.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kLevels = 4;  // ATen's `num_levels`

// ATen's utils::CeilLog2: ⌈log2 x⌉, and 1 for x ≤ 2.
int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  uint64_t v = static_cast<uint64_t>(x) - 1;
  int64_t bits = 0;
  while (v) { ++bits; v >>= 1; }
  return bits;
}

// out[c] = Σ_{r < rows} value(r, c) for c < width, in the order of ATen's `multi_row_sum` (the sum of one column
// depends only on that column's values). `acc`: scratch of kLevels·width floats.
template <typename Value>
void cascade_sums(int64_t rows, int64_t width, const Value& value, float* out, float* acc) {
  const int64_t power = std::max<int64_t>(4, ceil_log2(rows) / kLevels);
  const int64_t step = int64_t(1) << power;
  const int64_t mask = step - 1;
  std::fill(acc, acc + kLevels * width, 0.f);
  float* first = acc;
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++i) {
      for (int64_t c = 0; c < width; ++c) first[c] += value(i, c);
    }
    for (int64_t level = 1; level < kLevels; ++level) {
      float* lower = acc + (level - 1) * width;
      float* upper = acc + level * width;
      for (int64_t c = 0; c < width; ++c) { upper[c] += lower[c]; lower[c] = 0.f; }
      if ((i & (mask << (level * power))) != 0) break;
    }
  }
  for (; i < rows; ++i) {
    for (int64_t c = 0; c < width; ++c) first[c] += value(i, c);
  }
  for (int64_t level = 1; level < kLevels; ++level) {
    const float* upper = acc + level * width;
    for (int64_t c = 0; c < width; ++c) first[c] += upper[c];
  }
  for (int64_t c = 0; c < width; ++c) out[c] = first[c];
}

// Column sums of a (B, U) matrix given by value(b, u), as ATen's CPU sum over dimension 0 adds them: the first
// `cascade_columns` columns by `multi_row_sum` over the B rows, the others by `row_sum` (four interleaved partial sums
// over the rows in groups of four, the leftover rows into the first, then the four added in order). Written as ATen
// stores them: into an output filled with 0 (so a sum of −0 is stored as +0).
template <typename Value>
void column_sums(int64_t B, int64_t U, int64_t cascade_columns, const Value& value, float* out,
                 std::vector<float>& scratch) {
  scratch.resize(kLevels * std::max<int64_t>(U, 4) + 4);
  float* acc = scratch.data();
  float* partial = acc + kLevels * std::max<int64_t>(U, 4);
  cascade_sums(B, cascade_columns, value, out, acc);
  const int64_t groups = B / 4;
  for (int64_t u = cascade_columns; u < U; ++u) {
    auto interleaved = [&](int64_t g, int64_t k) { return value(4 * g + k, u); };
    cascade_sums(groups, 4, interleaved, partial, acc);
    for (int64_t b = groups * 4; b < B; ++b) partial[0] += value(b, u);
    for (int64_t k = 1; k < 4; ++k) partial[0] += partial[k];
    out[u] = partial[0];
  }
  for (int64_t u = 0; u < U; ++u) { float stored = 0.f; stored += out[u]; out[u] = stored; }
}

void check_layers(const std::vector<at::Tensor>& layers) {
  TORCH_CHECK(!layers.empty(), "squared_deviations: no layers");
  const auto& first = layers[0];
  for (const auto& x : layers) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                    x.sizes() == first.sizes(),
                "squared_deviations: needs contiguous float32 CPU layers of one shape (B, U)");
  }
}

}  // namespace

// (S (L, U), μ (L, 1, U)) of L layers (B, U); μ computed where `mean` is None, else taken as given (L, 1, U).
std::vector<at::Tensor> squared_deviations(const std::vector<at::Tensor>& layers, const c10::optional<at::Tensor>& mean,
                                           int64_t cascade_columns) {
  check_layers(layers);
  const int64_t L = layers.size(), B = layers[0].size(0), U = layers[0].size(1);
  TORCH_CHECK(0 <= cascade_columns && cascade_columns <= U, "squared_deviations: cascade_columns out of range");
  auto squares = at::empty({L, U}, layers[0].options());
  at::Tensor means;
  const bool given = mean.has_value();
  if (given) {
    means = mean->contiguous();
    TORCH_CHECK(means.scalar_type() == at::kFloat && means.numel() == L * U, "squared_deviations: mean must be (L, 1, U)");
  } else {
    means = at::empty({L, 1, U}, layers[0].options());
  }
  std::vector<const float*> x(L);
  for (int64_t l = 0; l < L; ++l) x[l] = layers[l].data_ptr<float>();
  float* sq = squares.data_ptr<float>();
  float* mu = means.data_ptr<float>();
  const float count = static_cast<float>(B);
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t l = begin; l < end; ++l) {
      const float* xl = x[l];
      float* m = mu + l * U;
      if (!given) {
        column_sums(B, U, cascade_columns, [&](int64_t b, int64_t u) { return xl[b * U + u]; }, m, scratch);
        for (int64_t u = 0; u < U; ++u) m[u] = m[u] / count;
      }
      column_sums(
          B, U, cascade_columns,
          [&](int64_t b, int64_t u) {
            const float d = xl[b * U + u] - m[u];
            return d * d;
          },
          sq + l * U, scratch);
    }
  });
  return {squares, means};
}

// Per layer, (x − μ)·(2·g) (B, U), each into a fresh tensor; `grad` g (L, U), `means` μ (L, 1, U).
std::vector<at::Tensor> squared_deviations_backward(const std::vector<at::Tensor>& layers, const at::Tensor& grad,
                                                    const at::Tensor& means) {
  check_layers(layers);
  const int64_t L = layers.size(), B = layers[0].size(0), U = layers[0].size(1);
  auto g_all = grad.contiguous();
  auto mu_all = means.contiguous();
  TORCH_CHECK(g_all.scalar_type() == at::kFloat && g_all.numel() == L * U, "squared_deviations_backward: grad must be (L, U)");
  TORCH_CHECK(mu_all.scalar_type() == at::kFloat && mu_all.numel() == L * U, "squared_deviations_backward: means must be (L, 1, U)");
  std::vector<at::Tensor> out(L);
  std::vector<const float*> x(L);
  std::vector<float*> y(L);
  for (int64_t l = 0; l < L; ++l) {
    out[l] = at::empty_like(layers[l]);
    x[l] = layers[l].data_ptr<float>();
    y[l] = out[l].data_ptr<float>();
  }
  const float* g = g_all.data_ptr<float>();
  const float* mu = mu_all.data_ptr<float>();
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> coef(U);
    for (int64_t l = begin; l < end; ++l) {
      const float* m = mu + l * U;
      for (int64_t u = 0; u < U; ++u) coef[u] = 2.f * g[l * U + u];
      for (int64_t b = 0; b < B; ++b) {
        const float* row = x[l] + b * U;
        float* o = y[l] + b * U;
        for (int64_t u = 0; u < U; ++u) o[u] = (row[u] - m[u]) * coef[u];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("squared_deviations", &squared_deviations, "Σ_b (x − μ)² and μ of same-shaped float32 layers (B, U)");
  m.def("squared_deviations_backward", &squared_deviations_backward, "(x − μ)·(2·g) per layer");
}
