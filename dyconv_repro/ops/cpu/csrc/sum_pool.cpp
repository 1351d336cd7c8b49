// The sum-pool of a decomposed Structured Convolution (structured.py `SumPool`) in one call, NCHW or NHWC.
//
// Why native: at batch 1 on CIFAR-size maps the aten sum-pool is ~11 tiny calls (cumsum, narrows, a pad,
// shifted adds) whose dispatch costs ~100 us for ~8k elements (ResNet-20 32->32 @16^2: 110 us, more than
// the 64 us of the small conv it feeds and most of the 162 us of the dense conv it replaces). One pass over
// the input does the same sums in a few microseconds.
// Reference: structured.py `SumPool.forward` with native suspended (and a direct box sum in the tests).
//
// out[b, g*c + j, oh, ow] = sum over channels i = j .. j + wc - 1 of group g, rows a < wh, columns t < ww of
// the zero-padded input at (oh + a*dh - ph, ow + t*dw - pw); c = C - wc + 1 channels per group.
#include "native.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

struct PoolGeometry {
  int64_t groups, cpg, c, h, w, wc, wh, ww, ph, pw, dh, dw, ho, wo;
};

// o[i] += a[i]
DYCONV_HOT void add_row(const float* a, int64_t n, float* o) {
  for (int64_t i = 0; i < n; ++i) o[i] += a[i];
}

// o[i] += a[i] - s[i]
DYCONV_HOT void add_sub_row(const float* a, const float* s, int64_t n, float* o) {
  for (int64_t i = 0; i < n; ++i) o[i] += a[i] - s[i];
}

// One output plane from its channel-box plane p (h x w): horizontal box sums into rows (h x wo), then vertical.
void spatial_box(const PoolGeometry& g, const float* p, float* rows, float* out) {
  std::memset(rows, 0, g.h * g.wo * sizeof(float));
  for (int64_t t = 0; t < g.ww; ++t) {
    const int64_t shift = t * g.dw - g.pw;  // out column ow reads input column ow + shift
    const int64_t lo = std::max<int64_t>(0, -shift), hi = std::min(g.wo, g.w - shift);
    if (lo >= hi) continue;
    for (int64_t r = 0; r < g.h; ++r) add_row(p + r * g.w + lo + shift, hi - lo, rows + r * g.wo + lo);
  }
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    float* o = out + oh * g.wo;
    std::memset(o, 0, g.wo * sizeof(float));
    for (int64_t a = 0; a < g.wh; ++a) {
      const int64_t r = oh + a * g.dh - g.ph;
      if (r >= 0 && r < g.h) add_row(rows + r * g.wo, g.wo, o);
    }
  }
}

// channels_last: the channel box of every input pixel of sample b (one contiguous row of groups * cpg values each)
// into box (h * w rows of groups * c), as a running window along the row.
DYCONV_HOT void channel_box_nhwc(const PoolGeometry& g, const float* x, float* box) {
  const int64_t in_row = g.groups * g.cpg, out_row = g.groups * g.c;
  for (int64_t p = 0; p < g.h * g.w; ++p) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const float* src = x + p * in_row + grp * g.cpg;
      float* dst = box + p * out_row + grp * g.c;
      float acc = 0.f;
      for (int64_t i = 0; i < g.wc; ++i) acc += src[i];
      dst[0] = acc;
      for (int64_t j = 1; j < g.c; ++j) dst[j] = dst[j - 1] + (src[j + g.wc - 1] - src[j - 1]);
    }
  }
}

// channels_last: output row oh of sample b from its channel-box rows (each output pixel sums wh x ww pixel vectors).
DYCONV_HOT void spatial_box_nhwc(const PoolGeometry& g, const float* box, int64_t oh, float* out) {
  const int64_t n = g.groups * g.c;
  for (int64_t ow = 0; ow < g.wo; ++ow) {
    float* o = out + (oh * g.wo + ow) * n;
    std::memset(o, 0, n * sizeof(float));
    for (int64_t a = 0; a < g.wh; ++a) {
      const int64_t r = oh + a * g.dh - g.ph;
      if (r < 0 || r >= g.h) continue;
      for (int64_t t = 0; t < g.ww; ++t) {
        const int64_t col = ow + t * g.dw - g.pw;
        if (col >= 0 && col < g.w) add_row(box + (r * g.w + col) * n, n, o);
      }
    }
  }
}

