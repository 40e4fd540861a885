// 2-D convolutions on the CPU through oneDNN, as XLA FFI custom calls.
//
// Activations are NHWC and kernels HWIO, as the model stores them; oneDNN picks
// its own kernel layout (the kernel is reordered into it on each call, a small
// copy) and runs the convolution on the CPU's vector and matrix units (AVX-512,
// AMX for bfloat16). bfloat16 operands are summed in float32 and rounded once.
// Three targets: the forward convolution, its input gradient and its kernel
// gradient. Primitives are built once per shape and cached; they are executed
// with a per-call scratchpad, so concurrent calls from XLA's threads are safe.

#include <omp.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = memory::format_tag;

enum Kind { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

bool ToDnnl(ffi::DataType t, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32: *out = memory::data_type::f32; return true;
    case ffi::DataType::BF16: *out = memory::data_type::bf16; return true;
    default: return false;
  }
}

// The convolution y = conv(x, k) that a call computes, or is the gradient of.
struct Geometry {
  memory::dims x, k, y;  // logical N,C,H,W / O,I,H,W / N,C,H,W
  memory::dims strides, pad_lo, pad_hi;
  memory::data_type dtype;
  int threads;  // OpenMP threads of the call (oneDNN sizes its work split to them)
};

std::string Key(Kind kind, const Geometry& g) {
  std::string s = std::to_string(kind) + ':' + std::to_string(static_cast<int>(g.dtype)) + ':' +
                  std::to_string(g.threads);
  for (const memory::dims* d : {&g.x, &g.k, &g.y, &g.strides, &g.pad_lo, &g.pad_hi}) {
    s += '|';
    for (memory::dim v : *d) s += std::to_string(v) + ',';
  }
  return s;
}

struct Plan {
  dnnl::primitive primitive;
  memory::desc x_md, k_md, y_md, scratch_md;
  memory::desc k_hwio_md;
  bool reorder_k = false;
  dnnl::primitive reorder;  // HWIO -> k_md (forward, input grad) or k_md -> HWIO (kernel grad)
};

std::shared_ptr<Plan> MakePlan(Kind kind, const Geometry& g) {
  dnnl::engine& engine = Engine();
  memory::desc x_md(g.x, g.dtype, tag::nhwc), y_md(g.y, g.dtype, tag::nhwc);
  memory::desc k_any(g.k, g.dtype, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto plan = std::make_shared<Plan>();
  plan->k_hwio_md = memory::desc(g.k, g.dtype, tag::hwio);
  const auto algo = dnnl::algorithm::convolution_direct;
  if (kind == kForward) {
    dnnl::convolution_forward::primitive_desc pd(
        engine, dnnl::prop_kind::forward_inference, algo, x_md, k_any, y_md, g.strides,
        g.pad_lo, g.pad_hi, attr);
    plan->primitive = dnnl::convolution_forward(pd);
    plan->x_md = pd.src_desc();
    plan->k_md = pd.weights_desc();
    plan->y_md = pd.dst_desc();
    plan->scratch_md = pd.scratchpad_desc();
  } else {
    dnnl::convolution_forward::primitive_desc hint(
        engine, dnnl::prop_kind::forward_training, algo, x_md, k_any, y_md, g.strides,
        g.pad_lo, g.pad_hi, attr);
    if (kind == kInputGrad) {
      dnnl::convolution_backward_data::primitive_desc pd(
          engine, algo, x_md, k_any, y_md, g.strides, g.pad_lo, g.pad_hi, hint, attr);
      plan->primitive = dnnl::convolution_backward_data(pd);
      plan->x_md = pd.diff_src_desc();
      plan->k_md = pd.weights_desc();
      plan->y_md = pd.diff_dst_desc();
      plan->scratch_md = pd.scratchpad_desc();
    } else {
      dnnl::convolution_backward_weights::primitive_desc pd(
          engine, algo, x_md, k_any, y_md, g.strides, g.pad_lo, g.pad_hi, hint, attr);
      plan->primitive = dnnl::convolution_backward_weights(pd);
      plan->x_md = pd.src_desc();
      plan->k_md = pd.diff_weights_desc();
      plan->y_md = pd.diff_dst_desc();
      plan->scratch_md = pd.scratchpad_desc();
    }
  }
  if (plan->k_md != plan->k_hwio_md) {
    plan->reorder_k = true;
    plan->reorder = kind == kKernelGrad
        ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->k_md, engine, plan->k_hwio_md))
        : dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->k_hwio_md, engine, plan->k_md));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(Kind kind, const Geometry& g) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Plan>>();
  const std::string key = Key(kind, g);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  std::shared_ptr<Plan> plan = MakePlan(kind, g);  // outside the lock: it can take a while
  std::lock_guard<std::mutex> lock(mu);
  return cache->emplace(key, plan).first->second;
}

memory::dims FromNhwc(ffi::Span<const int64_t> d) { return {d[0], d[3], d[1], d[2]}; }
memory::dims FromHwio(ffi::Span<const int64_t> d) { return {d[3], d[2], d[0], d[1]}; }

