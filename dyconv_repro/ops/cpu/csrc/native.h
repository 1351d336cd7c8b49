// Declarations shared by the native kernels (batch_one.cpp, depthwise.cpp, mix.cpp, sum_pool.cpp) and their
// module (module.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

// The hot loops are compiled for AVX2/FMA and for baseline x86-64, chosen at load time (GCC's ifunc), so one
// binary runs everywhere and uses the vector units where they exist (2.5x on the batch-1 mix, measured).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DYCONV_HOT __attribute__((target_clones("arch=haswell", "default")))
#else
#define DYCONV_HOT
#endif

// mix.cpp
constexpr int64_t kMixBlock = 2048;  // mix block: the output stays in L1 while the K sources stream in
float dot(const float* a, const float* b, int64_t n);
void bank_mix_range(const float* bank, const float* coeff, int64_t k, int64_t n, int64_t lo, int64_t hi, float* out);
void bank_mix_batch(const at::Tensor& coeff, const at::Tensor& bank, at::Tensor& out);

// batch_one.cpp
c10::optional<at::Tensor> kernel_one(const at::Tensor& source, bool pool, const std::vector<at::Tensor>& weights,
                                     const std::vector<c10::optional<at::Tensor>>& biases,
                                     const std::vector<double>& alphas, const std::vector<double>& betas,
                                     int64_t inner, int64_t final, const at::Tensor& param, int64_t mode,
                                     at::Tensor& out, const c10::optional<at::Tensor>& bias_bank);

// kernel_one's arguments converted once: a layer's batch-1 call then passes only its input (converting the 12
// arguments, three lists among them, cost about as much as the arithmetic of a CIFAR-size layer).
struct BatchOnePlan {
  BatchOnePlan(bool pool, std::vector<at::Tensor> weights, std::vector<c10::optional<at::Tensor>> biases,
               std::vector<double> alphas, std::vector<double> betas, int64_t inner, int64_t final,
               at::Tensor param, int64_t mode, at::Tensor out, c10::optional<at::Tensor> bias_bank);
  c10::optional<at::Tensor> run(const at::Tensor& source);

  bool pool;
  std::vector<at::Tensor> weights;
  std::vector<c10::optional<at::Tensor>> biases;
  std::vector<double> alphas, betas;
  int64_t inner, final;
  at::Tensor param;
  int64_t mode;
  at::Tensor out;
  c10::optional<at::Tensor> bias_bank;
};

// depthwise.cpp
at::Tensor depthwise_forward(const at::Tensor& x, const at::Tensor& kernels, const c10::optional<at::Tensor>& bias,
                             int64_t kh, int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation);
at::Tensor depthwise_input_grad(const at::Tensor& gy, const at::Tensor& kernels, int64_t h, int64_t w, int64_t kh,
                                int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
at::Tensor depthwise_kernel_grad(const at::Tensor& gy, const at::Tensor& x, int64_t kh, int64_t kw,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// sum_pool.cpp
at::Tensor sum_pool_forward(const at::Tensor& x, int64_t groups, int64_t wc, int64_t wh, int64_t ww,
                            at::IntArrayRef padding, at::IntArrayRef dilation);
