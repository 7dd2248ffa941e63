// Fused losses of fastonestep (design.md section 5): CUDA kernels of the ops defined in fused_losses.cpp.
//
// *** COMPILED AND TESTED ONLY ON A GPU MACHINE. *** The CPU development machine cannot build this file into
// the extension (its torch has no CUDA builder); kernels/ext.py compiles it just in time when a GPU, a CUDA
// torch and nvcc are present, and tests/test_ext_op.py::test_cuda_* checks it against kernels/reference.py
// there. It has never run on a GPU. CI checks it two ways without one: a compile-only check wherever nvcc is
// installed (tests/test_ext_op.py::test_cuda_source_compiles_for_hopper: -c for sm_90 against the torch headers,
// no register spills), and a run of these kernels and this host code on the CPU under a fiber-per-thread CUDA
// emulation, against the CPU op (tests/test_cuda_emulated.py: indexing, chunking, reductions, barriers, NaN rows;
// not nvcc's code generation nor the GPU memory model). Launches must keep the form kernel<<<...>>>(args).
//
// Same contract as the CPU kernels: inputs are contiguous (B, N) rows; arithmetic and accumulation in
// at::opmath_type (fp32 for fp32/half/bf16, fp64 for fp64); the loss and the gradient come from one pass; the
// gradient is written in grad_t (the input dtype, fp32 for fp16: op_checks.h, grad_dtype).
// Each row is cut into chunks of kChunk elements with one block per (row, chunk), so a few large samples still
// fill the GPU. Blocks reduce with warp shuffles and a shared-memory step and write one partial each; small
// finalize kernels sum the partials in a fixed order, so results are deterministic (no atomics). The surrogate
// losses (dmd, ratio_generator) need a row normaliser before they can write the gradient: a first kernel writes
// per-chunk sums of |.|, and every block of the write kernel reduces its row's partials itself. Rows whose
// direction g has a NaN/Inf are zeroed by a last kernel (a no-op for finite rows). Loads are scalar and coalesced.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (not ATen/cuda/CUDAContext.h: no cuBLAS/cuSPARSE headers needed)
#include <torch/library.h>

#include "op_checks.h"

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace fastonestep {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 16 * kThreads;  // elements per block
constexpr double kEps = 1e-8;              // the normaliser's epsilon, as in kernels/reference.py

// ----------------------------------------------------------------------------------------- device helpers

__device__ __forceinline__ float dexp(float v) { return expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
__device__ __forceinline__ float dlog1p(float v) { return log1pf(v); }
__device__ __forceinline__ double dlog1p(double v) { return log1p(v); }
__device__ __forceinline__ float dsqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double dsqrt(double v) { return sqrt(v); }

__device__ __forceinline__ float largest(float) { return 3.402823466e+38F; }
__device__ __forceinline__ double largest(double) { return 1.7976931348623157e+308; }

template <typename T>
__device__ __forceinline__ T dabs(T v) { return v < T(0) ? -v : v; }  // NaN stays NaN

template <typename T>
__device__ __forceinline__ bool is_finite(T v) { return dabs(v) <= largest(v); }  // false for NaN and Inf

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread must call it; the total is valid in thread 0. `shared` holds kWarps values
// and may be reused after the call.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = static_cast<int>(threadIdx.x) < kWarps ? shared[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

struct Span {
  int64_t row, begin, end;  // the block's row and its [begin, end) in flat element indices
};

__device__ __forceinline__ Span block_span(int64_t N, int64_t chunks) {
  const int64_t block = blockIdx.x;
  const int64_t row = block / chunks, chunk = block - row * chunks;
  const int64_t begin = row * N + chunk * kChunk, row_end = row * N + N;
  return {row, begin, begin + kChunk < row_end ? begin + kChunk : row_end};
}

// mean of the row's |.| partials + eps, identical in every block of the row (fixed reduction order).
template <typename acc_t>
__device__ acc_t row_normaliser(const acc_t* __restrict__ partial, int64_t row, int64_t chunks, int64_t N,
                                acc_t* shared, acc_t* broadcast) {
  acc_t sum = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) sum += partial[row * chunks + c];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) *broadcast = sum / static_cast<acc_t>(N) + static_cast<acc_t>(kEps);
  __syncthreads();
  return *broadcast;
}

