// Host-side helpers shared by the library's translation units: driver entry points and the calling
// thread's current device.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

// A driver entry point by name (false where the driver lacks it).
template <typename F>
inline bool entry(const char* name, F* fn) {
  cudaDriverEntryPointQueryResult found;
  void* p = nullptr;
#if CUDART_VERSION >= 12050
  const cudaError_t rc = cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found);
#else
  const cudaError_t rc = cudaGetDriverEntryPoint(name, &p, cudaEnableDefault, &found);
#endif
  if (rc != cudaSuccess || found != cudaDriverEntryPointSuccess) return false;
  *fn = reinterpret_cast<F>(p);
  return true;
}

// The calling thread's current device where it has a CUDA context current, else -1: a thread that never
// chose a device (the library's own threads), which must not be "given back" device 0 (that would create a
// context there on a host of several GPUs).
inline int thread_device() {
  static CUresult (*get_current)(CUcontext*) = [] {
    CUresult (*f)(CUcontext*) = nullptr;
    return entry("cuCtxGetCurrent", &f) ? f : nullptr;
  }();
  CUcontext ctx = nullptr;
  if (get_current == nullptr || get_current(&ctx) != CUDA_SUCCESS || ctx == nullptr) return -1;
  int device = -1;
  return cudaGetDevice(&device) == cudaSuccess ? device : -1;
}

// `device` current for a scope; the thread's former device back at its end, where it had one.
struct DeviceScope {
  int was;
  bool changed = false;
  cudaError_t err = cudaSuccess;
  explicit DeviceScope(int device) : was(thread_device()) {
    if (was != device) {
      err = cudaSetDevice(device);
      changed = err == cudaSuccess && was >= 0;
    }
  }
  ~DeviceScope() {
    if (changed) cudaSetDevice(was);
  }
};
