// Batch-1 inference kernel of a routed dynamic conv in one call: pool -> routing head -> kernel mix.
//
// Why native: at batch 1 each aten call costs 3-30 us on a 2-core CPU (dispatch, allocation and, for the
// ones that go parallel, waking the OpenMP pool), and a dynamic layer needs 5-7 of them before its conv:
// on CIFAR/MobileNet-size layers that overhead was 40-60 % of the conv. Here the same arithmetic runs as
// plain loops on small tensors and goes parallel only where the work pays for the wake-up.
// The Python path (dyconv_repro/ops/cpu/batch_one.py, `kernel_one`) is the reference this is tested against.
#include "native.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Size switches, measured on the 2-core CPU against aten / MKL doing the same step:
constexpr int64_t kPoolParallel = 1 << 16;  // input entries from which pooling is left to aten's parallel sum
constexpr int64_t kMixParallel = 1 << 16;   // mix entries (K * kernel) from which the mix is split over threads
constexpr int64_t kMatvecAten = 1 << 14;    // routing multiply-adds from which MKL's addmv beats the plain loop

DYCONV_HOT float sum(const float* a, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j];
  float s = 0;
  for (; i < n; ++i) s += a[i];
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

// acc[i] += rows[s, i] over s: the channels_last spatial sum.
DYCONV_HOT void sum_rows(const float* rows, int64_t n_rows, int64_t width, float* acc) {
  for (int64_t s = 0; s < n_rows; ++s) {
    const float* row = rows + s * width;
    for (int64_t i = 0; i < width; ++i) acc[i] += row[i];
  }
}

// z[c] = sum over H, W of x[0, c]. Small maps as one loop; from kPoolParallel entries aten's parallel
// reduction is faster (measured: 1.2M entries 76 us vs 108 us), and it takes any memory layout.
std::vector<float> spatial_sum(const at::Tensor& x) {
  const int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  std::vector<float> z(c, 0.f);
  if (c * hw < kPoolParallel && x.is_contiguous()) {
    const float* p = x.data_ptr<float>();
    for (int64_t i = 0; i < c; ++i) z[i] = sum(p + i * hw, hw);
  } else if (c * hw < kPoolParallel && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    sum_rows(x.data_ptr<float>(), hw, c, z.data());
  } else {
    auto zt = at::from_blob(z.data(), {c}, x.options());
    at::sum_out(zt, x, {0, 2, 3});
  }
  return z;
}

// alpha * W z + beta * b for W (O, I).
std::vector<float> affine(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const std::vector<float>& z,
                          double alpha, double beta) {
  const at::Tensor w = weight.contiguous();
  const int64_t o = w.size(0), i = w.size(1);
  TORCH_CHECK(i == static_cast<int64_t>(z.size()), "routing layer expects ", i, " inputs, got ", z.size());
  std::vector<float> y(o);
  const bool has_bias = bias.has_value() && bias->defined();
  if (o * i >= kMatvecAten) {
    auto zt = at::from_blob(const_cast<float*>(z.data()), {i}, w.options());
    auto yt = at::from_blob(y.data(), {o}, w.options());
    if (has_bias) at::addmv_out(yt, *bias, w, zt, beta, alpha); else at::mv_out(yt, w, zt).mul_(alpha);
    return y;
  }
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();  // held: data_ptr of a temporary would dangle
  const float* pw = w.data_ptr<float>();
  const float* pb = has_bias ? b.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < o; ++r) {
    y[r] = static_cast<float>(alpha) * dot(pw + r * i, z.data(), i) + (pb ? static_cast<float>(beta) * pb[r] : 0.f);
  }
  return y;
}

void activate(std::vector<float>& v, int64_t kind) {  // 0 none, 1 relu, 2 sigmoid, 3 softmax
  if (kind == 1) {
    for (auto& e : v) e = e > 0.f ? e : 0.f;
  } else if (kind == 2) {
    for (auto& e : v) e = 1.f / (1.f + std::exp(-e));
  } else if (kind == 3) {
    const float m = *std::max_element(v.begin(), v.end());
    float s = 0.f;
    for (auto& e : v) s += (e = std::exp(e - m));
    for (auto& e : v) e /= s;
  } else {
    TORCH_CHECK(kind == 0, "unknown activation code ", kind);
  }
}

void bank_mix(const float* bank, const std::vector<float>& coeff, int64_t n, float* out) {
  const int64_t k = static_cast<int64_t>(coeff.size());
  auto body = [&](int64_t lo, int64_t hi) { bank_mix_range(bank, coeff.data(), k, n, lo, hi, out); };
  if (n * k >= kMixParallel) {
    const int64_t per = (n + at::get_num_threads() - 1) / at::get_num_threads();
    at::parallel_for(0, n, std::max<int64_t>(per, kMixBlock), body);
  } else {
    body(0, n);
  }
}