// x: NHWC input (the result for kInputGrad), k: HWIO kernel (the result for
// kKernelGrad), y: NHWC output (dy for the gradients).
ffi::Error Run(Kind kind, ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::AnyBuffer y,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
               int64_t threads) {
  if (x.dimensions().size() != 4 || k.dimensions().size() != 4 || y.dimensions().size() != 4 ||
      strides.size() != 2 || padding.size() != 4) {
    return ffi::Error::InvalidArgument(
        "detectax oneDNN conv: expected NHWC, HWIO and NHWC arrays, 2 strides and 4 paddings");
  }
  Geometry g;
  if (x.element_type() != k.element_type() || x.element_type() != y.element_type() ||
      !ToDnnl(x.element_type(), &g.dtype)) {
    return ffi::Error::InvalidArgument(
        "detectax oneDNN conv: operands must all be float32 or all bfloat16");
  }
  g.x = FromNhwc(x.dimensions());
  g.k = FromHwio(k.dimensions());
  g.y = FromNhwc(y.dimensions());
  g.strides = {strides[0], strides[1]};
  g.pad_lo = {padding[0], padding[2]};
  g.pad_hi = {padding[1], padding[3]};
  g.threads = threads < 1 ? 1 : static_cast<int>(threads);
  // The calling thread is one of XLA's: this sets the size of its OpenMP team,
  // for building the primitive (oneDNN splits the work for it) and running it.
  omp_set_num_threads(g.threads);
  try {
    std::shared_ptr<Plan> plan = GetPlan(kind, g);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    memory x_m(plan->x_md, engine, x.untyped_data());
    memory y_m(plan->y_md, engine, y.untyped_data());
    memory k_hwio(plan->k_hwio_md, engine, k.untyped_data());
    memory k_m = plan->reorder_k ? memory(plan->k_md, engine) : k_hwio;
    memory scratch(plan->scratch_md, engine);
    if (plan->reorder_k && kind != kKernelGrad) {
      plan->reorder.execute(stream, {{DNNL_ARG_FROM, k_hwio}, {DNNL_ARG_TO, k_m}});
    }
    std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, scratch}};
    if (kind == kForward) {
      args.insert({{DNNL_ARG_SRC, x_m}, {DNNL_ARG_WEIGHTS, k_m}, {DNNL_ARG_DST, y_m}});
    } else if (kind == kInputGrad) {
      args.insert({{DNNL_ARG_DIFF_SRC, x_m}, {DNNL_ARG_WEIGHTS, k_m}, {DNNL_ARG_DIFF_DST, y_m}});
    } else {
      args.insert({{DNNL_ARG_SRC, x_m}, {DNNL_ARG_DIFF_WEIGHTS, k_m}, {DNNL_ARG_DIFF_DST, y_m}});
    }
    plan->primitive.execute(stream, args);
    if (plan->reorder_k && kind == kKernelGrad) {
      plan->reorder.execute(stream, {{DNNL_ARG_FROM, k_m}, {DNNL_ARG_TO, k_hwio}});
    }
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("detectax oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                   int64_t threads) {
  return Run(kForward, x, k, *y, strides, padding, threads);
}

ffi::Error InputGrad(ffi::AnyBuffer dy, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx,
                     ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                     int64_t threads) {
  return Run(kInputGrad, *dx, k, dy, strides, padding, threads);
}

ffi::Error KernelGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dk,
                      ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                      int64_t threads) {
  return Run(kKernelGrad, x, *dk, dy, strides, padding, threads);
}

}  // namespace

#define DETECTAX_CONV_BINDING                          \
  ffi::Ffi::Bind()                                     \
      .Arg<ffi::AnyBuffer>()                           \
      .Arg<ffi::AnyBuffer>()                           \
      .Ret<ffi::AnyBuffer>()                           \
      .Attr<ffi::Span<const int64_t>>("strides")       \
      .Attr<ffi::Span<const int64_t>>("padding")       \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DetectaxOnednnConvForward, Forward, DETECTAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetectaxOnednnConvInputGrad, InputGrad, DETECTAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DetectaxOnednnConvKernelGrad, KernelGrad, DETECTAX_CONV_BINDING);

// 1 if oneDNN builds the three primitives for a small convolution in `dtype`
// (0: float32, 1: bfloat16) on this CPU, else 0.
extern "C" int DetectaxOnednnSupports(int dtype) {
  Geometry g;
  g.dtype = dtype == 1 ? memory::data_type::bf16 : memory::data_type::f32;
  g.x = {1, 16, 8, 8};
  g.k = {16, 16, 3, 3};
  g.y = {1, 16, 8, 8};
  g.strides = {1, 1};
  g.pad_lo = {1, 1};
  g.pad_hi = {1, 1};
  g.threads = 1;
  try {
    for (Kind kind : {kForward, kInputGrad, kKernelGrad}) MakePlan(kind, g);
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}
