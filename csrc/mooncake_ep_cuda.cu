// mooncake CUDA fast path: EP dispatch / combine over CUDA IPC, bit-for-bit the contract of
// docs/ep-semantics.md (model: mooncake/model/ep.py, mooncake/model/fp8.py).
//
// Plain C ABI (extern "C", raw pointers as int64, cudaStream_t passed as an int64) so the library
// is loaded with ctypes and never couples to torch's C++ ABI.  Build: mooncake/fast/cuda/build.py.
//
// Protocol (per rank, one IPC buffer that the peers map; offsets computed identically on every rank):
//   dsig[R]   int64  dispatch signal from source s: the sequence number of the last call s finished sending
//   csig[R]   int64  combine signal from owner o (same encoding)
//   dcount    int32  [2 halves][R sources][L]   rows source s sent to local expert l in this call
//   ddata            [2 halves][R sources][T*min(K,L) slots] x msg_stride   dispatch staging messages;
//                    source s's rows for this rank ordered by (local expert, token)
//   cdata     bf16   [2 halves][T][K][H]        combine rows, slot (token, top-k position)
// Sequence numbers live in a small local workspace (ws[0] = dispatch calls completed, ws[1] = combine
// calls completed), so a CUDA graph replay advances them too.  Call n uses half n & 1.  Signals are
// monotonic (>= n means delivered), so nothing is ever cleaned.
//
// Determinism: a sender places token t for expert e = q*L + l at slot (rows of its tokens for q's
// experts < l) + #{t' < t routed to e} (counts, no atomics); the receiver waits for every source (or
// its deadline), takes the exclusive prefix of the
// per-source counts in ascending source order and compacts the staging slots into the outputs.
// Atomics are only used to find the last finishing block of a kernel (completion, not placement).

#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cub/block/block_scan.cuh>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>

#include "mc_device_sync.cuh"
#include "mc_host_device.cuh"
#include "mc_fp8.cuh"

#define MC_API extern "C" __attribute__((visibility("default")))
#define MC_ABI_VERSION 12

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// Workspace slots (int64, local to the rank).
constexpr int WS_DSEQ = 0, WS_CSEQ = 1, WS_DFIN = 2, WS_CFIN = 3, WS_DHALF = 4, WS_CHALF = 5;

}  // namespace

// Everything a kernel needs; mirrored by mooncake/fast/cuda/lib.py (all int64, order matters).
struct McEpArgs {
  int64_t stream;
  int64_t rank, num_ranks, num_local_experts, num_experts, max_tokens, hidden, num_topk, num_tokens;
  int64_t use_fp8;
  int64_t timeout_ns;  // -1: no deadline
  int64_t peers;       // device int64[R]: base address of every rank's IPC buffer, mapped in this process
  int64_t local_base;  // this rank's IPC buffer
  int64_t ws;          // device int64[16] local control workspace
  int64_t tab;         // device int32[6*E+4] local table: begin | count | stage (each [L*R]) | rowbase[L] | total
                       //   (receive side), then counts[E] | pre[E] (send side, from the prologue)
  int64_t active;      // device int32[R] active_ranks (caller's, written in place)
  int64_t off_dsig, off_csig, off_dcount, off_ddata, off_cdata;
  int64_t msg_stride;  // bytes per dispatch staging slot (multiple of 16)
  int64_t half_dcount, half_ddata, half_cdata;  // bytes per half
  int64_t x;           // dispatch: [N, H] bf16; combine: [L, R*T, H] bf16 expert outputs
  int64_t topk;        // [N, K] int64
  int64_t weights;     // [N, K] float32 (combine)
  int64_t out;         // combine: [N, H] bf16
  int64_t recv_x, recv_scales, recv_count, src_info, layout_range;  // dispatch outputs
  int64_t grid_hint;   // blocks per kernel hint (SM count)
  int64_t src_k;       // [L, R*T] int32: top-k position of each received row at its source (handle)
  int64_t stage_cap;   // staging slots per source in a receiver's dispatch region (T * min(K, L))
  int64_t dead;        // int32[R] in pinned host memory: 1 = the host saw that rank's process die (or 0)
};

namespace {

using mc_sync::global_timer_ns;
using mc_sync::ld_acquire_sys;
using mc_sync::st_release_sys;

__device__ __forceinline__ int ld_volatile_int(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

// Wait until *sig >= seq, the deadline passes or the host reports the peer's process dead (*dead != 0);
// false on expiry / death (a signal that landed first still counts).
__device__ bool wait_signal(const int64_t* sig, int64_t seq, int64_t timeout_ns, const int* dead) {
  const uint64_t start = global_timer_ns();
  while (true) {
    if (ld_acquire_sys(sig) >= seq) return true;
    if ((timeout_ns >= 0 && (int64_t)(global_timer_ns() - start) > timeout_ns) ||
        (dead != nullptr && *reinterpret_cast<const volatile int*>(dead) != 0)) {
      return ld_acquire_sys(sig) >= seq;
    }
    __nanosleep(64);
  }
}

__device__ __forceinline__ const int* dead_flag(const McEpArgs& a, int r) {
  return a.dead ? reinterpret_cast<const int*>(a.dead) + r : nullptr;
}

__device__ __forceinline__ uint8_t* peer_ptr(const McEpArgs& a, int r) {
  return reinterpret_cast<uint8_t*>(reinterpret_cast<const int64_t*>(a.peers)[r]);
}

// Copy n int4 from src to dst with one warp, kUnroll loads in flight per lane (latency, not bandwidth,
// bounds a plain load->store loop).  kCg: read through L2 only (data written by other processes' kernels).
template <int kUnroll, bool kCg>
__device__ __forceinline__ void warp_copy(int4* __restrict__ dst, const int4* __restrict__ src, int n, int lane) {
  int i = lane;
  for (; i + (kUnroll - 1) * 32 < n; i += kUnroll * 32) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = kCg ? __ldcg(src + i + u * 32) : src[i + u * 32];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + u * 32] = v[u];
  }
  for (; i < n; i += 32) dst[i] = kCg ? __ldcg(src + i) : src[i];
}