template <typename T>
__device__ __forceinline__ T divergence_weight(T logit, int64_t divergence, T clamp) {
  const T l = logit < -clamp ? -clamp : (logit > clamp ? clamp : logit);  // NaN propagates like torch.clamp
  switch (divergence) {
    case 0: return T(1);                            // rkl
    case 1: return T(1) / (T(1) + dexp(l));         // dijs: sigmoid(-l)
    case 2: return dexp(-l);                        // fkl
    default: return T(0.5) * dexp(T(-0.5) * l);     // hellinger
  }
}

template <typename T>
__device__ __forceinline__ T softplus(T x) { return x > T(20) ? x : dlog1p(dexp(x)); }

template <typename T>
__device__ __forceinline__ T softplus_grad(T x) {
  if (x > T(20)) return T(1);
  const T z = dexp(x);
  return z / (z + T(1));
}

// ------------------------------------------------------------------------------------------------ kernels

template <typename scalar_t, typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) denoising_kernel(
    const scalar_t* __restrict__ F, const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ x0,
    const acc_t* __restrict__ sigma, acc_t sd, int64_t N, int64_t chunks, grad_t* __restrict__ grad,
    acc_t* __restrict__ partial) {
  __shared__ acc_t shared[kWarps];
  const Span sp = block_span(N, chunks);
  const acc_t s = sigma[sp.row], sd2 = sd * sd, s2 = s * s + sd2;
  const acc_t c_skip = sd2 / s2, c_out = s * sd / dsqrt(s2), lam = s2 / ((s * sd) * (s * sd));
  const acc_t gscale = acc_t(2) * lam * c_out / static_cast<acc_t>(N);
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += kThreads) {
    const acc_t d = c_skip * static_cast<acc_t>(x_t[i]) + c_out * static_cast<acc_t>(F[i]) -
                    static_cast<acc_t>(x0[i]);
    sum += d * d;
    grad[i] = static_cast<grad_t>(gscale * d);
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) denoising_finalize_kernel(
    const acc_t* __restrict__ partial, const acc_t* __restrict__ sigma, acc_t sd, int64_t B, int64_t N,
    int64_t chunks, acc_t* __restrict__ loss) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= B) return;
  acc_t sum = 0;
  for (int64_t c = 0; c < chunks; ++c) sum += partial[r * chunks + c];
  const acc_t s = sigma[r], s2 = s * s + sd * sd;
  loss[r] = s2 / ((s * sd) * (s * sd)) * (sum / static_cast<acc_t>(N));
}

// partial[block] = sum of |a - b| over the block's chunk (|a| when b is null).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) abs_sum_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t N, int64_t chunks,
    acc_t* __restrict__ partial) {
  __shared__ acc_t shared[kWarps];
  const Span sp = block_span(N, chunks);
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += kThreads) {
    acc_t v = static_cast<acc_t>(a[i]);
    if (b != nullptr) v -= static_cast<acc_t>(b[i]);
    sum += dabs(v);
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// Writes g / numel; per block: the sum of g^2 and the count of non-finite g.
template <typename grad_t, typename acc_t>
__device__ __forceinline__ void store_direction(acc_t g, acc_t inv_numel, grad_t* out, acc_t& sq, acc_t& bad) {
  if (!is_finite(g)) bad += acc_t(1);
  sq += g * g;
  *out = static_cast<grad_t>(g * inv_numel);
}

template <typename scalar_t, typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) dmd_write_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ x_real, const scalar_t* __restrict__ x_fake,
    const acc_t* __restrict__ norm_partial, int64_t N, int64_t chunks, acc_t inv_numel,
    grad_t* __restrict__ grad, acc_t* __restrict__ sq_partial, acc_t* __restrict__ bad_partial) {
  __shared__ acc_t shared[kWarps];
  __shared__ acc_t broadcast;
  const Span sp = block_span(N, chunks);
  const acc_t norm = row_normaliser(norm_partial, sp.row, chunks, N, shared, &broadcast);
  acc_t sq = 0, bad = 0;
#pragma unroll 4
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += kThreads) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t p_real = xv - static_cast<acc_t>(x_real[i]), p_fake = xv - static_cast<acc_t>(x_fake[i]);
    store_direction((p_real - p_fake) / norm, inv_numel, grad + i, sq, bad);
  }
  sq = block_sum(sq, shared);
  bad = block_sum(bad, shared);
  if (threadIdx.x == 0) {
    sq_partial[blockIdx.x] = sq;
    bad_partial[blockIdx.x] = bad;
  }
}

