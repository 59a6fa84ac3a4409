// NVSHMEM probe for docs/design/internode.md (prototype; compiled here against the nvidia-nvshmem-cu13
// 3.4.5 headers, NOT run yet: it needs the GPU machine).  Plain C ABI, loaded with ctypes by
// nvshmem_probe.py, like csrc/'s libraries.
//
// What it exercises, from the design:
//   * UID bootstrap through our Store: the UID is 128 opaque bytes that Python moves through the TCPStore;
//     init goes through nvshmemi_init_thread directly, because the header's inline nvshmemx_init_attr()
//     calls exit(-1) on failure, and a failed init must become a status (so `auto` can fall back);
//   * the four transport operations of §2: direct(q) = nvshmem_ptr, put_signal = putmem_signal_nbi
//     (block scope) with a 64-bit key SET, and waits on the key with a %globaltimer deadline that clears
//     active[src] (§6) -- never nvshmem_quiet, never a collective after nvshmem_malloc;
//   * keys epoch << 48 | seq << 16 | count, compared on the bits above the count (§3).
//
// Build (nvshmem_probe.py does it):
//   nvcc -O2 -std=c++17 -rdc=true -arch=sm_90 -Xcompiler -fPIC -shared nvshmem_probe.cu
//        -I$NVSHMEM/include -L$NVSHMEM/lib -l:libnvshmem_device.a -l:libnvshmem_host.so.3 -o libmc_nvshmem_probe.so

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <stdint.h>
#include <string.h>

#define MC_API extern "C" __attribute__((visibility("default")))

namespace {

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t ld_acquire_u64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Per-PE symmetric region of one probe: sig[2][R] (uint64), then data[2][R][bytes]: one slot per source and
// round parity (in a ring a PE is at most one round ahead of its next, so it never writes a slot that
// the next PE is still checking).
struct Probe {
  uint64_t* sig;
  uint8_t* data;
  int64_t bytes;
};

// One round of the ring: PE p sends `bytes` (value pattern of (key, p)) to next = (p + 1) % n and waits
// for prev's key.  force_put: ignore nvshmem_ptr and take the remote path even for P2P peers.
// silent: this PE sends nothing (a peer that died before sending).  Writes status[0]: 0 ok, 1 timed
// out (active[prev] cleared), 2 wrong data; status[1]: 1 if the send went through a direct pointer.
__global__ void ring_kernel(Probe pr, uint64_t key, int force_put, int silent, int64_t timeout_ns,
                            int* active, int* status) {
  const int me = nvshmem_my_pe(), n = nvshmem_n_pes();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  const uint64_t count = (uint64_t)(pr.bytes & 0xFFFF);
  const int par = (int)((key >> 16) & 1);
  uint64_t* sigs = pr.sig + (int64_t)par * n;
  uint8_t* slots = pr.data + (int64_t)par * n * pr.bytes;
  uint8_t* src = slots + (int64_t)me * pr.bytes;  // my own slot doubles as the send buffer
  for (int64_t i = threadIdx.x; i < pr.bytes; i += blockDim.x) src[i] = (uint8_t)((key >> 16) * 31 + me + i);
  __syncthreads();
  if (!silent) {
    uint8_t* dst = src;  // same offset on next: its slot for source `me`
    uint64_t* sig = sigs + me;
    void* direct = force_put ? nullptr : nvshmem_ptr(dst, next);
    if (direct != nullptr) {
      for (int64_t i = threadIdx.x; i < pr.bytes; i += blockDim.x) ((uint8_t*)direct)[i] = src[i];
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();
        uint64_t* dsig = (uint64_t*)nvshmem_ptr(sig, next);
        asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(dsig), "l"(key | count) : "memory");
        status[1] = 1;
      }
    } else {
      nvshmemx_putmem_signal_nbi_block(dst, src, (size_t)pr.bytes, sig, key | count, NVSHMEM_SIGNAL_SET, next);
      if (threadIdx.x == 0) status[1] = 0;
    }
  }
  if (threadIdx.x == 0) {
    const uint64_t t0 = now_ns();
    int st = 0;
    while ((ld_acquire_u64(sigs + prev) >> 16) < (key >> 16)) {
      if (timeout_ns >= 0 && (int64_t)(now_ns() - t0) > timeout_ns) {
        active[prev] = 0;
        st = 1;
        break;
      }
    }
    if (st == 0 && (ld_acquire_u64(sigs + prev) & 0xFFFF) != count) st = 2;
    status[0] = st;
  }
  __syncthreads();
  if (status[0] == 0) {
    const uint8_t* got = slots + (int64_t)prev * pr.bytes;
    for (int64_t i = threadIdx.x; i < pr.bytes; i += blockDim.x)
      if (got[i] != (uint8_t)((key >> 16) * 31 + prev + i)) status[0] = 2;
  }
}

}  // namespace

MC_API int mc_nvs_uid_size() { return (int)sizeof(nvshmemx_uniqueid_t); }

MC_API int mc_nvs_get_uid(uint8_t* out) {
  nvshmemx_uniqueid_t uid;
  memset(&uid, 0, sizeof(uid));
  const int st = nvshmemx_get_uniqueid(&uid);
  memcpy(out, &uid, sizeof(uid));
  return st;
}

// The body of the header's inline nvshmemx_init_attr(), minus its exit(-1): returns the status.
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

// Collective (every PE, same size): the only NVSHMEM collective the design calls after init.
MC_API int64_t mc_nvs_malloc(int64_t bytes) {
  void* p = nvshmem_malloc((size_t)bytes);
  if (p != nullptr) cudaMemset(p, 0, (size_t)bytes);
  cudaDeviceSynchronize();
  return (int64_t)p;
}

MC_API int64_t mc_nvs_ptr(int64_t local, int pe) { return (int64_t)nvshmem_ptr((void*)local, pe); }

// Collective; the design skips it after a failure (it would wait for the dead PE).
MC_API void mc_nvs_finalize() { nvshmem_finalize(); }

// One ring round on the current device; returns cudaError, fills status[2] (host memory).
MC_API int mc_nvs_ring(int64_t base, int npes, int64_t bytes, uint64_t key, int force_put, int silent,
                       int64_t timeout_ns, int64_t active_dev, int* status_host) {
  Probe pr;
  pr.sig = (uint64_t*)base;
  pr.data = (uint8_t*)base + 16 * (int64_t)npes;
  pr.bytes = bytes;
  int* st = nullptr;
  cudaError_t err = cudaMalloc(&st, 2 * sizeof(int));
  if (err != cudaSuccess) return (int)err;
  cudaMemset(st, 0, 2 * sizeof(int));
  ring_kernel<<<1, 256>>>(pr, key, force_put, silent, timeout_ns, (int*)active_dev, st);
  // Complete this PE's puts before the send slot is rewritten next round.  The probe may: every PE is
  // alive (a "silent" PE only skips its send).  The design never quiets while a peer may be dead (§6).
  nvshmemx_quiet_on_stream(0);
  err = cudaDeviceSynchronize();
  if (err == cudaSuccess) err = cudaMemcpy(status_host, st, 2 * sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(st);
  return (int)err;
}