// Block-wide exclusive prefix over vals[0..n) into out[0..n) (shared memory), returns the total.
// All threads of the block must call it.
__device__ int block_exclusive_scan(const int* vals_global_or_shared, int* out, int n, bool from_layout,
                                    const int64_t* layout, int R) {
  typedef cub::BlockScan<int, kThreads> Scan;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < n; base += kThreads) {
    const int l = base + threadIdx.x;
    int v = 0;
    if (l < n) {
      if (from_layout) {
        const int64_t p = layout[(int64_t)l * R + R - 1];
        v = (int)(p >> 32) + (int)(p & 0xffffffff);
      } else {
        v = vals_global_or_shared[l];
      }
    }
    int excl, agg;
    Scan(tmp).ExclusiveSum(v, excl, agg);
    if (l < n) out[l] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += agg;
    __syncthreads();
  }
  return carry;
}

// Largest l in [0, n) with base[l] <= f (base ascending, base[0] = 0).
__device__ __forceinline__ int find_segment(const int* base, int n, int f) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (base[mid] <= f) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// dispatch, send prologue (one block): rows per expert (counts) and their exclusive prefix over all
// experts (pre), so that a row for expert e = q*L + l starts at pre[e] - pre[q*L] in q's staging area.
__global__ void __launch_bounds__(kThreads) dispatch_prologue_kernel(McEpArgs a) {
  extern __shared__ int hist[];  // E ints
  const int E = (int)a.num_experts, K = (int)a.num_topk, N = (int)a.num_tokens;
  const int64_t* topk = reinterpret_cast<const int64_t*>(a.topk);
  int* counts_g = reinterpret_cast<int*>(a.tab) + 4 * E + 4;
  int* pre_g = counts_g + E;
  for (int e = threadIdx.x; e < E; e += kThreads) hist[e] = 0;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < (int64_t)N * K; j += kThreads) {
    const int64_t e = topk[j];
    if (e >= 0) atomicAdd(&hist[e], 1);  // counting only; order cannot matter
  }
  __syncthreads();
  block_exclusive_scan(hist, pre_g, E, false, nullptr, 0);
  for (int e = threadIdx.x; e < E; e += kThreads) counts_g[e] = hist[e];
}

// ---------------------------------------------------------------------------------------------
// dispatch, send phase: stage each token once in shared memory (quantized for FP8), then write it into
// the staging slot of every destination expert.  The last block to finish writes the per-expert counts
// and raises the per-source signal on every receiver.
template <bool kFp8>
__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(McEpArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_is_last;
  const int rank = (int)a.rank, R = (int)a.num_ranks, L = (int)a.num_local_experts, E = (int)a.num_experts;
  const int H = (int)a.hidden, K = (int)a.num_topk, N = (int)a.num_tokens;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int32_t* active = reinterpret_cast<int32_t*>(a.active);
  if (active[rank] == 0) return;  // a masked source sends nothing and raises no signal
  int64_t* ws = reinterpret_cast<int64_t*>(a.ws);
  const int64_t cur = ws[WS_DSEQ] + 1;
  const int half = (int)(cur & 1);
  const int64_t* topk = reinterpret_cast<const int64_t*>(a.topk);
  const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(a.x);
  const int S = H / 128;
  const int msg_bytes = kFp8 ? 16 + H + 4 * S : 16 + 2 * H;
  const int n16 = (msg_bytes + 15) / 16;
  uint8_t* msg = smem;                                                       // msg_stride bytes
  uint8_t* xrow = smem + a.msg_stride;                                       // 2H bytes (FP8 only)
  int* slots = reinterpret_cast<int*>(xrow + (kFp8 ? 2 * H : 0));             // K ints
  const int* counts = reinterpret_cast<const int*>(a.tab) + 4 * E + 4;         // from the prologue
  const int* pre = counts + E;

  for (int t = blockIdx.x; t < N; t += gridDim.x) {
    {  // the token row into shared memory, 4 loads in flight per thread
      const int4* src = reinterpret_cast<const int4*>(x + (int64_t)t * H);
      int4* dst = reinterpret_cast<int4*>(kFp8 ? xrow : msg + 16);
      const int n = H / 8;
      int i = tid;
      for (; i + 3 * kThreads < n; i += 4 * kThreads) {
        int4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = src[i + u * kThreads];
#pragma unroll
        for (int u = 0; u < 4; ++u) dst[i + u * kThreads] = v[u];
      }
      for (; i < n; i += kThreads) dst[i] = src[i];
    }
    // slot of (t, k) = number of earlier tokens routed to the same expert (no repeats within a row)
    for (int k = warp; k < K; k += kWarps) {
      const int64_t e = topk[(int64_t)t * K + k];
      int c = 0;
      if (e >= 0) {
        const int64_t end = (int64_t)t * K;
#pragma unroll 8
        for (int64_t j = lane; j < end; j += 32) c += (topk[j] == e) ? 1 : 0;
      }
      c = __reduce_add_sync(kFull, c);
      if (lane == 0) slots[k] = c;
    }
    __syncthreads();
    if (kFp8) {
      const __nv_bfloat16* xs = reinterpret_cast<const __nv_bfloat16*>(xrow);
      uint8_t* q = msg + 16;
      float* scale_inv_out = reinterpret_cast<float*>(msg + 16 + H);
      for (int b = warp; b < S; b += kWarps) {
        // lane handles channels b*128 + 4*lane .. +3
        const uint2 raw = *reinterpret_cast<const uint2*>(xs + b * 128 + 4 * lane);
        const __nv_bfloat162 p0 = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
        const __nv_bfloat162 p1 = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
        const float v[4] = {__low2float(p0), __high2float(p0), __low2float(p1), __high2float(p1)};
        float scale_inv;
        const uint32_t packed = mc_fp8_quantize_group(v, &scale_inv);
        *reinterpret_cast<uint32_t*>(q + b * 128 + 4 * lane) = packed;
        if (lane == 0) scale_inv_out[b] = scale_inv;
      }
      __syncthreads();
    }
    for (int k = 0; k < K; ++k) {
      const int64_t e = topk[(int64_t)t * K + k];
      if (e < 0) continue;
      const int q = (int)(e / L);
      const int stage = pre[e] - pre[q * L] + slots[k];
      int4* dst = reinterpret_cast<int4*>(peer_ptr(a, q) + a.off_ddata + half * a.half_ddata +
                                          ((int64_t)rank * a.stage_cap + stage) * a.msg_stride);
      const int4* src = reinterpret_cast<const int4*>(msg);
      for (int i = tid; i < n16; i += kThreads) dst[i] = i == 0 ? make_int4(t, k, 0, 0) : src[i];
    }
    __syncthreads();
  }

  // completion: every thread fences its writes; the last block publishes counts, then the signals
  __threadfence_system();
  __syncthreads();
  if (tid == 0) {
    const unsigned prev = atomicAdd(reinterpret_cast<unsigned*>(ws + WS_DFIN), 1u);
    s_is_last = (prev == gridDim.x - 1);
  }
  __syncthreads();
  if (!s_is_last) return;
  __threadfence_system();
  for (int e = tid; e < E; e += kThreads) {
    const int q = e / L, l = e % L;
    int* dc = reinterpret_cast<int*>(peer_ptr(a, q) + a.off_dcount + half * a.half_dcount) + rank * L + l;
    *reinterpret_cast<volatile int*>(dc) = counts[e];
  }
  __threadfence_system();
  __syncthreads();
  for (int q = tid; q < R; q += kThreads) {
    st_release_sys(reinterpret_cast<int64_t*>(peer_ptr(a, q) + a.off_dsig) + rank, cur);
  }
  if (tid == 0) *reinterpret_cast<unsigned*>(ws + WS_DFIN) = 0u;
}

