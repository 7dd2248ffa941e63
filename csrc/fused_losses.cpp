// Fused losses of fastonestep (design.md section 5): op schemas and CPU kernels.
//
// Every op returns the loss and, from the same pass over the data, the gradient the loss's backward needs.
// The autograd formula (registered from Python, fastonestep/kernels/ext.py) only scales that gradient by
// grad_output. Inputs are flattened to (B, N) rows (B = size(0)); float, double, half and bfloat16 are
// accepted, arithmetic is done in at::opmath_type (fp32 for fp32/half/bf16, fp64 for fp64) and the CPU row
// sums accumulate in double. Losses come back in fp32 (fp64 for fp64 inputs); gradients in the input dtype
// (fp32 for fp16 inputs: op_checks.h, grad_dtype), contiguous, shaped like the input. Rows are processed in parallel with at::parallel_for; cross-row sums
// are done serially afterwards, so results do not depend on the thread count.
//
// The CUDA kernels of the same ops are in fused_losses_cuda.cu.
#include <ATen/core/Tensor.h>  // (not ATen/ATen.h: the build is half as long with only what is used)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_checks.h"

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace fastonestep {
namespace {

constexpr double kEps = 1e-8;  // the normaliser's epsilon, as in kernels/reference.py


int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }



using checks::acc_dtype;
using checks::check_like;
using checks::grad_dtype;
using checks::grad_type;

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  checks::check_rows(t, c10::DeviceType::CPU, op, name);
}

at::Tensor per_sample(const at::Tensor& v, int64_t B, at::ScalarType acc, const char* op, const char* name) {
  return checks::per_sample(v, B, acc, at::Device(at::kCPU), op, name);
}

// Divergence weight h(r) = f''(r) r^2 at r = exp(-logit), from the clamped logit (see reference.py).
// The clamp propagates NaN like torch.clamp.
template <typename T>
T divergence_weight(T logit, int64_t divergence, T clamp) {
  const T l = logit < -clamp ? -clamp : (logit > clamp ? clamp : logit);
  switch (divergence) {
    case 0: return T(1);                                 // rkl
    case 1: return T(1) / (T(1) + std::exp(l));          // dijs: sigmoid(-l)
    case 2: return std::exp(-l);                         // fkl
    default: return T(0.5) * std::exp(T(-0.5) * l);      // hellinger
  }
}

template <typename T>
T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }  // torch's softplus, beta 1, threshold 20

template <typename T>
T softplus_grad(T x) {  // d softplus / dx as torch computes it
  if (x > T(20)) return T(1);
  const T z = std::exp(x);
  return z / (z + T(1));
}

// ---------------------------------------------------------------------------------------------------------
// denoising_loss: loss_i = lambda_i mean_j (c_skip_i x_t + c_out_i F - x0)^2, grad_F = lambda_i 2 c_out_i (D - x0) / N

std::tuple<at::Tensor, at::Tensor> denoising_loss_fwd_cpu(const at::Tensor& F_, const at::Tensor& x_t_,
                                                           const at::Tensor& x0_, const at::Tensor& sigma_,
                                                           double sigma_data) {
  const char* op = "fastonestep::denoising_loss_fwd";
  check_rows(F_, op, "F");
  check_like(F_, x_t_, op, "x_t");
  check_like(F_, x0_, op, "x0");
  const auto F = F_.contiguous(), x_t = x_t_.contiguous(), x0 = x0_.contiguous();
  const int64_t B = F.size(0), N = B > 0 ? F.numel() / B : 0;
  const auto acc = acc_dtype(F.scalar_type());
  const auto sigma = per_sample(sigma_, B, acc, op, "sigma");
  auto loss = F.new_empty({B}, F.options().dtype(acc));
  auto grad = F.new_empty(F.sizes(), F.options().dtype(grad_dtype(F.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "denoising_loss_fwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    const scalar_t* pF = F.const_data_ptr<scalar_t>();
    const scalar_t* pxt = x_t.const_data_ptr<scalar_t>();
    const scalar_t* px0 = x0.const_data_ptr<scalar_t>();
    const opmath_t* ps = sigma.const_data_ptr<opmath_t>();
    opmath_t* pl = loss.data_ptr<opmath_t>();
    grad_t* pg = grad.data_ptr<grad_t>();
    const opmath_t sd = static_cast<opmath_t>(sigma_data), sd2 = sd * sd;
    at::parallel_for(0, B, row_grain(N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const opmath_t s = ps[b], s2 = s * s + sd2;
        const opmath_t c_skip = sd2 / s2, c_out = s * sd / std::sqrt(s2), lam = s2 / ((s * sd) * (s * sd));
        const opmath_t gscale = opmath_t(2) * lam * c_out / static_cast<opmath_t>(N);
        const int64_t o = b * N;
        double sum = 0.0;
        for (int64_t j = 0; j < N; ++j) {
          const opmath_t d = c_skip * static_cast<opmath_t>(pxt[o + j]) + c_out * static_cast<opmath_t>(pF[o + j]) -
                             static_cast<opmath_t>(px0[o + j]);
          sum += static_cast<double>(d) * static_cast<double>(d);
          pg[o + j] = static_cast<grad_t>(gscale * d);
        }
        pl[b] = lam * static_cast<opmath_t>(sum / static_cast<double>(N));
      }
    });
  });
  return {loss, grad};
}