// out[r, e] = coeff[r] * rows[r, e] for rows lo..hi; rows (R, E) contiguous.
DYCONV_HOT void row_mix_range(const float* rows, const float* coeff, int64_t entries, int64_t lo, int64_t hi,
                              float* out) {
  for (int64_t i = lo; i < hi; ++i) {
    const float c = coeff[i];
    const float* src = rows + i * entries;
    float* o = out + i * entries;
    for (int64_t e = 0; e < entries; ++e) o[e] = c * src[e];
  }
}

void row_mix(const float* rows, const std::vector<float>& coeff, int64_t entries, float* out) {
  const int64_t r = static_cast<int64_t>(coeff.size());
  auto body = [&](int64_t lo, int64_t hi) { row_mix_range(rows, coeff.data(), entries, lo, hi, out); };
  if (r * entries >= kMixParallel) at::parallel_for(0, r, 1, body); else body(0, r);
}

}  // namespace

// The kernel of one sample, written into `out` (the layer's scratch), and the mixed bias (or None).
//   source: x (1, C, H, W) when `pool`, else the routing input as a vector (block routing).
//   layers: routing layers (weight, bias?, alpha, beta): z <- alpha * W z + beta * b, `inner` between
//           layers and `final` after the last (codes: 0 none, 1 relu, 2 sigmoid, 3 softmax).
//   mode 0: bank (K, n) mixed by the K coefficients; mode 1: rows (R, E) each scaled by its coefficient.
c10::optional<at::Tensor> kernel_one(const at::Tensor& source, bool pool, const std::vector<at::Tensor>& weights,
                                     const std::vector<c10::optional<at::Tensor>>& biases,
                                     const std::vector<double>& alphas, const std::vector<double>& betas,
                                     int64_t inner, int64_t final, const at::Tensor& param, int64_t mode,
                                     at::Tensor& out, const c10::optional<at::Tensor>& bias_bank) {
  TORCH_CHECK(source.scalar_type() == at::kFloat && param.scalar_type() == at::kFloat && out.is_contiguous(),
              "kernel_one: float32 tensors and a contiguous output are required");
  std::vector<float> z;
  if (pool) {
    TORCH_CHECK(source.dim() == 4 && source.size(0) == 1, "kernel_one: pooling needs a (1, C, H, W) input");
    z = spatial_sum(source);
  } else {
    const at::Tensor v = source.reshape({-1}).contiguous();
    z.assign(v.data_ptr<float>(), v.data_ptr<float>() + v.numel());
  }
  const size_t depth = weights.size();
  for (size_t l = 0; l < depth; ++l) {
    z = affine(weights[l], biases[l], z, alphas[l], betas[l]);
    activate(z, l + 1 < depth ? inner : final);
  }
  const at::Tensor p = param.contiguous();
  const int64_t rows = static_cast<int64_t>(z.size());
  TORCH_CHECK(p.numel() % rows == 0 && out.numel() == (mode == 0 ? p.numel() / rows : p.numel()),
              "kernel_one: ", rows, " coefficients do not fit a parameter of ", p.numel(), " entries");
  if (mode == 0) bank_mix(p.data_ptr<float>(), z, p.numel() / rows, out.data_ptr<float>());
  else row_mix(p.data_ptr<float>(), z, p.numel() / rows, out.data_ptr<float>());
  if (!bias_bank.has_value() || !bias_bank->defined()) return c10::nullopt;
  auto coeff = at::from_blob(z.data(), {rows}, p.options());
  return at::mv(bias_bank->t(), coeff);
}

BatchOnePlan::BatchOnePlan(bool pool, std::vector<at::Tensor> weights, std::vector<c10::optional<at::Tensor>> biases,
                           std::vector<double> alphas, std::vector<double> betas, int64_t inner, int64_t final,
                           at::Tensor param, int64_t mode, at::Tensor out, c10::optional<at::Tensor> bias_bank)
    : pool(pool), weights(std::move(weights)), biases(std::move(biases)), alphas(std::move(alphas)),
      betas(std::move(betas)), inner(inner), final(final), param(std::move(param)), mode(mode), out(std::move(out)),
      bias_bank(std::move(bias_bank)) {
  TORCH_CHECK(this->weights.size() == this->biases.size() && this->weights.size() == this->alphas.size() &&
                  this->weights.size() == this->betas.size(),
              "BatchOnePlan: one bias, alpha and beta per routing layer");
}

c10::optional<at::Tensor> BatchOnePlan::run(const at::Tensor& source) {
  return kernel_one(source, pool, weights, biases, alphas, betas, inner, final, param, mode, out, bias_bank);
}