// dispatch, receive phase 1 (one block): wait for every active source (deadline -> active[s] = 0),
// then lay out the blocks: exclusive prefix over sources in ascending order, per local expert, and the
// prefix of the experts' row counts (rowbase) for the compaction kernel.
// tab (int32): begin[L*R] | count[L*R] | rowbase[L] | total
__global__ void __launch_bounds__(kThreads) dispatch_wait_kernel(McEpArgs a) {
  extern __shared__ int contrib[];  // R ints
  const int R = (int)a.num_ranks, L = (int)a.num_local_experts, tid = threadIdx.x;
  int64_t* ws = reinterpret_cast<int64_t*>(a.ws);
  const int64_t cur = ws[WS_DSEQ] + 1;
  const int half = (int)(cur & 1);
  int32_t* active = reinterpret_cast<int32_t*>(a.active);
  const int64_t* dsig = reinterpret_cast<const int64_t*>(reinterpret_cast<uint8_t*>(a.local_base) + a.off_dsig);
  for (int s = tid; s < R; s += blockDim.x) {
    int c = 0;
    if (active[s] != 0) {
      if (wait_signal(dsig + s, cur, a.timeout_ns, dead_flag(a, s))) {
        c = 1;
      } else {
        active[s] = 0;
      }
    }
    contrib[s] = c;
  }
  __syncthreads();
  __threadfence_system();
  const int* dcount = reinterpret_cast<const int*>(reinterpret_cast<uint8_t*>(a.local_base) + a.off_dcount +
                                                   half * a.half_dcount);
  int* tab_begin = reinterpret_cast<int*>(a.tab);
  int* tab_count = tab_begin + L * R;
  int* tab_stage = tab_count + L * R;
  int* rowbase = tab_stage + L * R;
  int64_t* layout = reinterpret_cast<int64_t*>(a.layout_range);
  int* recv_count = reinterpret_cast<int*>(a.recv_count);
  for (int l = tid; l < L; l += blockDim.x) {
    int begin = 0;
    for (int s = 0; s < R; ++s) {
      const int c = contrib[s] ? ld_volatile_int(dcount + s * L + l) : 0;
      layout[(int64_t)l * R + s] = ((int64_t)begin << 32) | (int64_t)(uint32_t)c;
      tab_begin[l * R + s] = begin;
      tab_count[l * R + s] = c;
      begin += c;
    }
    recv_count[l] = begin;
  }
  for (int s = tid; s < R; s += blockDim.x) {  // where source s's rows for expert l start in its staging area
    int acc = 0;
    for (int l = 0; l < L; ++l) {
      tab_stage[l * R + s] = acc;
      acc += contrib[s] ? ld_volatile_int(dcount + s * L + l) : 0;
    }
  }
  __syncthreads();
  const int total = block_exclusive_scan(recv_count, rowbase, L, false, nullptr, R);
  if (tid == 0) {
    rowbase[L] = total;
    ws[WS_DHALF] = half;
    ws[WS_DSEQ] = cur;
  }
}

