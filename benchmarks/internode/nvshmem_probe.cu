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
// Build: nvshmem_common.py (see nvshmem_common.cuh, which holds the bootstrap shim).

#include "nvshmem_common.cuh"

namespace {

using mc_nvs::kCountMask;

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
  const uint64_t count = (uint64_t)pr.bytes & kCountMask;
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
        mc_nvs::st_release_u64(dsig, key | count);
        status[1] = 1;
      }
    } else {
      nvshmemx_putmem_signal_nbi_block(dst, src, (size_t)pr.bytes, sig, key | count, NVSHMEM_SIGNAL_SET, next);
      if (threadIdx.x == 0) status[1] = 0;
    }
  }
  if (threadIdx.x == 0) {
    const uint64_t deadline_ns = timeout_ns >= 0 ? mc_nvs::now_ns() + (uint64_t)timeout_ns : 0;
    const uint64_t got = mc_nvs::wait_key(sigs + prev, key, deadline_ns, nullptr);
    int st = 0;
    if (got == 0) {
      active[prev] = 0;
      st = 1;
    } else if ((got & kCountMask) != count) {
      st = 2;
    }
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