// ---------------------------------------------------------------------------------------------------------
// Surrogate losses 0.5 * mean(g^2) with gradient g / numel w.r.t. the generator output; rows whose g has a
// NaN/Inf are zeroed (value and gradient), as in reference._finite_rows.

// Writes g * inv_numel for row b given the per-element direction g(j); returns (sum g^2, row finite).
template <typename grad_t, typename opmath_t, typename G>
std::pair<double, bool> write_row(grad_t* out, int64_t N, opmath_t inv_numel, const G& g_of) {
  double sq = 0.0;
  bool finite = true;
  for (int64_t j = 0; j < N; ++j) {
    const opmath_t g = g_of(j);
    finite = finite && std::isfinite(g);
    sq += static_cast<double>(g) * static_cast<double>(g);
    out[j] = static_cast<grad_t>(g * inv_numel);
  }
  if (!finite) {
    std::fill(out, out + N, static_cast<grad_t>(0));
    sq = 0.0;
  }
  return {sq, finite};
}

// A 0-d tensor of dtype acc on like's device. Made in double and cast: a sum beyond fp32's range becomes inf, as in
// the fp32 reference (new_full in fp32 refuses such a value, e.g. an fkl loss with clamp=inf and large logits).
at::Tensor scalar_like(const at::Tensor& like, double value, at::ScalarType acc) {
  return like.new_full({}, value, like.options().dtype(at::kDouble)).to(acc);
}

// A scalar loss over no elements is 0, not NaN (reference.mean_or_zero: an empty shard must not poison the
// all-reduce).
double mean_or_zero(double total, int64_t count) { return count > 0 ? total / static_cast<double>(count) : 0.0; }

at::Tensor surrogate_value(const at::Tensor& like, const std::vector<double>& row_sq, int64_t numel,
                           at::ScalarType acc) {
  double total = 0.0;
  for (double v : row_sq) total += v;
  return scalar_like(like, 0.5 * mean_or_zero(total, numel), acc);
}

// dmd_loss: g = (p_real - p_fake) / (mean|p_real| + eps) per sample, p_real = x - x_real_hat, p_fake = x - x_fake_hat.
std::tuple<at::Tensor, at::Tensor> dmd_loss_fwd_cpu(const at::Tensor& x_, const at::Tensor& xr_,
                                                     const at::Tensor& xf_) {
  const char* op = "fastonestep::dmd_loss_fwd";
  check_rows(x_, op, "x");
  check_like(x_, xr_, op, "x_real_hat");
  check_like(x_, xf_, op, "x_fake_hat");
  const auto x = x_.contiguous(), xr = xr_.contiguous(), xf = xf_.contiguous();
  const int64_t B = x.size(0), N = B > 0 ? x.numel() / B : 0;
  const auto acc = acc_dtype(x.scalar_type());
  auto grad = x.new_empty(x.sizes(), x.options().dtype(grad_dtype(x.scalar_type())));
  std::vector<double> row_sq(B, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dmd_loss_fwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pr = xr.const_data_ptr<scalar_t>();
    const scalar_t* pf = xf.const_data_ptr<scalar_t>();
    grad_t* pg = grad.data_ptr<grad_t>();
    const opmath_t inv_numel = opmath_t(1) / static_cast<opmath_t>(x.numel());
    at::parallel_for(0, B, row_grain(N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * N;
        double abs_sum = 0.0;
        for (int64_t j = 0; j < N; ++j)
          abs_sum += std::abs(static_cast<double>(static_cast<opmath_t>(px[o + j]) - static_cast<opmath_t>(pr[o + j])));
        const opmath_t norm = static_cast<opmath_t>(abs_sum / static_cast<double>(N)) + static_cast<opmath_t>(kEps);
        row_sq[b] = write_row(pg + o, N, inv_numel, [&](int64_t j) {
                      const opmath_t xv = static_cast<opmath_t>(px[o + j]);
                      const opmath_t p_real = xv - static_cast<opmath_t>(pr[o + j]);
                      const opmath_t p_fake = xv - static_cast<opmath_t>(pf[o + j]);
                      return (p_real - p_fake) / norm;
                    }).first;
      }
    });
  });
  return {surrogate_value(x, row_sq, x.numel(), acc), grad};
}