// dispatch, receive phase 2: compaction.  Every received row (flat over experts) is handled by one warp:
// row i of expert l lies in source s's block (begin_s <= i < begin_s + count_s), staging slot i - begin_s.
template <bool kFp8>
__global__ void __launch_bounds__(kThreads) dispatch_copy_kernel(McEpArgs a) {
  extern __shared__ int rowbase[];  // L + 1 ints
  const int R = (int)a.num_ranks, L = (int)a.num_local_experts, T = (int)a.max_tokens, H = (int)a.hidden;
  const int* tab_begin = reinterpret_cast<const int*>(a.tab);
  const int* tab_count = tab_begin + L * R;
  const int* tab_stage = tab_count + L * R;
  for (int l = threadIdx.x; l <= L; l += blockDim.x) rowbase[l] = tab_stage[L * R + l];
  __syncthreads();
  const int total = rowbase[L];
  const int half = (int)reinterpret_cast<const int64_t*>(a.ws)[WS_DHALF];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t RT = (int64_t)R * T;
  const int S = H / 128;
  const uint8_t* region = reinterpret_cast<const uint8_t*>(a.local_base) + a.off_ddata + half * a.half_ddata;
  int* src_info = reinterpret_cast<int*>(a.src_info);
  int* src_k = reinterpret_cast<int*>(a.src_k);
  for (int f = blockIdx.x * kWarps + warp; f < total; f += gridDim.x * kWarps) {
    const int l = find_segment(rowbase, L, f);
    const int i = f - rowbase[l];
    int s = 0;
    for (int r = 0; r < R; ++r) {
      const int b = tab_begin[l * R + r];
      if (i >= b && i < b + tab_count[l * R + r]) s = r;
    }
    const int j = i - tab_begin[l * R + s];
    const uint8_t* m = region + ((int64_t)s * a.stage_cap + tab_stage[l * R + s] + j) * a.msg_stride;
    const int64_t row = (int64_t)l * RT + i;
    if (lane == 0) {
      const int4 hdr = __ldcg(reinterpret_cast<const int4*>(m));
      src_info[row] = hdr.x;
      src_k[row] = hdr.y;
    }
    const int4* src = reinterpret_cast<const int4*>(m + 16);
    if (kFp8) {
      warp_copy<8, true>(reinterpret_cast<int4*>(reinterpret_cast<uint8_t*>(a.recv_x) + row * H), src, H / 16, lane);
      const float* sc = reinterpret_cast<const float*>(m + 16 + H);
      float* scales = reinterpret_cast<float*>(a.recv_scales);  // storage [L][S][R*T]
      for (int b = lane; b < S; b += 32) scales[((int64_t)l * S + b) * RT + i] = __ldcg(sc + b);
    } else {
      warp_copy<8, true>(reinterpret_cast<int4*>(reinterpret_cast<__nv_bfloat16*>(a.recv_x) + row * H), src, H / 8,
                         lane);
    }
  }
}

// combine, send phase (expert owner): every valid row (flat over local experts) goes back to the source
// whose block covers it, at slot (global expert, token) of that rank's combine region.
__global__ void __launch_bounds__(kThreads) combine_send_kernel(McEpArgs a) {
  extern __shared__ int rowbase[];  // L ints
  __shared__ int s_is_last;
  const int rank = (int)a.rank, R = (int)a.num_ranks, L = (int)a.num_local_experts, T = (int)a.max_tokens;
  const int H = (int)a.hidden;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int32_t* active = reinterpret_cast<int32_t*>(a.active);
  if (active[rank] == 0) return;  // a masked owner sends nothing; nobody waits for it
  int64_t* ws = reinterpret_cast<int64_t*>(a.ws);
  const int64_t cur = ws[WS_CSEQ] + 1;
  const int half = (int)(cur & 1);
  const int64_t RT = (int64_t)R * T;
  const int64_t* layout = reinterpret_cast<const int64_t*>(a.layout_range);
  const int* src_info = reinterpret_cast<const int*>(a.src_info);
  const int* src_k = reinterpret_cast<const int*>(a.src_k);
  const int K = (int)a.num_topk;
  const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(a.x);
  const int total = block_exclusive_scan(nullptr, rowbase, L, true, layout, R);
  for (int f = blockIdx.x * kWarps + warp; f < total; f += gridDim.x * kWarps) {
    const int l = find_segment(rowbase, L, f);
    const int i = f - rowbase[l];
    int d = -1;
    for (int s = 0; s < R; ++s) {
      const int64_t p = layout[(int64_t)l * R + s];
      const int b = (int)(p >> 32), c = (int)(p & 0xffffffff);
      if (i >= b && i < b + c) d = s;
    }
    if (d < 0 || active[d] == 0) continue;
    const int t = src_info[(int64_t)l * RT + i], k = src_k[(int64_t)l * RT + i];
    int4* dst = reinterpret_cast<int4*>(peer_ptr(a, d) + a.off_cdata + half * a.half_cdata +
                                        ((int64_t)t * K + k) * (2 * (int64_t)H));
    warp_copy<8, false>(dst, reinterpret_cast<const int4*>(x + ((int64_t)l * RT + i) * H), H / 8, lane);
  }
  __threadfence_system();
  __syncthreads();
  if (tid == 0) {
    const unsigned prev = atomicAdd(reinterpret_cast<unsigned*>(ws + WS_CFIN), 1u);
    s_is_last = (prev == gridDim.x - 1);
  }
  __syncthreads();
  if (!s_is_last) return;
  __threadfence_system();
  for (int d = tid; d < R; d += kThreads) {
    if (active[d] != 0) st_release_sys(reinterpret_cast<int64_t*>(peer_ptr(a, d) + a.off_csig) + rank, cur);
  }
  if (tid == 0) *reinterpret_cast<unsigned*>(ws + WS_CFIN) = 0u;
}

// combine, receive phase 1 (one block, token owner): wait for every active owner.
__global__ void __launch_bounds__(kThreads) combine_wait_kernel(McEpArgs a) {
  const int rank = (int)a.rank, R = (int)a.num_ranks, tid = threadIdx.x;
  int64_t* ws = reinterpret_cast<int64_t*>(a.ws);
  const int64_t cur = ws[WS_CSEQ] + 1;
  const int half = (int)(cur & 1);
  int32_t* active = reinterpret_cast<int32_t*>(a.active);
  const int64_t* csig = reinterpret_cast<const int64_t*>(reinterpret_cast<uint8_t*>(a.local_base) + a.off_csig);
  if (active[rank] != 0) {  // a masked rank's tokens were not dispatched: nothing comes back
    for (int o = tid; o < R; o += blockDim.x) {
      if (active[o] != 0 && !wait_signal(csig + o, cur, a.timeout_ns, dead_flag(a, o))) active[o] = 0;
    }
  }
  __syncthreads();
  __threadfence_system();
  if (tid == 0) {
    ws[WS_CHALF] = half;
    ws[WS_CSEQ] = cur;
  }
}

