// Instruction-set dispatch for the per-element loops. The extension is built
// for the baseline x86-64 ISA (SSE2) so that it loads on any CPU, but its
// vectorised loops run 8-15x faster with AVX2+FMA or AVX-512 (the SiLU's exp
// polynomial most of all). run_with_best_isa(f) calls f with its whole body,
// and everything it calls, inlined into a copy compiled for the best level the
// CPU has (GCC's `flatten` + `target`): one dispatch per parallel chunk, and
// the kernels stay ISA-agnostic templates.
#pragma once

#include <string>

namespace resfast::cpu {

// x86-64 micro-architecture levels: v3 is AVX2+FMA (Haswell, Zen 1), v4 adds
// AVX-512 (Skylake-X, Zen 4).
enum class CpuIsa : int { Baseline = 0, X86_64_V3 = 1, X86_64_V4 = 2 };

// The best level this CPU supports (Baseline off x86-64 or without GCC).
CpuIsa hardware_isa();
// The level the kernels run at: hardware_isa(), capped by the environment
// variable RESFAST_CPU_ISA ("baseline", "x86-64-v3", "x86-64-v4") at load
// and by set_cpu_isa (tests, to run every compiled copy on one machine).
CpuIsa cpu_isa();
// Caps the level at `isa` (at most hardware_isa()); returns the previous cap.
CpuIsa set_cpu_isa(CpuIsa isa);

const char* isa_name(CpuIsa isa);
// Parses a level's name; throws c10::ValueError naming `argument` otherwise.
CpuIsa parse_isa(const std::string& name, const char* argument);

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RESFAST_ISA_DISPATCH 1
template <typename F>
__attribute__((target("arch=x86-64-v4"), flatten)) void run_x86_64_v4(const F& f) {
  f();
}
template <typename F>
__attribute__((target("arch=x86-64-v3"), flatten)) void run_x86_64_v3(const F& f) {
  f();
}
#endif

template <typename F>
void run_with_best_isa(const F& f) {
#ifdef RESFAST_ISA_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::X86_64_V4:
      return run_x86_64_v4(f);
    case CpuIsa::X86_64_V3:
      return run_x86_64_v3(f);
    default:
      break;
  }
#endif
  f();
}

}  // namespace resfast::cpu
