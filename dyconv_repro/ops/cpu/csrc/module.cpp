// The Python module of the native kernels (loaded by dyconv_repro/ops/cpu/native.py).
#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<BatchOnePlan>(m, "BatchOnePlan", "the batch-1 routed kernel's arguments, converted once (native.h)")
      .def(py::init<bool, std::vector<at::Tensor>, std::vector<c10::optional<at::Tensor>>, std::vector<double>,
                    std::vector<double>, int64_t, int64_t, at::Tensor, int64_t, at::Tensor,
                    c10::optional<at::Tensor>>());
  m.def("kernel_one_planned", [](BatchOnePlan& plan, const at::Tensor& source) { return plan.run(source); },
        "batch-1 routed kernel (pool, routing head, mix; see batch_one.cpp) with a plan's arguments");
  m.def("bank_mix_batch", &bank_mix_batch, "out = coeff @ bank for a training batch (see mix.cpp)");
  m.def("depthwise_forward", &depthwise_forward, "per-sample depthwise conv, channels_last (see depthwise.cpp)");
  m.def("depthwise_input_grad", &depthwise_input_grad, "its input gradient");
  m.def("depthwise_kernel_grad", &depthwise_kernel_grad, "its per-sample kernel gradient");
  m.def("sum_pool_forward", &sum_pool_forward, "the structured sum-pool in one pass, NCHW or NHWC (see sum_pool.cpp)");
}