// combine, receive phase 2: acc = +0; for k in top-k order: acc = fl32(acc + fl32(y * w)); bf16 once.
// The K rows of a token are loaded 8 at a time before accumulating (order of the adds unchanged).
__global__ void combine_reduce_kernel(McEpArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int rank = (int)a.rank, L = (int)a.num_local_experts, H = (int)a.hidden;
  const int K = (int)a.num_topk, N = (int)a.num_tokens;
  const int32_t* active = reinterpret_cast<const int32_t*>(a.active);
  const int half = (int)reinterpret_cast<const int64_t*>(a.ws)[WS_CHALF];
  const bool me_active = active[rank] != 0;
  const int64_t* topk = reinterpret_cast<const int64_t*>(a.topk);
  const float* weights = reinterpret_cast<const float*>(a.weights);
  const int4* region = reinterpret_cast<const int4*>(reinterpret_cast<const uint8_t*>(a.local_base) + a.off_cdata +
                                                     half * a.half_cdata);
  int4* out = reinterpret_cast<int4*>(a.out);
  float* s_w = reinterpret_cast<float*>(smem);          // K weights
  int* s_e = reinterpret_cast<int*>(s_w + K);           // K experts, -1 = skipped
  const int H8 = H / 8;
  for (int t = blockIdx.x; t < N; t += gridDim.x) {
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t e = topk[(int64_t)t * K + k];
      const bool take = e >= 0 && me_active && active[e / L] != 0;
      s_e[k] = take ? (int)e : -1;
      s_w[k] = weights[(int64_t)t * K + k];
    }
    __syncthreads();
    for (int c = threadIdx.x; c < H8; c += blockDim.x) {
      float acc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
      for (int k0 = 0; k0 < K; k0 += 8) {
        int4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int k = k0 + u;
          const int e = k < K ? s_e[k] : -1;
          if (e >= 0) v[u] = __ldcg(region + ((int64_t)t * K + k) * H8 + c);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int k = k0 + u;
          const int e = k < K ? s_e[k] : -1;
          if (e < 0) continue;
          const float w = s_w[k];
          const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v[u]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(p[j]);
            acc[2 * j] = __fadd_rn(acc[2 * j], __fmul_rn(f.x, w));
            acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], __fmul_rn(f.y, w));
          }
        }
      }
      int4 r;
      __nv_bfloat162* q = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
      for (int j = 0; j < 4; ++j) q[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
      out[(int64_t)t * H8 + c] = r;
    }
    __syncthreads();
  }
}

// A call this rank rejected still counts (docs/ep-semantics.md): advance its sequence number so the next
// call uses the same number and half as on the other ranks.  which: 0 dispatch, 1 combine.
__global__ void skip_call_kernel(int64_t* ws, int which) { ws[which == 0 ? WS_DSEQ : WS_CSEQ] += 1; }

// Small self-test kernel: FP8-quantize rows exactly as dispatch does (used by the unit tests).
__global__ void __launch_bounds__(kThreads) quantize_kernel(const __nv_bfloat16* x, uint8_t* q, float* scale_inv,
                                                            int N, int H) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, S = H / 128;
  for (int t = blockIdx.x; t < N; t += gridDim.x) {
    for (int b = warp; b < S; b += kWarps) {
      const __nv_bfloat16* xr = x + (int64_t)t * H + b * 128 + 4 * lane;
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = __bfloat162float(xr[i]);
      float group_scale_inv;
      const uint32_t packed = mc_fp8_quantize_group(v, &group_scale_inv);
#pragma unroll
      for (int i = 0; i < 4; ++i) q[(int64_t)t * H + b * 128 + 4 * lane + i] = (uint8_t)(packed >> (8 * i));
      if (lane == 0) scale_inv[(int64_t)t * S + b] = group_scale_inv;
    }
  }
}

inline cudaStream_t stream_of(const McEpArgs* a) { return reinterpret_cast<cudaStream_t>(a->stream); }

inline int blocks_for(int64_t work, int64_t hint) {
  int64_t b = work < 1 ? 1 : work;
  const int64_t cap = (hint > 0 ? hint : 132) * 4;
  return (int)(b < cap ? b : cap);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// C ABI

MC_API int mc_abi_version(void) { return MC_ABI_VERSION; }
MC_API int mc_cudart_version(void) { return CUDART_VERSION; }
MC_API int mc_ep_args_size(void) { return (int)sizeof(McEpArgs); }
MC_API const char* mc_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

MC_API int mc_driver_version(int* version) { return (int)cudaDriverGetVersion(version); }
MC_API int mc_device_count(int* count) { return (int)cudaGetDeviceCount(count); }
MC_API int mc_set_device(int device) { return (int)cudaSetDevice(device); }
MC_API int mc_get_device(int* device) { return (int)cudaGetDevice(device); }
MC_API int mc_sm_count(int device, int* count) {
  return (int)cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

// Run op(stream) on a private non-blocking stream of `device` and wait for it: no device-wide synchronisation,
// allowed while this or another thread captures a graph (relaxed capture mode for the call); the thread's
// current device is kept (DeviceScope).
template <typename Op>
static cudaError_t on_private_stream(int device, Op op) {
  DeviceScope scope(device);
  cudaError_t err = scope.err;
  if (err != cudaSuccess) return err;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  cudaStream_t s = nullptr;
  err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (err == cudaSuccess) {
    err = op(s);
    const cudaError_t done = cudaStreamSynchronize(s);
    if (err == cudaSuccess) err = done;
    cudaStreamDestroy(s);
  }
  cudaThreadExchangeStreamCaptureMode(&mode);
  return err;
}

static cudaError_t zero_device_memory(int device, void* p, size_t bytes) {
  return on_private_stream(device, [&](cudaStream_t s) { return cudaMemsetAsync(p, 0, bytes, s); });
}

// ---- shareable device memory (CUDA virtual memory management)
//
// Memory another process maps for as long as it keeps the mapping, also after the exporting process died:
// cuMemCreate'd physical memory is reference counted, and an importer's mapping holds a reference (memory
// shared by cudaIpcGetMemHandle is freed with its exporter, and a survivor reading it faults).  The
// exporter gets a POSIX file descriptor (handed to peers over a Unix socket, mooncake/fast/cuda/shared.py).
// Driver entry points are looked up through the runtime, so the library needs no link to libcuda.  Return
// values are CUresult codes (mc_driver_error_string).

namespace {

struct Vmm {
  CUresult (*create)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long);
  CUresult (*reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
  CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
  CUresult (*export_handle)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType, unsigned long long);
  CUresult (*import_handle)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType);
  CUresult (*release)(CUmemGenericAllocationHandle);
  CUresult (*unmap)(CUdeviceptr, size_t);
  CUresult (*address_free)(CUdeviceptr, size_t);
  CUresult (*granularity)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags);
  CUresult (*error_string)(CUresult, const char**);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*attribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*can_access_peer)(int*, CUdevice, CUdevice);
  CUresult (*properties)(CUmemAllocationProp*, CUmemGenericAllocationHandle);
  bool ok;
};

