// Shared by nvshmem_probe.cu and nvshmem_ep.cu (docs/design/internode.md §9, §11): the host shim that
// bootstraps NVSHMEM from a unique ID moved through our Store, and the device helpers for keyed waits.
// Include it from exactly one translation unit per shared library (it defines the C ABI entry points).
//
// Build (nvshmem_common.py does it): nvcc -O2 -std=c++17 -rdc=true -arch=sm_XX -Xcompiler -fPIC -shared X.cu
//   $NVSHMEM/lib/libnvshmem_device.a -I$NVSHMEM/include -L$NVSHMEM/lib -l:libnvshmem_host.so.3

#pragma once

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <stdint.h>
#include <string.h>

#include "mc_device_sync.cuh"

#define MC_API extern "C" __attribute__((visibility("default")))

namespace mc_nvs {

// Keys: epoch << 48 | seq << 16 | count.  A wait compares the bits above the count.
constexpr int kCountBits = 16;
constexpr uint64_t kCountMask = (1ull << kCountBits) - 1;

// The project's device helpers (csrc/mc_device_sync.cuh), on the unsigned signal words NVSHMEM uses.
__device__ __forceinline__ uint64_t now_ns() { return mc_sync::global_timer_ns(); }

__device__ __forceinline__ uint64_t ld_acquire_u64(const uint64_t* p) {
  return static_cast<uint64_t>(mc_sync::ld_acquire_sys(reinterpret_cast<const int64_t*>(p)));
}

__device__ __forceinline__ void st_release_u64(uint64_t* p, uint64_t v) {
  mc_sync::st_release_sys(reinterpret_cast<int64_t*>(p), static_cast<int64_t>(v));
}

// Spin until (*sig >> 16) >= (key >> 16), or `deadline_ns` (%globaltimer; 0 = no deadline) passes, or
// `stop` (may be null) becomes non-zero.  Returns the signal word that satisfied the key, 0 otherwise.
__device__ __forceinline__ uint64_t wait_key(const uint64_t* sig, uint64_t key, uint64_t deadline_ns,
                                             const volatile int* stop) {
  while (true) {
    const uint64_t v = ld_acquire_u64(sig);
    if ((v >> kCountBits) >= (key >> kCountBits)) return v;
    if ((deadline_ns != 0 && now_ns() > deadline_ns) || (stop != nullptr && *stop != 0)) return 0;
  }
}

}  // namespace mc_nvs

MC_API int mc_nvs_uid_size() { return (int)sizeof(nvshmemx_uniqueid_t); }

// Writes the 128-byte unique ID (a socket address of the bootstrap root) to `out`; returns NVSHMEM's status.
MC_API int mc_nvs_get_uid(uint8_t* out) {
  nvshmemx_uniqueid_t uid;
  memset(&uid, 0, sizeof(uid));
  const int st = nvshmemx_get_uniqueid(&uid);
  memcpy(out, &uid, sizeof(uid));
  return st;
}

// The body of the header's inline nvshmemx_init_attr(), minus its exit(-1): returns the status
// (0 = initialised; 1000 + s = nvshmemx_set_attr_uniqueid_args failed with s).
MC_API int mc_nvs_init(const uint8_t* uid_bytes, int rank, int npes) {
  nvshmemx_uniqueid_t uid;
  memcpy(&uid, uid_bytes, sizeof(uid));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int st = nvshmemx_set_attr_uniqueid_args(rank, npes, &uid, &attr);
  if (st != 0) return 1000 + st;
  int provided = 0;
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  nvshmemx_init_init_attr_ver_only(attr);
  return nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr,
                              version);
}

MC_API int mc_nvs_my_pe() { return nvshmem_my_pe(); }
MC_API int mc_nvs_n_pes() { return nvshmem_n_pes(); }

// Collective (every PE, same size): the only NVSHMEM collective the design calls after init.  Zero-filled;
// returns the local address, 0 on failure.
MC_API int64_t mc_nvs_malloc(int64_t bytes) {
  void* p = nvshmem_malloc((size_t)bytes);
  if (p != nullptr) cudaMemset(p, 0, (size_t)bytes);
  cudaDeviceSynchronize();
  return (int64_t)p;
}

// Collective; only while every PE is alive.
MC_API void mc_nvs_free(int64_t local) { nvshmem_free((void*)local); }

// PE `pe`'s copy of symmetric address `local` as a load/store pointer, 0 if not P2P-reachable.
MC_API int64_t mc_nvs_ptr(int64_t local, int pe) { return (int64_t)nvshmem_ptr((void*)local, pe); }

// Collective; the design skips it after a failure (it would wait for the dead PE).
MC_API void mc_nvs_finalize() { nvshmem_finalize(); }
