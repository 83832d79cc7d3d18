#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace resfast::cpu {
namespace {

CpuIsa detect() {
#ifdef RESFAST_ISA_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::X86_64_V4;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::X86_64_V3;
#endif
  return CpuIsa::Baseline;
}

CpuIsa initial_cap() {
  const char* env = std::getenv("RESFAST_CPU_ISA");
  if (env == nullptr || *env == '\0') return hardware_isa();
  return std::min(parse_isa(env, "RESFAST_CPU_ISA"), hardware_isa());
}

std::atomic<CpuIsa>& cap() {
  static std::atomic<CpuIsa> value{initial_cap()};
  return value;
}

}  // namespace

CpuIsa hardware_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa cpu_isa() { return cap().load(std::memory_order_relaxed); }

CpuIsa set_cpu_isa(CpuIsa isa) { return cap().exchange(std::min(isa, hardware_isa())); }

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::X86_64_V4:
      return "x86-64-v4";
    case CpuIsa::X86_64_V3:
      return "x86-64-v3";
    default:
      return "baseline";
  }
}

CpuIsa parse_isa(const std::string& name, const char* argument) {
  for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::X86_64_V3, CpuIsa::X86_64_V4}) {
    if (name == isa_name(isa)) return isa;
  }
  TORCH_CHECK_VALUE(false, argument, ": expected one of \"baseline\", \"x86-64-v3\", \"x86-64-v4\", got \"", name,
                    "\"");
}

}  // namespace resfast::cpu
