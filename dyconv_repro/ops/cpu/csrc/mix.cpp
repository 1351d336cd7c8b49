// The bank mix W = coeff @ bank of CondConv / DY-Conv: one sample (batch_one.cpp) or a batch (training).
//
// Why native: with K = 4 kernels the mix is a skinny (B, 4) @ (4, n) product, which MKL runs at about half
// the speed of this one-pass blocked loop (2 threads, K = 4: n = 36864 x 32 rows 525 -> 223 us; ResNet-18's
// 512-channel kernels, n = 2.36M x 8 rows, 15.1 -> 7.8 ms). The bank's gradient coeff^T @ g is the same
// product with the B rows of g as sources (ops/cpu/kernels.py `_NativeBankMix.backward`); coeff's gradient stays mm
// (a fused one-pass backward of both measured no faster than MKL's two). The reference is torch.mm.
#include "native.h"

#include <algorithm>
#include <vector>

namespace {

// o[i] (+)= sum_g c[g] * p[g][i] over G sources in one pass (G fixed: the g loop unrolls, the i loop vectorizes).
template <int G, bool Accumulate>
inline __attribute__((always_inline)) void mix_sources(const float* const* p, const float* c, int64_t len, float* o) {
  for (int64_t i = 0; i < len; ++i) {
    float v = c[0] * p[0][i];
    for (int g = 1; g < G; ++g) v += c[g] * p[g][i];
    o[i] = Accumulate ? o[i] + v : v;
  }
}

template <bool Accumulate>
inline __attribute__((always_inline)) void mix_group(const float* const* p, const float* c, int g, int64_t len,
                                                     float* o) {
  switch (g) {
    case 1: mix_sources<1, Accumulate>(p, c, len, o); break;
    case 2: mix_sources<2, Accumulate>(p, c, len, o); break;
    case 3: mix_sources<3, Accumulate>(p, c, len, o); break;
    default: mix_sources<4, Accumulate>(p, c, len, o); break;
  }
}

}  // namespace

DYCONV_HOT float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

// out[lo:hi] = sum_k coeff[k] * bank[k, lo:hi]; bank (K, n) contiguous. Four kernels per pass over an
// L1-sized block of the output: one store per entry for K <= 4 (K = 4 is DY-Conv's default).
DYCONV_HOT void bank_mix_range(const float* bank, const float* coeff, int64_t k, int64_t n, int64_t lo, int64_t hi,
                               float* out) {
  for (int64_t s = lo; s < hi; s += kMixBlock) {
    const int64_t len = std::min(hi, s + kMixBlock) - s;
    for (int64_t j = 0; j < k; j += 4) {
      const int g = static_cast<int>(std::min<int64_t>(4, k - j));
      const float* p[4];
      for (int q = 0; q < g; ++q) p[q] = bank + (j + q) * n + s;
      if (j == 0) mix_group<false>(p, coeff + j, g, len, out + s);
      else mix_group<true>(p, coeff + j, g, len, out + s);
    }
  }
}

// out (B, n) = coeff (B, K) @ bank (K, n): blocks of n split over threads, every row of a block made while the
// block's K sources are in cache.
void bank_mix_batch(const at::Tensor& coeff, const at::Tensor& bank, at::Tensor& out) {
  TORCH_CHECK(coeff.scalar_type() == at::kFloat && bank.scalar_type() == at::kFloat && coeff.is_contiguous() &&
                  bank.is_contiguous() && out.is_contiguous() && coeff.dim() == 2 && bank.dim() == 2 &&
                  coeff.size(1) == bank.size(0) && out.numel() == coeff.size(0) * bank.size(1),
              "bank_mix_batch: contiguous float32 coeff (B, K), bank (K, n) and out (B, n) are required");
  const int64_t b = coeff.size(0), k = coeff.size(1), n = bank.size(1);
  const float* pc = coeff.data_ptr<float>();
  const float* pb = bank.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, n, kMixBlock, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; s += kMixBlock) {
      const int64_t e = std::min(hi, s + kMixBlock);
      for (int64_t r = 0; r < b; ++r) bank_mix_range(pb, pc + r * k, k, n, s, e, po + r * n);
    }
  });
}
