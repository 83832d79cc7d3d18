// Type dispatch for kernels that read one dtype and write another (the
// autocast case: float32 activations feeding a half/bfloat16 convolution),
// and activation dispatch into a compile-time constant so the inner loops
// carry no switch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "../common/norm_act_math.h"

namespace resfast::cpu {

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<in_t>{}, TypeTag<out_t>{}) for out == in, or in float32 with out
// float16/bfloat16.
template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, const F& f) {
  if (in == out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in, "resfast", [&] {
      f(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
    });
  } else if (in == at::kFloat && out == at::kHalf) {
    f(TypeTag<float>{}, TypeTag<at::Half>{});
  } else if (in == at::kFloat && out == at::kBFloat16) {
    f(TypeTag<float>{}, TypeTag<at::BFloat16>{});
  } else {
    TORCH_CHECK_TYPE(false, "resfast: unsupported dtype pair: input ", in, ", compute ", out);
  }
}

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

template <typename F>
void dispatch_activation(Activation act, const F& f) {
  switch (act) {
    case Activation::ReLU:
      return f(ActivationTag<Activation::ReLU>{});
    case Activation::SiLU:
      return f(ActivationTag<Activation::SiLU>{});
    case Activation::ReLU6:
      return f(ActivationTag<Activation::ReLU6>{});
    default:
      return f(ActivationTag<Activation::Identity>{});
  }
}

}  // namespace resfast::cpu
