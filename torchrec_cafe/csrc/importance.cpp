// The importance of a step's sketched occurrences (modules/scores.py): per-occurrence gradient
// norms from the pooled output's gradient, and their rescaling, as serial CPU passes. The tensor
// code stays the reference and the path on other devices. The rescaling is bit for bit the tensor
// code's; the norms are too, except that the tensor code may add a bag's float64 squares in another
// order, which can move the float32 result only when the sum lies within ~1e-16 of a float32
// rounding boundary (tested equal on random gradients).

#include <torch/extension.h>

#include <cmath>
#include <vector>

// The float64 sum of x[0..d)'s squares, four lanes of every fourth term added pairwise: four
// independent chains instead of one (the adds' latency bounds a single chain).
inline double sum_of_squares(const float* x, int64_t d) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  int64_t c = 0;
  for (; c + 4 <= d; c += 4) {
    const double x0 = x[c], x1 = x[c + 1], x2 = x[c + 2], x3 = x[c + 3];
    a0 += x0 * x0, a1 += x1 * x1, a2 += x2 * x2, a3 += x3 * x3;
  }
  for (; c < d; ++c) a0 += static_cast<double>(x[c]) * static_cast<double>(x[c]);
  return (a0 + a1) + (a2 + a3);
}

// modules/scores.py: occurrence_norms. ``grad`` [B, C] (any float dtype; read as float32, which
// every narrower one converts to exactly). Bag (f, b) is key-major bag f * B + b; its norm is the
// square root of the float64 sum of its columns' squares, rounded to float32:
// ``dim`` > 0: feature f's columns are [columns[f] * dim, + dim); ``dim`` 0: ``columns`` [C] is
// each column's feature. Returns norm[bag[j]] * factor[j], float32 [n].
at::Tensor cafe_occurrence_norms(const at::Tensor& grad, int64_t dim, const at::Tensor& columns, const at::Tensor& bag,
                                 const at::Tensor& factor, int64_t num_features) {
  TORCH_CHECK(grad.dim() == 2, "grad must be [B, C]");
  TORCH_CHECK(factor.scalar_type() == at::kFloat && bag.numel() == factor.numel(), "factor must be float32, one per bag index");
  const at::Tensor g_t = grad.to(at::kFloat).contiguous(), c_t = columns.to(at::kLong).contiguous();
  const at::Tensor b_t = bag.to(at::kLong).contiguous(), f_t = factor.contiguous();
  const int64_t B = g_t.size(0), C = g_t.size(1), F = num_features, n = b_t.numel();
  const float* g = g_t.data_ptr<float>();
  const int64_t* col = c_t.data_ptr<int64_t>();
  // Every column read lies in grad and every feature index in [0, F): the loops below do not check.
  TORCH_CHECK(c_t.numel() == (dim > 0 ? F : C), "columns must hold one entry per feature (dim > 0) or per column (dim 0)");
  for (int64_t x = 0; x < c_t.numel(); ++x)
    TORCH_CHECK(col[x] >= 0 && (dim > 0 ? (col[x] + 1) * dim <= C : col[x] < F), "columns entry out of range");
  std::vector<double> squares(B * F, 0.0);  // sample-major: sample b's features at [b * F, (b + 1) * F)
  for (int64_t b = 0; b < B; ++b) {
    const float* row = g + b * C;
    double* sq = squares.data() + b * F;
    if (dim > 0) {
      for (int64_t f = 0; f < F; ++f) sq[f] = sum_of_squares(row + col[f] * dim, dim);
    } else {
      for (int64_t c = 0; c < C; ++c) sq[col[c]] += static_cast<double>(row[c]) * static_cast<double>(row[c]);
    }
  }
  std::vector<float> norm(F * B);  // key-major, as ``bag`` indexes it
  for (int64_t f = 0; f < F; ++f)
    for (int64_t b = 0; b < B; ++b) norm[f * B + b] = static_cast<float>(std::sqrt(squares[b * F + f]));
  at::Tensor out = at::empty({n}, at::kFloat);
  const int64_t* bg = b_t.data_ptr<int64_t>();
  const float* fa = f_t.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(bg[j] >= 0 && bg[j] < F * B, "bag index out of range");
    o[j] = norm[bg[j]] * fa[j];
  }
  return out;
}

// The importance rescaling of one process (modules/scores.py: normalised_scores
// without the all-reduce): per feature, norm * count / sum over the finite norms, the sums in
// float64 in occurrence order, the scale rounded to float32; non-finite norms pass unchanged.
at::Tensor cafe_normalised_scores(const at::Tensor& norms, const at::Tensor& feature, int64_t num_features) {
  TORCH_CHECK(norms.scalar_type() == at::kFloat, "norms must be float32");
  const at::Tensor n_t = norms.contiguous(), f_t = feature.to(at::kLong).contiguous();
  const int64_t n = n_t.numel();
  const float* x = n_t.data_ptr<float>();
  const int64_t* f = f_t.data_ptr<int64_t>();
  std::vector<double> total(num_features, 0.0), count(num_features, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    const bool finite = std::isfinite(x[j]);
    total[f[j]] += finite ? static_cast<double>(x[j]) : 0.0;
    count[f[j]] += finite ? 1.0 : 0.0;
  }
  std::vector<float> scale(num_features);
  for (int64_t g = 0; g < num_features; ++g) scale[g] = static_cast<float>(total[g] > 0 ? count[g] / total[g] : 0.0);
  at::Tensor out = at::empty({n}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) o[j] = std::isfinite(x[j]) ? x[j] * scale[f[j]] : x[j];
  return out;
}

TORCH_LIBRARY_FRAGMENT(torchrec_cafe, m) {
  m.def("occurrence_norms(Tensor grad, int dim, Tensor columns, Tensor bag, Tensor factor, int num_features) -> Tensor");
  m.def("normalised_scores(Tensor norms, Tensor feature, int num_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_cafe, CPU, m) {
  m.impl("occurrence_norms", &cafe_occurrence_norms);
  m.impl("normalised_scores", &cafe_normalised_scores);
}