// norm_partial null: normalize=False. weight null: no per-sample weight.
template <typename scalar_t, typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) ratio_write_kernel(
    const scalar_t* __restrict__ lg, const acc_t* __restrict__ logits, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ norm_partial, int64_t divergence, acc_t clamp, int64_t N, int64_t chunks,
    acc_t inv_numel, grad_t* __restrict__ grad, acc_t* __restrict__ sq_partial, acc_t* __restrict__ bad_partial) {
  __shared__ acc_t shared[kWarps];
  __shared__ acc_t broadcast;
  const Span sp = block_span(N, chunks);
  acc_t coef = divergence_weight(logits[sp.row], divergence, clamp);
  if (weight != nullptr) coef = coef * weight[sp.row];
  if (norm_partial != nullptr) coef = coef / row_normaliser(norm_partial, sp.row, chunks, N, shared, &broadcast);
  acc_t sq = 0, bad = 0;
#pragma unroll 4
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += kThreads)
    store_direction(coef * static_cast<acc_t>(lg[i]), inv_numel, grad + i, sq, bad);
  sq = block_sum(sq, shared);
  bad = block_sum(bad, shared);
  if (threadIdx.x == 0) {
    sq_partial[blockIdx.x] = sq;
    bad_partial[blockIdx.x] = bad;
  }
}

// One block: row_ok[r] = no non-finite g in row r; loss = 0.5 * (sum of g^2 over finite rows) / numel.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) surrogate_finalize_kernel(
    const acc_t* __restrict__ sq_partial, const acc_t* __restrict__ bad_partial, int64_t B, int64_t chunks,
    acc_t inv_numel, int32_t* __restrict__ row_ok, acc_t* __restrict__ loss) {
  __shared__ acc_t shared[kWarps];
  acc_t total = 0;
  for (int64_t r = threadIdx.x; r < B; r += kThreads) {
    acc_t sq = 0, bad = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      sq += sq_partial[r * chunks + c];
      bad += bad_partial[r * chunks + c];
    }
    const bool ok = bad == acc_t(0);
    row_ok[r] = ok ? 1 : 0;
    if (ok) total += sq;
  }
  total = block_sum(total, shared);
  if (threadIdx.x == 0) *loss = acc_t(0.5) * total * inv_numel;
}

template <typename grad_t>
__global__ void __launch_bounds__(kThreads) zero_rows_kernel(grad_t* __restrict__ grad,
                                                             const int32_t* __restrict__ row_ok, int64_t N,
                                                             int64_t chunks) {
  const Span sp = block_span(N, chunks);
  if (row_ok[sp.row] != 0) return;
#pragma unroll 4
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += kThreads) grad[i] = static_cast<grad_t>(0.0f);
}

template <typename scalar_t, typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) classifier_kernel(
    const scalar_t* __restrict__ gen, const scalar_t* __restrict__ real, const acc_t* __restrict__ weight,
    int64_t M, acc_t inv_m, grad_t* __restrict__ grad_gen, grad_t* __restrict__ grad_real,
    acc_t* __restrict__ partial) {
  __shared__ acc_t shared[kWarps];
  const Span sp = block_span(M, static_cast<int64_t>(gridDim.x));  // a single row of M elements
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += kThreads) {
    const acc_t lg = static_cast<acc_t>(gen[i]), lr = static_cast<acc_t>(real[i]);
    const acc_t w = weight != nullptr ? weight[i] : acc_t(1);
    sum += w * (softplus(-lg) + softplus(lr));
    grad_gen[i] = static_cast<grad_t>(-w * softplus_grad(-lg) * inv_m);
    grad_real[i] = static_cast<grad_t>(w * softplus_grad(lr) * inv_m);
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: *out = scale * sum(partial[0:n]).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_kernel(const acc_t* __restrict__ partial, int64_t n, acc_t scale,
                                                       acc_t* __restrict__ out) {
  __shared__ acc_t shared[kWarps];
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) sum += partial[i];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) *out = scale * sum;
}

