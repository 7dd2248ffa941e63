// Host-side argument checks shared by the CPU (fused_losses.cpp) and CUDA (fused_losses_cuda.cu) ops, so
// both report a bad call with the same message naming the op, the argument and the problem.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>

namespace fastonestep {
namespace checks {

// Accumulation dtype: fp64 stays fp64 (gradcheck), everything else accumulates in fp32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Dtype of the gradient an op writes for its backward: the input's, except fp32 for fp16. A gradient of size
// 1/numel is an fp16 subnormal for any realistic sample (below 6.1e-5, a fixed step of 6e-8), and the backward
// multiplies it by grad_output (a loss scale of 2^16, say) only afterwards: rounded to fp16 first, it kept about
// one significant digit. fp32 costs 2 more bytes per element, held until the backward (the same rule as
// kernels/fused_backward.py's saved_grad_dtype). bf16 has fp32's exponent range and keeps its own dtype.
inline at::ScalarType grad_dtype(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

template <typename scalar_t>
using grad_type = std::conditional_t<std::is_same_v<scalar_t, at::Half>, float, scalar_t>;

inline void check_rows(const at::Tensor& t, c10::DeviceType device, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor here");
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

inline void check_like(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(b.device() == a.device(), op, ": ", name, " is on ", b.device(), ", expected ", a.device());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", name, " has shape ", b.sizes(), ", expected ", a.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name, " has dtype ", b.scalar_type(), ", expected ",
              a.scalar_type(), " (promote on the Python side)");
}

// A (B,) per-sample vector as contiguous acc-dtype values on `device`.
inline at::Tensor per_sample(const at::Tensor& v, int64_t n, at::ScalarType acc, c10::Device device,
                             const char* op, const char* name) {
  TORCH_CHECK(v.numel() == n, op, ": ", name, " must have one value per sample (", n, "), got ", v.numel());
  return v.reshape({-1}).to(device, acc).contiguous();
}

}  // namespace checks
}  // namespace fastonestep
