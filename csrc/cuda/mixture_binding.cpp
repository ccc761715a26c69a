// CUDA binding of the mixture ops: argument checks, contiguity, output allocation, device guard
// and stream; the kernels are the raw-pointer launchers of mixture.cu (launchers.h).
// Named <op>_binding.cpp rather than <op>.cpp: setuptools names object files by stem, and
// <op>.cpp would collide with <op>.cu in the build directory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../utils.h"
#include "binding_utils.h"

namespace {

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> mixture_fwd_cuda(const at::Tensor& z_, const at::Tensor& logits_,
                                                    const at::Tensor& means_,
                                                    const at::Tensor& log_scales_,
                                                    const c10::optional<at::Tensor>& code_,
                                                    bool per_dim,
                                                    const c10::optional<at::Tensor>& pls_) {
  acn::check_mixture_args(z_, logits_, means_, log_scales_, code_, pls_);
  TORCH_CHECK(z_.is_cuda(), "z must be a CUDA tensor for the cuda backend, got ", z_.device());
  const auto dt = acn::cuda::dtype_tag(z_.scalar_type(), "z");
  const c10::cuda::CUDAGuard guard(z_.device());
  const auto z = z_.contiguous(), lg = logits_.contiguous(), mu = means_.contiguous(),
             ls = log_scales_.contiguous();
  const at::Tensor code = code_.has_value() ? code_->contiguous() : at::Tensor();
  const at::Tensor pls = pls_.has_value() ? pls_->contiguous() : at::Tensor();
  const int64_t B = z.size(0), D = z.size(1), M = lg.size(2);
  const auto opts = z.options().dtype(acn::acc_dtype(z.scalar_type()));
  at::Tensor out = per_dim ? acn::new_output({B, D}, opts) : acn::new_output({B}, opts);
  at::Tensor lse = acn::new_output({B, D, 2}, opts);
  C10_CUDA_CHECK(acn::cuda::mixture_fwd(dt, B, D, M, z.const_data_ptr(), lg.const_data_ptr(),
                                        mu.const_data_ptr(), ls.const_data_ptr(), ptr_or_null(code),
                                        ptr_or_null(pls), per_dim, out.data_ptr(), lse.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mixture_bwd_cuda(const at::Tensor& grad_, const at::Tensor& z_, const at::Tensor& logits_,
                 const at::Tensor& means_, const at::Tensor& log_scales_,
                 const c10::optional<at::Tensor>& code_, const at::Tensor& lse_, bool per_dim,
                 const c10::optional<at::Tensor>& pls_) {
  acn::check_mixture_args(z_, logits_, means_, log_scales_, code_, pls_);
  TORCH_CHECK(z_.is_cuda(), "z must be a CUDA tensor for the cuda backend, got ", z_.device());
  const auto dt = acn::cuda::dtype_tag(z_.scalar_type(), "z");
  const c10::cuda::CUDAGuard guard(z_.device());
  const auto z = z_.contiguous(), lg = logits_.contiguous(), mu = means_.contiguous(),
             ls = log_scales_.contiguous();
  const at::Tensor code = code_.has_value() ? code_->contiguous() : at::Tensor();
  const at::Tensor pls = pls_.has_value() ? pls_->contiguous() : at::Tensor();
  const int64_t B = z.size(0), D = z.size(1), M = lg.size(2);
  const auto acc = acn::acc_dtype(z.scalar_type());
  TORCH_CHECK(lse_.sizes() == at::IntArrayRef({B, D, 2}) && lse_.scalar_type() == acc &&
                  lse_.device() == z.device(),
              "lse must be the [B, D, 2] tensor saved by mixture_fwd");
  TORCH_CHECK(grad_.device() == z.device(), "grad_out is on ", grad_.device(), " but z is on ",
              z.device());
  const auto grad = grad_.to(acc).contiguous();
  TORCH_CHECK(grad.numel() == (per_dim ? B * D : B), "grad_out has the wrong shape ", grad.sizes());
  const auto lse = lse_.contiguous();
  at::Tensor dz = acn::new_output(z.sizes(), z.options());
  at::Tensor dlg = acn::new_output(lg.sizes(), lg.options());
  at::Tensor dmu = acn::new_output(lg.sizes(), lg.options());
  at::Tensor dls = acn::new_output(lg.sizes(), lg.options());
  at::Tensor dcode =
      code.defined() ? acn::new_output(z.sizes(), z.options()) : at::empty({0}, z.options());
  at::Tensor dpls =
      pls.defined() ? acn::new_output(z.sizes(), z.options()) : at::empty({0}, z.options());
  C10_CUDA_CHECK(acn::cuda::mixture_bwd(
      dt, B, D, M, grad.const_data_ptr(), z.const_data_ptr(), lg.const_data_ptr(),
      mu.const_data_ptr(), ls.const_data_ptr(), ptr_or_null(code), ptr_or_null(pls),
      lse.const_data_ptr(), per_dim, dz.data_ptr(), dlg.data_ptr(), dmu.data_ptr(),
      dls.data_ptr(), code.defined() ? dcode.data_ptr() : nullptr,
      pls.defined() ? dpls.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream()));
  return {dz, dlg, dmu, dls, dcode, dpls};
}

}  // namespace

TORCH_LIBRARY_IMPL(acn_kernels, CUDA, m) {
  m.impl("mixture_fwd", &mixture_fwd_cuda);
  m.impl("mixture_bwd", &mixture_bwd_cuda);
}
