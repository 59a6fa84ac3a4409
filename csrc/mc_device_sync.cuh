// Device-side signalling shared by the PG and EP kernels: the GPU's global clock and system-scope
// acquire / release accesses of 64-bit flag words (in device memory of any process on the host, or in
// host memory mapped into the device).
#pragma once

#include <stdint.h>

namespace mc_sync {

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ int64_t ld_acquire_sys(const int64_t* p) {
  int64_t v;
  asm volatile("ld.acquire.sys.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(int64_t* p, int64_t v) {
  asm volatile("st.release.sys.global.s64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

}  // namespace mc_sync