// ratio_generator_loss: g_i = w_i h(exp(-logit_i)) logit_grad_i / (mean|logit_grad_i| + eps) (design 4.1(b)).
// x only gives the gradient's shape (its values are not read); the gradient has logit_grad's dtype (grad_dtype).
// divergence: 0 rkl, 1 dijs, 2 fkl, 3 hellinger.
std::tuple<at::Tensor, at::Tensor> ratio_generator_loss_fwd_cpu(const at::Tensor& x, const at::Tensor& lg_,
                                                                 const at::Tensor& logits_,
                                                                 const std::optional<at::Tensor>& weight_,
                                                                 int64_t divergence, bool normalize, double clamp) {
  const char* op = "fastonestep::ratio_generator_loss_fwd";
  check_rows(x, op, "x");
  check_rows(lg_, op, "logit_grad");
  TORCH_CHECK(divergence >= 0 && divergence <= 3, op, ": divergence must be 0 (rkl), 1 (dijs), 2 (fkl) or 3 "
              "(hellinger), got ", divergence);
  TORCH_CHECK(lg_.size(0) == x.size(0) && lg_.numel() == x.numel(), op, ": logit_grad (", lg_.sizes(),
              ") must have x's batch size and number of elements (", x.sizes(), ")");
  const auto lg = lg_.contiguous();
  const int64_t B = lg.size(0), N = B > 0 ? lg.numel() / B : 0;
  const auto acc = acc_dtype(lg.scalar_type());
  const auto logits = per_sample(logits_, B, acc, op, "logits");
  std::optional<at::Tensor> weight;
  if (weight_.has_value() && weight_->defined()) weight = per_sample(*weight_, B, acc, op, "weight");
  auto grad = lg.new_empty(x.sizes(), lg.options().dtype(grad_dtype(lg.scalar_type())));
  std::vector<double> row_sq(B, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "ratio_generator_loss_fwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    const scalar_t* pv = lg.const_data_ptr<scalar_t>();
    const opmath_t* pl = logits.const_data_ptr<opmath_t>();
    const opmath_t* pw = weight.has_value() ? weight->const_data_ptr<opmath_t>() : nullptr;
    grad_t* pg = grad.data_ptr<grad_t>();
    const opmath_t inv_numel = opmath_t(1) / static_cast<opmath_t>(lg.numel());
    const opmath_t clamp_v = static_cast<opmath_t>(clamp);
    at::parallel_for(0, B, row_grain(N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * N;
        opmath_t coef = divergence_weight<opmath_t>(pl[b], divergence, clamp_v);
        if (pw != nullptr) coef = coef * pw[b];
        if (normalize) {
          double abs_sum = 0.0;
          for (int64_t j = 0; j < N; ++j) abs_sum += std::abs(static_cast<double>(static_cast<opmath_t>(pv[o + j])));
          coef = coef / (static_cast<opmath_t>(abs_sum / static_cast<double>(N)) + static_cast<opmath_t>(kEps));
        }
        row_sq[b] = write_row(pg + o, N, inv_numel,
                              [&](int64_t j) { return coef * static_cast<opmath_t>(pv[o + j]); }).first;
      }
    });
  });
  return {surrogate_value(lg, row_sq, lg.numel(), acc), grad};
}