// --------------------------------------------------------------------------------------------- host side


int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned int grid_of(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(), op, ": too many elements (", blocks,
              " blocks)");
  return static_cast<unsigned int>(blocks);
}



using checks::acc_dtype;
using checks::check_like;
using checks::grad_dtype;
using checks::grad_type;

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  checks::check_rows(t, c10::DeviceType::CUDA, op, name);
}

at::Tensor per_sample(const at::Tensor& v, int64_t n, at::ScalarType acc, const at::Tensor& like, const char* op,
                      const char* name) {
  return checks::per_sample(v, n, acc, like.device(), op, name);
}

// The value of a scalar loss over no elements: 0, as the CPU op (an empty shard must not poison the all-reduce).
at::Tensor zero_scalar(const at::Tensor& like, at::ScalarType acc) {
  return like.new_zeros({}, like.options().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor> denoising_loss_fwd_cuda(const at::Tensor& F_, const at::Tensor& x_t_,
                                                            const at::Tensor& x0_, const at::Tensor& sigma_,
                                                            double sigma_data) {
  const char* op = "fastonestep::denoising_loss_fwd";
  check_rows(F_, op, "F");
  check_like(F_, x_t_, op, "x_t");
  check_like(F_, x0_, op, "x0");
  const c10::cuda::CUDAGuard guard(F_.device());
  const auto F = F_.contiguous(), x_t = x_t_.contiguous(), x0 = x0_.contiguous();
  const int64_t B = F.size(0), N = B > 0 ? F.numel() / B : 0;
  const auto acc = acc_dtype(F.scalar_type());
  const auto sigma = per_sample(sigma_, B, acc, F, op, "sigma");
  auto loss = F.new_empty({B}, F.options().dtype(acc));
  auto grad = F.new_empty(F.sizes(), F.options().dtype(grad_dtype(F.scalar_type())));
  if (B == 0) return {loss, grad};
  if (N == 0) return {loss.fill_(std::numeric_limits<double>::quiet_NaN()), grad};
  const int64_t chunks = ceil_div(N, kChunk);
  const unsigned int blocks = grid_of(B * chunks, op);
  auto partial = F.new_empty({B * chunks}, F.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "denoising_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    const acc_t sd = static_cast<acc_t>(sigma_data);
    denoising_kernel<scalar_t, acc_t, grad_t><<<blocks, kThreads, 0, stream>>>(
        F.const_data_ptr<scalar_t>(), x_t.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(),
        sigma.const_data_ptr<acc_t>(), sd, N, chunks, grad.data_ptr<grad_t>(), partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    denoising_finalize_kernel<acc_t><<<grid_of(ceil_div(B, kThreads), op), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), sigma.const_data_ptr<acc_t>(), sd, B, N, chunks, loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

// Launches the surrogate's finalize and row-zeroing kernels and returns the scalar loss.
template <typename grad_t, typename acc_t>
at::Tensor finish_surrogate(const at::Tensor& like, const at::Tensor& sq_partial, const at::Tensor& bad_partial,
                            int64_t B, int64_t N, int64_t chunks, unsigned int blocks, at::Tensor& grad,
                            cudaStream_t stream) {
  auto loss = like.new_empty({}, like.options().dtype(sq_partial.scalar_type()));
  auto row_ok = like.new_empty({B}, like.options().dtype(at::kInt));
  surrogate_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
      sq_partial.const_data_ptr<acc_t>(), bad_partial.const_data_ptr<acc_t>(), B, chunks,
      acc_t(1) / static_cast<acc_t>(B * N), row_ok.data_ptr<int32_t>(), loss.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  zero_rows_kernel<grad_t><<<blocks, kThreads, 0, stream>>>(grad.data_ptr<grad_t>(),
                                                            row_ok.const_data_ptr<int32_t>(), N, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

std::tuple<at::Tensor, at::Tensor> dmd_loss_fwd_cuda(const at::Tensor& x_, const at::Tensor& xr_,
                                                      const at::Tensor& xf_) {
  const char* op = "fastonestep::dmd_loss_fwd";
  check_rows(x_, op, "x");
  check_like(x_, xr_, op, "x_real_hat");
  check_like(x_, xf_, op, "x_fake_hat");
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), xr = xr_.contiguous(), xf = xf_.contiguous();
  const int64_t B = x.size(0), N = B > 0 ? x.numel() / B : 0;
  const auto acc = acc_dtype(x.scalar_type());
  auto grad = x.new_empty(x.sizes(), x.options().dtype(grad_dtype(x.scalar_type())));
  if (B == 0 || N == 0) return {zero_scalar(x, acc), grad};
  const int64_t chunks = ceil_div(N, kChunk);
  const unsigned int blocks = grid_of(B * chunks, op);
  auto partials = x.new_empty({3, B * chunks}, x.options().dtype(acc));  // |p_real| sums, g^2 sums, bad counts
  at::Tensor loss;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dmd_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    acc_t* norm_partial = partials.data_ptr<acc_t>();
    acc_t* sq_partial = norm_partial + B * chunks;
    acc_t* bad_partial = sq_partial + B * chunks;
    abs_sum_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), xr.const_data_ptr<scalar_t>(), N, chunks, norm_partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dmd_write_kernel<scalar_t, acc_t, grad_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), xr.const_data_ptr<scalar_t>(), xf.const_data_ptr<scalar_t>(), norm_partial,
        N, chunks, acc_t(1) / static_cast<acc_t>(B * N), grad.data_ptr<grad_t>(), sq_partial, bad_partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss = finish_surrogate<grad_t, acc_t>(x, partials[1], partials[2], B, N, chunks, blocks, grad, stream);
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> ratio_generator_loss_fwd_cuda(const at::Tensor& x, const at::Tensor& lg_,
                                                                  const at::Tensor& logits_,
                                                                  const std::optional<at::Tensor>& weight_,
                                                                  int64_t divergence, bool normalize, double clamp) {
  const char* op = "fastonestep::ratio_generator_loss_fwd";
  check_rows(x, op, "x");
  check_rows(lg_, op, "logit_grad");
  TORCH_CHECK(lg_.device() == x.device(), op, ": logit_grad is on ", lg_.device(), ", expected ", x.device());
  TORCH_CHECK(divergence >= 0 && divergence <= 3, op, ": divergence must be 0 (rkl), 1 (dijs), 2 (fkl) or 3 "
              "(hellinger), got ", divergence);
  TORCH_CHECK(lg_.size(0) == x.size(0) && lg_.numel() == x.numel(), op, ": logit_grad (", lg_.sizes(),
              ") must have x's batch size and number of elements (", x.sizes(), ")");
  const c10::cuda::CUDAGuard guard(lg_.device());
  const auto lg = lg_.contiguous();
  const int64_t B = lg.size(0), N = B > 0 ? lg.numel() / B : 0;
  const auto acc = acc_dtype(lg.scalar_type());
  const auto logits = per_sample(logits_, B, acc, lg, op, "logits");
  std::optional<at::Tensor> weight;
  if (weight_.has_value() && weight_->defined()) weight = per_sample(*weight_, B, acc, lg, op, "weight");
  auto grad = lg.new_empty(x.sizes(), lg.options().dtype(grad_dtype(lg.scalar_type())));
  if (B == 0 || N == 0) return {zero_scalar(lg, acc), grad};
  const int64_t chunks = ceil_div(N, kChunk);
  const unsigned int blocks = grid_of(B * chunks, op);
  auto partials = lg.new_empty({3, B * chunks}, lg.options().dtype(acc));  // |lg| sums, g^2 sums, bad counts
  at::Tensor loss;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "ratio_generator_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    acc_t* norm_partial = partials.data_ptr<acc_t>();
    acc_t* sq_partial = norm_partial + B * chunks;
    acc_t* bad_partial = sq_partial + B * chunks;
    if (normalize) {
      abs_sum_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(lg.const_data_ptr<scalar_t>(), nullptr, N,
                                                                         chunks, norm_partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ratio_write_kernel<scalar_t, acc_t, grad_t><<<blocks, kThreads, 0, stream>>>(
        lg.const_data_ptr<scalar_t>(), logits.const_data_ptr<acc_t>(),
        weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr, normalize ? norm_partial : nullptr,
        divergence, static_cast<acc_t>(clamp), N, chunks, acc_t(1) / static_cast<acc_t>(B * N),
        grad.data_ptr<grad_t>(), sq_partial, bad_partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss = finish_surrogate<grad_t, acc_t>(lg, partials[1], partials[2], B, N, chunks, blocks, grad, stream);
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ratio_classifier_loss_fwd_cuda(
    const at::Tensor& gen_, const at::Tensor& real_, const std::optional<at::Tensor>& weight_) {
  const char* op = "fastonestep::ratio_classifier_loss_fwd";
  TORCH_CHECK(gen_.is_cuda() && real_.device() == gen_.device(), op, ": logits must be CUDA tensors on one device");
  TORCH_CHECK(at::isFloatingType(gen_.scalar_type()), op, ": logits must be floating point");
  TORCH_CHECK(gen_.numel() == real_.numel(), op, ": logits_gen (", gen_.sizes(), ") and logits_real (",
              real_.sizes(), ") must have the same number of elements");
  TORCH_CHECK(gen_.scalar_type() == real_.scalar_type(), op, ": logits_gen and logits_real must have one dtype "
              "(promote on the Python side)");
  const c10::cuda::CUDAGuard guard(gen_.device());
  const auto gen = gen_.contiguous(), real = real_.contiguous();
  const int64_t M = gen.numel();
  const auto acc = acc_dtype(gen.scalar_type());
  std::optional<at::Tensor> weight;
  if (weight_.has_value() && weight_->defined()) weight = per_sample(*weight_, M, acc, gen, op, "weight");
  auto grad_gen = gen.new_empty(gen.sizes(), gen.options().dtype(grad_dtype(gen.scalar_type())));
  auto grad_real = real.new_empty(real.sizes(), real.options().dtype(grad_dtype(real.scalar_type())));
  auto loss = gen.new_empty({}, gen.options().dtype(acc));
  if (M == 0) return {zero_scalar(gen, acc), grad_gen, grad_real};
  const int64_t nblocks = ceil_div(M, kChunk);
  auto partial = gen.new_empty({nblocks}, gen.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gen.scalar_type(), "ratio_classifier_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using grad_t = grad_type<scalar_t>;
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(M);
    classifier_kernel<scalar_t, acc_t, grad_t><<<grid_of(nblocks, op), kThreads, 0, stream>>>(
        gen.const_data_ptr<scalar_t>(), real.const_data_ptr<scalar_t>(),
        weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr, M, inv_m, grad_gen.data_ptr<grad_t>(),
        grad_real.data_ptr<grad_t>(), partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_kernel<acc_t><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<acc_t>(), nblocks, inv_m,
                                                  loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad_gen, grad_real};
}

}  // namespace
}  // namespace fastonestep

TORCH_LIBRARY_IMPL(fastonestep, CUDA, m) {
  m.impl("denoising_loss_fwd", &fastonestep::denoising_loss_fwd_cuda);
  m.impl("dmd_loss_fwd", &fastonestep::dmd_loss_fwd_cuda);
  m.impl("ratio_generator_loss_fwd", &fastonestep::ratio_generator_loss_fwd_cuda);
  m.impl("ratio_classifier_loss_fwd", &fastonestep::ratio_classifier_loss_fwd_cuda);
}