const Vmm& vmm() {
  static const Vmm v = [] {
    Vmm d{};
    d.ok = entry("cuMemCreate", &d.create) && entry("cuMemAddressReserve", &d.reserve) && entry("cuMemMap", &d.map) &&
           entry("cuMemSetAccess", &d.set_access) && entry("cuMemExportToShareableHandle", &d.export_handle) &&
           entry("cuMemImportFromShareableHandle", &d.import_handle) && entry("cuMemRelease", &d.release) &&
           entry("cuMemUnmap", &d.unmap) && entry("cuMemAddressFree", &d.address_free) &&
           entry("cuMemGetAllocationGranularity", &d.granularity) && entry("cuGetErrorString", &d.error_string) &&
           entry("cuDeviceGet", &d.device_get) && entry("cuDeviceGetAttribute", &d.attribute) &&
           entry("cuDeviceCanAccessPeer", &d.can_access_peer) &&
           entry("cuMemGetAllocationPropertiesFromHandle", &d.properties);
    return d;
  }();
  return v;
}

CUmemAllocationProp vmm_prop(int device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return prop;
}

// Reserve an address range for `h` (size bytes), map it and let `device` read and write it.
CUresult vmm_map(const Vmm& v, CUmemGenericAllocationHandle h, size_t size, size_t align, int device, int64_t* ptr) {
  CUdeviceptr va = 0;
  CUresult rc = v.reserve(&va, size, align, 0, 0);
  if (rc != CUDA_SUCCESS) return rc;
  rc = v.map(va, size, 0, h, 0);
  if (rc != CUDA_SUCCESS) {
    v.address_free(va, size);
    return rc;
  }
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  rc = v.set_access(va, size, &access, 1);
  if (rc != CUDA_SUCCESS) {
    v.unmap(va, size);
    v.address_free(va, size);
    return rc;
  }
  *ptr = static_cast<int64_t>(va);
  return CUDA_SUCCESS;
}

}  // namespace

MC_API const char* mc_driver_error_string(int code) {
  const char* s = nullptr;
  if (!vmm().ok || vmm().error_string(static_cast<CUresult>(code), &s) != CUDA_SUCCESS || s == nullptr)
    return "unknown CUDA driver error";
  return s;
}

// Whether `device` can share memory this way: 1 yes, 0 no (*why: 1 no driver entry points, 2 no virtual
// memory management, 3 no POSIX file-descriptor handles, 4 the driver does not know the device).
MC_API int mc_vmm_supported(int device, int* why) {
  const Vmm& v = vmm();
  CUdevice dev = 0;
  int vmm_ok = 0, fd_ok = 0;
  *why = 0;
  if (!v.ok) *why = 1;
  else if (v.device_get(&dev, device) != CUDA_SUCCESS) *why = 4;
  else if (v.attribute(&vmm_ok, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev) != CUDA_SUCCESS ||
           !vmm_ok)
    *why = 2;
  else if (v.attribute(&fd_ok, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev) != CUDA_SUCCESS ||
           !fd_ok)
    *why = 3;
  return *why == 0;
}

// Whether a process on `device` can map memory that lives on `peer` (peer-to-peer access over NVLink or
// PCIe): 1 yes, 0 no, negative: the driver could not say.  A device reaches its own memory.
MC_API int mc_vmm_peer_access(int device, int peer) {
  if (device == peer) return 1;
  const Vmm& v = vmm();
  CUdevice a = 0, b = 0;
  int ok = 0;
  if (!v.ok || v.device_get(&a, device) != CUDA_SUCCESS || v.device_get(&b, peer) != CUDA_SUCCESS ||
      v.can_access_peer(&ok, a, b) != CUDA_SUCCESS)
    return -1;
  return ok ? 1 : 0;
}

// The 16 bytes of `device`'s UUID into out: the same in every process that sees the GPU, whatever its
// ordinal there (CUDA_VISIBLE_DEVICES).
MC_API int mc_device_uuid(int device, unsigned char* out) {
  static CUresult (*get_uuid)(CUuuid*, CUdevice) = [] {
    CUresult (*f)(CUuuid*, CUdevice) = nullptr;
    return entry("cuDeviceGetUuid", &f) ? f : nullptr;
  }();
  const Vmm& v = vmm();
  if (get_uuid == nullptr || !v.ok) return CUDA_ERROR_NOT_SUPPORTED;
  CUdevice dev = 0;
  CUuuid id;
  CUresult rc = v.device_get(&dev, device);
  if (rc == CUDA_SUCCESS) rc = get_uuid(&id, dev);
  if (rc == CUDA_SUCCESS) memcpy(out, id.bytes, sizeof(id.bytes));
  return rc;
}