// ---------------------------------------------------------------------------------------------------------
// ratio_classifier_loss: mean_i w_i (softplus(-l_gen_i) + softplus(l_real_i)) (generated = 1, real = 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ratio_classifier_loss_fwd_cpu(
    const at::Tensor& gen_, const at::Tensor& real_, const std::optional<at::Tensor>& weight_) {
  const char* op = "fastonestep::ratio_classifier_loss_fwd";
  TORCH_CHECK(gen_.device().is_cpu() && real_.device().is_cpu(), op, ": logits must be CPU tensors here");
  TORCH_CHECK(at::isFloatingType(gen_.scalar_type()), op, ": logits must be floating point");
  TORCH_CHECK(gen_.numel() == real_.numel(), op, ": logits_gen (", gen_.sizes(), ") and logits_real (",
              real_.sizes(), ") must have the same number of elements");
  TORCH_CHECK(gen_.scalar_type() == real_.scalar_type(), op, ": logits_gen and logits_real must have one dtype "
              "(promote on the Python side)");
  const auto gen = gen_.contiguous(), real = real_.contiguous();
  const int64_t M = gen.numel();
  const auto acc = acc_dtype(gen.scalar_type());
  std::optional<at::Tensor> weight;
  if (weight_.has_value() && weight_->defined()) weight = per_sample(*weight_, M, acc, op, "weight");
  auto grad_gen = gen.new_empty(gen.sizes(), gen.options().dtype(grad_dtype(gen.scalar_type())));
  auto grad_real = real.new_empty(real.sizes(), real.options().dtype(grad_dtype(real.scalar_type())));
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "ratio_classifier_loss_fwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    const scalar_t* pg = gen.const_data_ptr<scalar_t>();
    const scalar_t* pr = real.const_data_ptr<scalar_t>();
    const opmath_t* pw = weight.has_value() ? weight->const_data_ptr<opmath_t>() : nullptr;
    grad_t* og = grad_gen.data_ptr<grad_t>();
    grad_t* orl = grad_real.data_ptr<grad_t>();
    const opmath_t inv_m = opmath_t(1) / static_cast<opmath_t>(M);
    // Fixed-size chunks summed serially afterwards: the value does not depend on the thread count.
    constexpr int64_t kChunk = 4096;
    const int64_t chunks = (M + kChunk - 1) / kChunk;
    std::vector<double> part(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sum = 0.0;
        for (int64_t i = c * kChunk; i < std::min(M, (c + 1) * kChunk); ++i) {
          const opmath_t lgv = static_cast<opmath_t>(pg[i]), lrv = static_cast<opmath_t>(pr[i]);
          const opmath_t w = pw != nullptr ? pw[i] : opmath_t(1);
          sum += static_cast<double>(w * (softplus(-lgv) + softplus(lrv)));
          og[i] = static_cast<grad_t>(-w * softplus_grad(-lgv) * inv_m);
          orl[i] = static_cast<grad_t>(w * softplus_grad(lrv) * inv_m);
        }
        part[c] = sum;
      }
    });
    for (double v : part) total += v;
  });
  auto loss = scalar_like(gen, mean_or_zero(total, M), acc);
  return {loss, grad_gen, grad_real};
}

}  // namespace
}  // namespace fastonestep

TORCH_LIBRARY(fastonestep, m) {
  m.def("denoising_loss_fwd(Tensor F, Tensor x_t, Tensor x0, Tensor sigma, float sigma_data) -> (Tensor, Tensor)");
  m.def("dmd_loss_fwd(Tensor x, Tensor x_real_hat, Tensor x_fake_hat) -> (Tensor, Tensor)");
  m.def("ratio_generator_loss_fwd(Tensor x, Tensor logit_grad, Tensor logits, Tensor? weight, int divergence, "
        "bool normalize, float clamp) -> (Tensor, Tensor)");
  m.def("ratio_classifier_loss_fwd(Tensor logits_gen, Tensor logits_real, Tensor? weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastonestep, CPU, m) {
  m.impl("denoising_loss_fwd", &fastonestep::denoising_loss_fwd_cpu);
  m.impl("dmd_loss_fwd", &fastonestep::dmd_loss_fwd_cpu);
  m.impl("ratio_generator_loss_fwd", &fastonestep::ratio_generator_loss_fwd_cpu);
  m.impl("ratio_classifier_loss_fwd", &fastonestep::ratio_classifier_loss_fwd_cpu);
}

// An empty Python module, so that setup.py can build this library as the importable `fastonestep._C`
// (importing it registers the ops). The just-in-time build loads the library with torch.ops.load_library.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
