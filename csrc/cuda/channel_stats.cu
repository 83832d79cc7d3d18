// CUDA kernels of channel_stats and its backward: memory-bound passes, kept
// out of Triton because they need no matrix units and want a two-level,
// deterministic reduction. The per-element math is shared with the CPU
// kernels (common/norm_act_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/norm_act_math.h"

namespace resfast::cuda {
namespace {

constexpr int kThreads = 256;
// channels_last: a block covers 32 adjacent channels (coalesced rows of C),
// with 8 lanes walking the pixels. NCHW: a block covers one channel, with
// 256 lanes walking its contiguous planes.
constexpr int kChannelsPerBlockCL = 32;

template <bool channels_last>
__device__ __forceinline__ int64_t element_offset(int64_t j, int64_t c, int64_t C, int64_t HW) {
  if (channels_last) return j * C + c;
  return (j / HW) * C * HW + c * HW + (j % HW);
}

// Pass 1: each block reduces a slice of the elements of its channels to
// moments, written to partial[split][c].
template <typename scalar_t, typename acc_t, bool channels_last>
__global__ void channel_moments_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t HW,
                                       int64_t count, Moments<acc_t>* __restrict__ partial) {
  __shared__ Moments<acc_t> shared[kThreads];
  const int tid = threadIdx.x;
  const int lane_stride = channels_last ? kChannelsPerBlockCL : 1;
  const int lanes = kThreads / lane_stride;
  const int64_t c = channels_last ? int64_t(blockIdx.x) * kChannelsPerBlockCL + tid % kChannelsPerBlockCL
                                  : int64_t(blockIdx.x);
  const int lane = tid / lane_stride;

  Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
  if (c < C) {
    const acc_t pivot = static_cast<acc_t>(x[element_offset<channels_last>(0, c, C, HW)]);
    acc_t sum = 0, sum_sq = 0, n = 0;
    for (int64_t j = int64_t(blockIdx.y) * lanes + lane; j < count; j += int64_t(gridDim.y) * lanes) {
      const acc_t d = static_cast<acc_t>(x[element_offset<channels_last>(j, c, C, HW)]) - pivot;
      sum += d;
      sum_sq += d * d;
      n += acc_t(1);
    }
    m = moments_from_shifted_sums(n, pivot, sum, sum_sq);
  }
  shared[tid] = m;
  __syncthreads();
  for (int offset = kThreads / 2; offset >= lane_stride; offset >>= 1) {
    if (tid < offset) shared[tid] = merge_moments(shared[tid], shared[tid + offset]);
    __syncthreads();
  }
  if (tid < lane_stride && c < C) partial[int64_t(blockIdx.y) * C + c] = shared[tid];
}

// Pass 2: merge each channel's partials in a fixed order (deterministic).
template <typename acc_t>
__global__ void channel_moments_finalize_kernel(const Moments<acc_t>* __restrict__ partial,
                                                int64_t C, int splits, acc_t* __restrict__ mean,
                                                acc_t* __restrict__ var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Moments<acc_t> m = partial[c];
  for (int s = 1; s < splits; ++s) m = merge_moments(m, partial[int64_t(s) * C + c]);
  mean[c] = m.mean;
  var[c] = m.m2 / m.n;
}

template <typename scalar_t, typename acc_t, bool channels_last>
__global__ void channel_stats_backward_kernel(const scalar_t* __restrict__ x,
                                              const acc_t* __restrict__ mean,
                                              const acc_t* __restrict__ grad_mean,
                                              const acc_t* __restrict__ grad_var, int64_t C,
                                              int64_t HW, int64_t numel, acc_t inv_count,
                                              scalar_t* __restrict__ grad_x) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channels_last ? i % C : (i / HW) % C;
    grad_x[i] = static_cast<scalar_t>(channel_stats_grad<acc_t>(static_cast<acc_t>(x[i]), mean[c],
                                                                grad_mean[c], grad_var[c], inv_count));
  }
}

int multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input) {
  check_activation_input(input, "x");
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = is_channels_last(kernel_format(input));
  const at::Tensor x = input.contiguous(kernel_format(input));
  const int64_t C = x.size(1), HW = spatial_numel(x), count = x.size(0) * HW;
  TORCH_CHECK_VALUE(count > 0, "x: expected at least one value per channel, got shape ", x.sizes());
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor mean = at::empty({C}, acc_opts), var = at::empty({C}, acc_opts);

  const int64_t channel_blocks = cl ? (C + kChannelsPerBlockCL - 1) / kChannelsPerBlockCL : C;
  const int lanes = cl ? kThreads / kChannelsPerBlockCL : kThreads;
  // Enough blocks to fill the GPU a few times over, each lane still summing
  // several values.
  const int64_t wanted = (4 * multiprocessors() + channel_blocks - 1) / channel_blocks;
  const int splits = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({wanted, (count + lanes * 8 - 1) / (lanes * 8), 65535})));
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({splits, C, 3}, acc_opts);
    auto* p = reinterpret_cast<Moments<acc_t>*>(partial.data_ptr<acc_t>());
    const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(splits));
    if (cl) {
      channel_moments_kernel<scalar_t, acc_t, true>
          <<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), C, HW, count, p);
    } else {
      channel_moments_kernel<scalar_t, acc_t, false>
          <<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), C, HW, count, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_moments_finalize_kernel<acc_t><<<(C + 127) / 128, 128, 0, stream>>>(
        p, C, splits, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

at::Tensor channel_stats_backward(const at::Tensor& input, const at::Tensor& mean,
                                  const at::Tensor& grad_mean, const at::Tensor& grad_var) {
  check_activation_input(input, "x");
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = is_channels_last(kernel_format(input));
  const at::Tensor x = input.contiguous(kernel_format(input));
  const int64_t C = x.size(1), HW = spatial_numel(x), numel = x.numel();
  check_stats_backward_args(x, mean, grad_mean, grad_var);
  at::Tensor grad_x = at::empty_like(x);
  if (numel == 0) return grad_x;
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();
  const int blocks = static_cast<int>(
      std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t(multiprocessors()) * 16));
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(x.size(0) * HW);
    auto launch = [&](auto cl_tag) {
      channel_stats_backward_kernel<scalar_t, acc_t, decltype(cl_tag)::value>
          <<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
                                            gm.const_data_ptr<acc_t>(), gv.const_data_ptr<acc_t>(), C,
                                            HW, numel, inv_count, grad_x.data_ptr<scalar_t>());
    };
    if (cl) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  m.impl("channel_stats", &channel_stats);
  m.impl("channel_stats_backward", &channel_stats_backward);
}

}  // namespace resfast::cuda