// NCHW: output planes in parallel, each from its channel-box plane (slid from the previous plane where it can).
at::Tensor sum_pool_nchw(const at::Tensor& x, const PoolGeometry& g) {
  const int64_t batch = x.size(0), plane = g.h * g.w, planes = batch * g.groups * g.c;
  auto out = at::empty({batch, g.groups * g.c, g.ho, g.wo}, x.options());
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  // Tasks are runs of consecutive output planes; each restarts the running channel window at its first plane.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane * (g.wh * g.ww + 2)));
  at::parallel_for(0, planes, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> box(plane), rows(g.h * g.wo);
    int64_t prev = -1;  // the plane index whose channel box `box` holds
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t j = k % g.c;
      const float* src = px + (k / g.c) * g.cpg * plane;  // first channel of this sample's group
      if (prev == k - 1 && j > 0) {  // slide: add channel j + wc - 1, drop channel j - 1
        add_sub_row(src + (j + g.wc - 1) * plane, src + (j - 1) * plane, plane, box.data());
      } else {
        std::memcpy(box.data(), src + j * plane, plane * sizeof(float));
        for (int64_t i = 1; i < g.wc; ++i) add_row(src + (j + i) * plane, plane, box.data());
      }
      prev = k;
      spatial_box(g, box.data(), rows.data(), po + k * g.ho * g.wo);
    }
  });
  return out;
}

// channels_last: samples in parallel, each as its per-pixel channel boxes, then the spatial box per output row.
at::Tensor sum_pool_nhwc(const at::Tensor& x, const PoolGeometry& g) {
  const int64_t batch = x.size(0), n = g.groups * g.c;
  auto out = at::empty({batch, n, g.ho, g.wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t in_sample = g.h * g.w * g.groups * g.cpg, out_sample = g.ho * g.wo * n;
  const bool spatial = g.wh * g.ww > 1 || g.ph || g.pw;
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> box(spatial ? g.h * g.w * n : 0);
    for (int64_t b = lo; b < hi; ++b) {
      if (!spatial) {  // channel box only: straight into the output
        channel_box_nhwc(g, px + b * in_sample, po + b * out_sample);
        continue;
      }
      channel_box_nhwc(g, px + b * in_sample, box.data());
      for (int64_t oh = 0; oh < g.ho; ++oh) spatial_box_nhwc(g, box.data(), oh, po + b * out_sample);
    }
  });
  return out;
}

}  // namespace

at::Tensor sum_pool_forward(const at::Tensor& x, int64_t groups, int64_t wc, int64_t wh, int64_t ww,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() == 4 &&
                  (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "sum_pool: x must be a float32 CPU (B, C, H, W) tensor, NCHW- or channels_last-contiguous");
  TORCH_CHECK(padding.size() == 2 && dilation.size() == 2, "sum_pool: padding and dilation need 2 entries each");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "sum_pool: channels must split into the groups");
  const int64_t cpg = x.size(1) / groups;
  TORCH_CHECK(wc >= 1 && wc <= cpg && wh >= 1 && ww >= 1, "sum_pool: bad window");
  PoolGeometry g{groups, cpg, cpg - wc + 1, x.size(2), x.size(3), wc, wh, ww,
                 padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  g.ho = g.h + 2 * g.ph - g.dh * (wh - 1);
  g.wo = g.w + 2 * g.pw - g.dw * (ww - 1);
  TORCH_CHECK(g.ho >= 1 && g.wo >= 1, "sum_pool: the window is larger than the padded map");
  return x.is_contiguous() ? sum_pool_nchw(x, g) : sum_pool_nhwc(x, g);
}