// At least `bytes` of zeroed memory on `device`, mapped here at *ptr (*size bytes: rounded up to the
// allocation granularity) and exported as the file descriptor *fd (the caller closes it).
MC_API int mc_vmm_alloc(int device, int64_t bytes, int64_t* ptr, int64_t* size, int* fd) {
  const Vmm& v = vmm();
  if (!v.ok) return CUDA_ERROR_NOT_SUPPORTED;
  if (bytes <= 0) return CUDA_ERROR_INVALID_VALUE;
  const CUmemAllocationProp prop = vmm_prop(device);
  size_t gran = 0;
  CUresult rc = v.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  if (rc != CUDA_SUCCESS) return rc;
  const size_t n = (static_cast<size_t>(bytes) + gran - 1) / gran * gran;
  CUmemGenericAllocationHandle h;
  rc = v.create(&h, n, &prop, 0);
  if (rc != CUDA_SUCCESS) return rc;
  int64_t va = 0;
  rc = vmm_map(v, h, n, gran, device, &va);
  int out_fd = -1;
  if (rc == CUDA_SUCCESS) rc = v.export_handle(&out_fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
  v.release(h);  // the mapping and the descriptor keep the memory
  if (rc == CUDA_SUCCESS) {
    if (zero_device_memory(device, reinterpret_cast<void*>(va), n) != cudaSuccess) rc = CUDA_ERROR_UNKNOWN;
  }
  if (rc != CUDA_SUCCESS) {
    if (out_fd >= 0) close(out_fd);
    if (va) {
      v.unmap(static_cast<CUdeviceptr>(va), n);
      v.address_free(static_cast<CUdeviceptr>(va), n);
    }
    return rc;
  }
  *ptr = va;
  *size = static_cast<int64_t>(n);
  *fd = out_fd;
  return CUDA_SUCCESS;
}

// Map `size` bytes of memory exported by mc_vmm_alloc (as `fd`, in this process now; the caller closes it)
// at *ptr, for `device` to read and write.
MC_API int mc_vmm_import(int device, int fd, int64_t size, int64_t* ptr) {
  const Vmm& v = vmm();
  if (!v.ok) return CUDA_ERROR_NOT_SUPPORTED;
  if (size <= 0 || fd < 0) return CUDA_ERROR_INVALID_VALUE;
  CUmemGenericAllocationHandle h;
  CUresult rc = v.import_handle(&h, reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
                                CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
  if (rc != CUDA_SUCCESS) return rc;
  CUmemAllocationProp prop{};  // the allocation's own (its owner's device): the alignment it was made with
  size_t gran = 0;
  rc = v.properties(&prop, h);
  if (rc == CUDA_SUCCESS) rc = v.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  if (rc == CUDA_SUCCESS) rc = vmm_map(v, h, static_cast<size_t>(size), gran, device, ptr);
  v.release(h);
  return rc;
}

MC_API int mc_vmm_free(int64_t ptr, int64_t size) {
  const Vmm& v = vmm();
  if (!v.ok) return CUDA_ERROR_NOT_SUPPORTED;
  CUresult rc = v.unmap(static_cast<CUdeviceptr>(ptr), static_cast<size_t>(size));
  const CUresult freed = v.address_free(static_cast<CUdeviceptr>(ptr), static_cast<size_t>(size));
  return rc != CUDA_SUCCESS ? rc : freed;
}

// ---- a pool of shareable memory for torch.cuda.MemPool (torch.cuda.memory.CUDAPluggableAllocator)
//
// Tensors allocated from it lie in memory a peer process can map (mc_vmm_alloc's), so the PG plane reads
// and writes them in place (mooncake/fast/cuda/pool.py).  Each segment torch asks for is one allocation; its
// descriptor stays open here until the segment is freed, and its id tells a reused address from the old one.

namespace {
struct PoolSegment {
  int64_t size;
  int fd;
  int64_t id;
};
std::mutex pool_mutex;
std::map<int64_t, PoolSegment> pool_segments;  // by base address
int64_t pool_next_id = 1;
}  // namespace

MC_API void* mc_pool_alloc(ssize_t size, int device, cudaStream_t) {
  int64_t ptr = 0, got = 0;
  int fd = -1;
  if (size <= 0 || mc_vmm_alloc(device, size, &ptr, &got, &fd) != CUDA_SUCCESS) return nullptr;
  std::lock_guard<std::mutex> lock(pool_mutex);
  pool_segments[ptr] = PoolSegment{got, fd, pool_next_id++};
  return reinterpret_cast<void*>(ptr);
}

MC_API void mc_pool_free(void* ptr, ssize_t, int, cudaStream_t stream) {
  PoolSegment seg{};
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    auto it = pool_segments.find(reinterpret_cast<int64_t>(ptr));
    if (it == pool_segments.end()) return;
    seg = it->second;
    pool_segments.erase(it);
  }
  cudaStreamSynchronize(stream);  // work of this process still using it; peers' mappings keep their own reference
  close(seg.fd);
  mc_vmm_free(reinterpret_cast<int64_t>(ptr), seg.size);
}

// The pool segment holding device address `addr`: 1 and its base, size, a duplicate of its descriptor (the
// caller closes it; fd -1 if none could be made) and id; 0 if `addr` is not in the pool's memory.
MC_API int mc_pool_find(int64_t addr, int64_t* base, int64_t* size, int* fd, int64_t* id) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  auto it = pool_segments.upper_bound(addr);
  if (it == pool_segments.begin()) return 0;
  --it;
  if (addr >= it->first + it->second.size) return 0;
  *base = it->first;
  *size = it->second.size;
  *fd = dup(it->second.fd);
  *id = it->second.id;
  return 1;
}

// ---- holds: how many CUDA graphs still use something (a peer's pool memory a captured op reads)
//
// A hold is a count the caller owns one reference of; mc_hold_graph adds one for the graph that `stream`
// is capturing, through a CUDA user object the graph (and every executable made from it) keeps until it is
// destroyed and its launches are over.  mc_hold_graphs says how many graphs hold it now; mc_hold_drop gives
// the caller's reference back (the hold is freed with its last reference, also from CUDA's thread).

namespace {
struct Hold {
  std::atomic<int64_t> refs{1};
};

void hold_release(void* p) {
  Hold* h = static_cast<Hold*>(p);
  if (h->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete h;
}
}  // namespace

MC_API int64_t mc_hold_new(void) { return reinterpret_cast<int64_t>(new Hold()); }

MC_API int64_t mc_hold_graphs(int64_t hold) {
  return reinterpret_cast<Hold*>(hold)->refs.load(std::memory_order_acquire) - 1;
}

MC_API void mc_hold_drop(int64_t hold) { hold_release(reinterpret_cast<Hold*>(hold)); }

MC_API int mc_hold_graph(int64_t hold, int64_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
#if CUDART_VERSION >= 13000
  cudaError_t rc = cudaStreamGetCaptureInfo(reinterpret_cast<cudaStream_t>(stream), &status, nullptr, &graph,
                                            nullptr, nullptr, nullptr);
#else
  cudaError_t rc = cudaStreamGetCaptureInfo_v2(reinterpret_cast<cudaStream_t>(stream), &status, nullptr, &graph,
                                               nullptr, nullptr);
#endif
  if (rc != cudaSuccess) {
    cudaGetLastError();  // a failure here must not surface at the caller's next launch check
    return (int)rc;
  }
  if (status != cudaStreamCaptureStatusActive || graph == nullptr) return (int)cudaErrorStreamCaptureUnmatched;
  Hold* h = reinterpret_cast<Hold*>(hold);
  h->refs.fetch_add(1, std::memory_order_acq_rel);
  cudaUserObject_t object;
  rc = cudaUserObjectCreate(&object, h, hold_release, 1, cudaUserObjectNoDestructorSync);
  if (rc != cudaSuccess) {
    cudaGetLastError();
    hold_release(h);
    return (int)rc;
  }
  rc = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
  if (rc != cudaSuccess) {
    cudaGetLastError();
    cudaUserObjectRelease(object, 1);  // its destructor gives the reference back
  }
  return (int)rc;
}

// One int64 word of device memory of `device` to / from the host, from any thread, on a private stream
// (nothing else is waited for: a kernel may be spinning on the word).
static int copy_word(int device, void* dst, const void* src, cudaMemcpyKind kind) {
  return (int)on_private_stream(device, [&](cudaStream_t s) {
    return cudaMemcpyAsync(dst, src, sizeof(int64_t), kind, s);
  });
}

MC_API int mc_store64(int device, int64_t dst, int64_t value) {
  return copy_word(device, reinterpret_cast<void*>(dst), &value, cudaMemcpyHostToDevice);
}

MC_API int mc_load64(int device, int64_t src, int64_t* value) {
  return copy_word(device, value, reinterpret_cast<const void*>(src), cudaMemcpyDeviceToHost);
}

// phase bit 1: send; bit 2: receive (wait + compaction)
static int set_smem(const void* fn, size_t smem) {
  if (smem <= 48 * 1024) return 0;
  return (int)cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

// phase bit 1: send; bit 2: receive (wait + compaction)
MC_API int mc_ep_dispatch(const McEpArgs* a, int phase) {
  if (a->hidden % 8 != 0 || (a->use_fp8 && a->hidden % 128 != 0)) return (int)cudaErrorInvalidValue;
  const cudaStream_t st = stream_of(a);
  const int64_t hint = a->grid_hint > 0 ? a->grid_hint : 132;
  if (phase & 1) {
    const int64_t K4 = (a->num_topk + 3) & ~int64_t(3);
    const size_t smem = (size_t)(a->msg_stride + (a->use_fp8 ? 2 * a->hidden : 0) + 4 * K4);
    const int grid = blocks_for(a->num_tokens, hint);
    int rc;
    if ((rc = set_smem((const void*)dispatch_prologue_kernel, sizeof(int) * a->num_experts))) return rc;
    dispatch_prologue_kernel<<<1, kThreads, sizeof(int) * a->num_experts, st>>>(*a);
    if (a->use_fp8) {
      if ((rc = set_smem((const void*)dispatch_send_kernel<true>, smem))) return rc;
      dispatch_send_kernel<true><<<grid, kThreads, smem, st>>>(*a);
    } else {
      if ((rc = set_smem((const void*)dispatch_send_kernel<false>, smem))) return rc;
      dispatch_send_kernel<false><<<grid, kThreads, smem, st>>>(*a);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return (int)err;
  }
  if (phase & 2) {
    dispatch_wait_kernel<<<1, kThreads, sizeof(int) * a->num_ranks, st>>>(*a);
    const size_t smem = sizeof(int) * (a->num_local_experts + 1);
    int rc;
    if (a->use_fp8) {
      if ((rc = set_smem((const void*)dispatch_copy_kernel<true>, smem))) return rc;
      dispatch_copy_kernel<true><<<(unsigned)(2 * hint), kThreads, smem, st>>>(*a);
    } else {
      if ((rc = set_smem((const void*)dispatch_copy_kernel<false>, smem))) return rc;
      dispatch_copy_kernel<false><<<(unsigned)(2 * hint), kThreads, smem, st>>>(*a);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return (int)err;
  }
  return 0;
}

MC_API int mc_ep_combine(const McEpArgs* a, int phase) {
  if (a->hidden % 8 != 0) return (int)cudaErrorInvalidValue;
  const cudaStream_t st = stream_of(a);
  const int64_t hint = a->grid_hint > 0 ? a->grid_hint : 132;
  if (phase & 1) {
    const size_t smem = sizeof(int) * (a->num_local_experts + 1);
    int rc;
    if ((rc = set_smem((const void*)combine_send_kernel, smem))) return rc;
    combine_send_kernel<<<(unsigned)(2 * hint), kThreads, smem, st>>>(*a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return (int)err;
  }
  if (phase & 2) {
    combine_wait_kernel<<<1, kThreads, 0, st>>>(*a);
    int threads = (int)((a->hidden / 8 + 31) / 32 * 32);
    threads = threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
    const size_t smem = 8 * (size_t)a->num_topk;
    combine_reduce_kernel<<<blocks_for(a->num_tokens, hint), threads, smem, st>>>(*a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return (int)err;
  }
  return 0;
}

MC_API int mc_ep_skip(int64_t ws, int which, int64_t stream) {
  skip_call_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(reinterpret_cast<int64_t*>(ws), which);
  return (int)cudaGetLastError();
}

MC_API int mc_quantize_fp8(int64_t x, int64_t q, int64_t scale_inv, int64_t num_tokens, int64_t hidden,
                           int64_t stream) {
  if (hidden % 128 != 0) return (int)cudaErrorInvalidValue;
  if (num_tokens == 0) return 0;
  quantize_kernel<<<blocks_for(num_tokens, 132), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const __nv_bfloat16*>(x), reinterpret_cast<uint8_t*>(q), reinterpret_cast<float*>(scale_inv),
      (int)num_tokens, (int)hidden);
  return (int)cudaGetLastError();
}
