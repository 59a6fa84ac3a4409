// EP dispatch/combine over NVSHMEM, the protocol of docs/design/internode.md §3-§4 as a prototype
// (compiled against the nvidia-nvshmem-cu13 3.4.5 headers; see §11 for what has run).  Plain C ABI,
// loaded with ctypes by nvshmem_ep.py; the bootstrap shim is nvshmem_common.cuh.
//
// Symbols as mooncake/model/ep.py: R ranks (PEs), E experts, L = E / R, T max tokens per rank, H hidden,
// K top-k, N <= T tokens on this rank, S = H / 128.  cap = T * min(K, L) rows per (source, receiver),
// msg = align16(16 + 2H) bytes per dispatch row: a 16-byte header (int32 token, 12 reserved) then
// bf16 [H], or fp8 [H] followed by float32 scales [S].
//
// Placement is the model's by construction: the sender numbers its rows for expert e = q*L + l by
// ascending token (slot), and lays the blocks of receiver q out by (l, token) -- that is also the order
// of q's rows from this source inside each local expert; the receiver lays sources out in ascending rank
// order (exclusive prefix over the sources that delivered).  No atomics decide a position.
//
// Signals are keys, not flags: epoch << 48 | seq << 16 | count, SET once per (half, expert block, peer)
// and compared on the bits above the count, so nothing is ever cleaned and an old call's signal never
// satisfies a newer wait.  Each wait has a %globaltimer deadline; a source (dispatch) or expert owner
// (combine) counts only if all L of its signals arrived, else its bit in active_ranks is cleared and it
// contributes nothing.  No nvshmem_quiet and no NVSHMEM collective between create and destroy.

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "mc_fp8.cuh"
#include "nvshmem_common.cuh"

namespace {

using mc_nvs::kCountMask;

constexpr int kThreads = 256;
constexpr int kMaxRanks = 32;     // status words are bitmasks over ranks
constexpr int kMaxExperts = 4096; // route_kernel's shared counts
constexpr unsigned kFull = 0xffffffffu;

// Device status words of one call, copied to the host at its end.
enum { ST_TIMED_OUT = 0, ST_BAD_COUNT = 1, ST_DIRECT = 2, ST_WORDS = 3 };

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

struct Ctx {
  int R, E, L, T, H, K, me;
  int64_t cap, msg;
  // symmetric (nvshmem_malloc), identical offsets on every PE
  uint8_t* sym;
  uint64_t* dsig;   // [2][L][R] key | count from source s for local expert l
  uint64_t* csig;   // [2][L][R] key | count from expert owner o for its local expert l
  uint8_t* dstage;  // [2][R sources][cap] x msg
  uint8_t* cstage;  // [2][R owners][cap] x 2H  (bf16 rows returned by owner o, in this rank's send order)
  uint8_t* send;    // [2][T*K] x msg      dispatch put source, ordered by expert then token
  uint8_t* csend;   // [2][R][cap] x 2H    combine put source, per destination in its send order
  // local scratch (cudaMalloc)
  int* slot;    // [T][K] row of (t, k) inside its expert block (ascending token)
  int* count;   // [E] rows of this rank's tokens per expert
  int* ebase;   // [E + 1] exclusive prefix of count: send row of expert e's block
  int* rcnt;    // [L][R] rows received from source s for local expert l (0 if it did not count)
  uint32_t* status;  // [ST_WORDS]
};

struct Layout {
  int64_t dsig, csig, dstage, cstage, send, csend, total;
};

Layout layout_of(int R, int E, int T, int H, int K) {
  const int L = E / R;
  const int64_t cap = (int64_t)T * (K < L ? K : L);
  const int64_t msg = align_up(16 + 2 * (int64_t)H, 16);
  Layout y;
  int64_t off = 0;
  auto take = [&off](int64_t bytes) {
    const int64_t at = off;
    off = align_up(off + bytes, 256);
    return at;
  };
  y.dsig = take(2 * (int64_t)L * R * 8);
  y.csig = take(2 * (int64_t)L * R * 8);
  y.dstage = take(2 * (int64_t)R * cap * msg);
  y.cstage = take(2 * (int64_t)R * cap * 2 * H);
  y.send = take(2 * (int64_t)T * K * msg);
  y.csend = take(2 * (int64_t)R * cap * 2 * H);
  y.total = off;
  return y;
}

// Copy `bytes` (a multiple of 16, both pointers 16-aligned) with the threads of one block.
__device__ __forceinline__ void block_copy16(void* dst, const void* src, int64_t bytes) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
}

// One block sends `bytes` of `src` to PE `pe`'s symmetric `dst`, then sets `pe`'s `sig` to `value`: where
// nvshmem_ptr reaches the peer (and not force_put), direct stores, a system fence and a release store (bit
// `pe` of status[ST_DIRECT] set); else one put-with-signal from `put_src`, which must be symmetric (`src`
// itself, or a staging buffer `src` is first copied into), or a lone signal for an empty block.
__device__ void send_block(void* dst, const uint8_t* src, uint8_t* put_src, int64_t bytes, uint64_t* sig,
                           uint64_t value, int pe, bool force_put, uint32_t* status) {
  void* direct = force_put ? nullptr : nvshmem_ptr(dst, pe);
  if (direct != nullptr) {
    block_copy16(direct, src, bytes);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();
      mc_nvs::st_release_u64(static_cast<uint64_t*>(nvshmem_ptr(sig, pe)), value);
      atomicOr(status + ST_DIRECT, 1u << pe);
    }
  } else if (bytes > 0) {
    if (put_src != src) {
      block_copy16(put_src, src, bytes);
      __syncthreads();
    }
    nvshmemx_putmem_signal_nbi_block(dst, put_src, (size_t)bytes, sig, value, NVSHMEM_SIGNAL_SET, pe);
  } else if (threadIdx.x == 0) {
    nvshmemx_signal_op(sig, value, NVSHMEM_SIGNAL_SET, pe);
  }
}

// One block of 1024 threads.  For every expert e: count[e] = #tokens routed to e, slot[t][k] = #{t' < t
// routed to e} for topk[t][k] == e; ebase = exclusive prefix of count over experts (ebase[E] = total).
__global__ void route_kernel(const int64_t* topk, int N, int K, int E, int* slot, int* count, int* ebase) {
  __shared__ int cnt[kMaxExperts];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int e = warp; e < E; e += warps) {
    int running = 0;
    for (int t0 = 0; t0 < N; t0 += 32) {
      const int t = t0 + lane;
      int kpos = -1;
      if (t < N)
        for (int k = 0; k < K; ++k)
          if (topk[(int64_t)t * K + k] == e) kpos = k;
      const unsigned hits = __ballot_sync(kFull, kpos >= 0);
      if (kpos >= 0) slot[(int64_t)t * K + kpos] = running + __popc(hits & ((1u << lane) - 1));
      running += __popc(hits);
    }
    if (lane == 0) cnt[e] = running;
  }
  __syncthreads();
  if (warp == 0) {
    const int chunk = (E + 31) / 32, lo = lane * chunk, hi = min(E, lo + chunk);
    int sum = 0;
    for (int e = lo; e < hi; ++e) sum += cnt[e];
    int incl = sum;
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += v;
    }
    int run = incl - sum;
    for (int e = lo; e < hi; ++e) {
      ebase[e] = run;
      count[e] = cnt[e];
      run += cnt[e];
    }
    if (lane == 31) ebase[E] = incl;
  }
}

// One block (4 warps) per token: writes the token's message (header, bf16 row or FP8 codes + scales)
// into its send row for every top-k entry.  FP8 is the contract's quantization (mooncake/model/fp8.py).
__global__ void pack_kernel(const __nv_bfloat16* x, const int64_t* topk, int K, int H, int use_fp8,
                            const int* slot, const int* ebase, uint8_t* send, int64_t msg) {
  const int t = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int64_t* tk = topk + (int64_t)t * K;
  if (threadIdx.x == 0)
    for (int k = 0; k < K; ++k)
      if (tk[k] >= 0) *reinterpret_cast<int*>(send + (int64_t)(ebase[tk[k]] + slot[(int64_t)t * K + k]) * msg) = t;
  const __nv_bfloat16* row = x + (int64_t)t * H;
  if (!use_fp8) {
    for (int k = 0; k < K; ++k)
      if (tk[k] >= 0)
        block_copy16(send + (int64_t)(ebase[tk[k]] + slot[(int64_t)t * K + k]) * msg + 16, row, 2 * (int64_t)H);
    return;
  }
  for (int b = warp; b < H / 128; b += warps) {
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __bfloat162float(row[b * 128 + 4 * lane + i]);
    float scale_inv;
    const uint32_t packed = mc_fp8_quantize_group(v, &scale_inv);
    for (int k = 0; k < K; ++k) {
      if (tk[k] < 0) continue;
      uint8_t* m = send + (int64_t)(ebase[tk[k]] + slot[(int64_t)t * K + k]) * msg;
      *reinterpret_cast<uint32_t*>(m + 16 + b * 128 + 4 * lane) = packed;
      if (lane == 0) reinterpret_cast<float*>(m + 16 + H)[b] = scale_inv;
    }
  }
}

// One block per expert e = q*L + l: this rank's block for (q, l) goes to q's DSTAGE[h][me] at row
// pre(q, l) = ebase[e] - ebase[q*L], then DSIG[h][l][me] on q := key | count.  Direct (nvshmem_ptr
// non-null, unless force_put): stores, a system fence, a release store of the signal.  Else one
// put-with-signal (a signal alone for an empty block).  A masked source (active[me] == 0) sends nothing.
__global__ void dispatch_send_kernel(Ctx c, uint64_t key, int h, int force_put, const int* active) {
  if (active[c.me] == 0) return;
  const int e = blockIdx.x, q = e / c.L, l = e % c.L;
  const int n = c.count[e];
  const int64_t pre = c.ebase[e] - c.ebase[q * c.L];
  const uint8_t* src = c.send + ((int64_t)h * c.T * c.K + c.ebase[e]) * c.msg;
  uint8_t* dst = c.dstage + (((int64_t)h * c.R + c.me) * c.cap + pre) * c.msg;
  uint64_t* sig = c.dsig + ((int64_t)h * c.L + l) * c.R + c.me;
  const uint64_t value = key | (uint64_t)n;
  send_block(dst, src, const_cast<uint8_t*>(src), n * c.msg, sig, value, q, force_put, c.status);
}

// One block, one warp per peer p, lanes over local experts: wait for the L signals sigs[l][p] (stride R)
// until now + timeout_ns (none if < 0).  A peer whose every signal arrived: counts[l][p] = the signals'
// counts.  Any signal missing: active[p] = 0, counts[l][p] = 0, ST_TIMED_OUT bit p (counts may be null).
// Peers with active[p] == 0 are not waited for (counts 0).  expect (may be null): signal (l, p) must carry
// the count expect[p * expect_stride + l], else ST_BAD_COUNT bit p.  gate (may be null): nothing is
// waited for if *gate == 0.
__global__ void wait_kernel(const uint64_t* sigs, int L, int R, uint64_t key, int64_t timeout_ns, int* active,
                            int* counts, const int* expect, int expect_stride, const int* gate, uint32_t* status) {
  __shared__ int failed[kMaxRanks];
  if (gate != nullptr && *gate == 0) return;
  const int p = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) failed[p] = active[p] == 0;
  __syncwarp();
  const uint64_t deadline_ns = timeout_ns >= 0 ? mc_nvs::now_ns() + (uint64_t)timeout_ns : 0;
  if (!failed[p]) {
    for (int l = lane; l < L; l += 32) {
      const uint64_t v = mc_nvs::wait_key(sigs + (int64_t)l * R + p, key, deadline_ns, &failed[p]);
      if (v == 0) {
        atomicExch(&failed[p], 1);
        break;
      }
      const int n = (int)(v & kCountMask);
      if (counts != nullptr) counts[l * R + p] = n;
      if (expect != nullptr && n != expect[(int64_t)p * expect_stride + l]) atomicOr(status + ST_BAD_COUNT, 1u << p);
    }
  }
  __syncwarp();
  if (failed[p]) {
    if (counts != nullptr)
      for (int l = lane; l < L; l += 32) counts[l * R + p] = 0;
    if (lane == 0 && active[p] != 0) {
      active[p] = 0;
      atomicOr(status + ST_TIMED_OUT, 1u << p);
    }
  }
}

// One block per (l, s): source s's rows for local expert l go to rows begin.. of expert l's region,
// begin = rows of lower sources for l (exclusive prefix); layout_range[l][s] = begin << 32 | count.
__global__ void dispatch_layout_kernel(Ctx c, int h, int use_fp8, uint8_t* recv_x, float* recv_scales,
                                       int* recv_count, int* src_info, int64_t* layout_range) {
  const int l = blockIdx.x / c.R, s = blockIdx.x % c.R;
  const int R = c.R, H = c.H, S = H / 128;
  const int64_t RT = (int64_t)R * c.T;
  int begin = 0, pre = 0;
  for (int s2 = 0; s2 < s; ++s2) begin += c.rcnt[l * R + s2];
  for (int l2 = 0; l2 < l; ++l2) pre += c.rcnt[l2 * R + s];
  const int n = c.rcnt[l * R + s];
  if (threadIdx.x == 0) {
    layout_range[l * R + s] = ((int64_t)begin << 32) | (int64_t)n;
    if (s == R - 1) recv_count[l] = begin + n;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int j = warp; j < n; j += warps) {
    const uint8_t* m = c.dstage + (((int64_t)h * R + s) * c.cap + pre + j) * c.msg;
    const int64_t i = (int64_t)l * RT + begin + j;
    if (lane == 0) src_info[i] = reinterpret_cast<const int*>(m)[0];
    const int64_t row_bytes = use_fp8 ? H : 2 * (int64_t)H;
    const uint4* from = reinterpret_cast<const uint4*>(m + 16);
    uint4* to = reinterpret_cast<uint4*>(recv_x + i * row_bytes);
    for (int64_t w = lane; w < row_bytes / 16; w += 32) to[w] = from[w];
    if (use_fp8)  // column-major scales: [L][S][R*T]
      for (int b = lane; b < S; b += 32)
        recv_scales[((int64_t)l * S + b) * RT + begin + j] = reinterpret_cast<const float*>(m + 16 + H)[b];
  }
}

// One block per (l, r): the expert outputs of the rows this rank received from r for local expert l
// (rows begin..begin+n of expert_out[l], in r's send order) go to r's CSTAGE[h][me] at row pre =
// rows r sent here for lower local experts; then CSIG[h][l][me] on r := key | n.  Nothing is sent by an
// inactive rank or to an inactive one.
__global__ void combine_send_kernel(Ctx c, const __nv_bfloat16* expert_out, uint64_t key, int h, int force_put,
                                    const int* active) {
  const int l = blockIdx.x / c.R, r = blockIdx.x % c.R, R = c.R;
  if (active[c.me] == 0 || active[r] == 0) return;
  int begin = 0, pre = 0;
  for (int s2 = 0; s2 < r; ++s2) begin += c.rcnt[l * R + s2];
  for (int l2 = 0; l2 < l; ++l2) pre += c.rcnt[l2 * R + r];
  const int n = c.rcnt[l * R + r];
  const int64_t row_bytes = 2 * (int64_t)c.H;
  const uint8_t* rows = reinterpret_cast<const uint8_t*>(expert_out + ((int64_t)l * R * c.T + begin) * c.H);
  uint8_t* dst = c.cstage + (((int64_t)h * R + c.me) * c.cap + pre) * row_bytes;
  uint64_t* sig = c.csig + ((int64_t)h * c.L + l) * R + c.me;
  const uint64_t value = key | (uint64_t)n;
  uint8_t* staged = c.csend + (((int64_t)h * R + r) * c.cap + pre) * row_bytes;  // symmetric put source
  send_block(dst, rows, staged, n * row_bytes, sig, value, r, force_put, c.status);
}

// One block per token t, threads over channels: acc = +0.0; for k in top-k order, skipping -1 entries and
// owners with active == 0: acc = fl32(acc + fl32(y * w)); out = bf16_rne(acc).  All zeros if this rank is
// inactive.  y is owner o's returned row at CSTAGE[h][o][ebase[e] - ebase[o*L] + slot[t][k]].
__global__ void combine_fold_kernel(Ctx c, int h, const int64_t* topk, const float* weights, const int* active,
                                    __nv_bfloat16* out) {
  const int t = blockIdx.x, K = c.K, H = c.H;
  const bool me_active = active[c.me] != 0;
  for (int ch = threadIdx.x; ch < H; ch += blockDim.x) {
    float acc = 0.0f;
    if (me_active) {
      for (int k = 0; k < K; ++k) {
        const int64_t e = topk[(int64_t)t * K + k];
        if (e < 0) continue;
        const int o = (int)(e / c.L);
        if (active[o] == 0) continue;
        const int64_t row = c.ebase[e] - c.ebase[o * c.L] + c.slot[(int64_t)t * K + k];
        const __nv_bfloat16* y =
            reinterpret_cast<const __nv_bfloat16*>(c.cstage) + (((int64_t)h * c.R + o) * c.cap + row) * H;
        acc = __fadd_rn(acc, __fmul_rn(__bfloat162float(y[ch]), weights[(int64_t)t * K + k]));
      }
    }
    out[(int64_t)t * H + ch] = __float2bfloat16_rn(acc);
  }
}

int finish(Ctx* c, uint32_t* status_host) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err == cudaSuccess)
    err = cudaMemcpy(status_host, c->status, ST_WORDS * sizeof(uint32_t), cudaMemcpyDeviceToHost);
  return (int)err;
}

int half_of(uint64_t key) { return (int)((key >> mc_nvs::kCountBits) & 1); }

}  // namespace

// Bytes of the symmetric allocation of a context (the NVSHMEM_SYMMETRIC_SIZE it needs, minus headroom).
MC_API int64_t mc_ep_symmetric_bytes(int R, int E, int T, int H, int K) { return layout_of(R, E, T, H, K).total; }

// Collective (every PE, same arguments).  Returns the context, 0 on bad arguments (E % R, R > 32,
// E > 4096, T > 65535, H % 8, K > E, R != number of PEs) or a failed allocation.  The symmetric memory
// is zeroed here: every PE must have returned (a barrier) before any PE's first call.
MC_API int64_t mc_ep_create(int R, int E, int T, int H, int K) {
  if (R < 1 || R > kMaxRanks || E % R != 0 || E > kMaxExperts || T < 1 || T > (int)kCountMask || H < 8 ||
      H % 8 != 0 || K < 1 || K > E || nvshmem_n_pes() != R)
    return 0;
  const Layout y = layout_of(R, E, T, H, K);
  Ctx* c = new Ctx();
  c->R = R, c->E = E, c->L = E / R, c->T = T, c->H = H, c->K = K, c->me = nvshmem_my_pe();
  c->cap = (int64_t)T * (K < c->L ? K : c->L);
  c->msg = align_up(16 + 2 * (int64_t)H, 16);
  c->sym = static_cast<uint8_t*>(nvshmem_malloc((size_t)y.total));
  if (c->sym == nullptr) {
    delete c;
    return 0;
  }
  c->dsig = reinterpret_cast<uint64_t*>(c->sym + y.dsig);
  c->csig = reinterpret_cast<uint64_t*>(c->sym + y.csig);
  c->dstage = c->sym + y.dstage;
  c->cstage = c->sym + y.cstage;
  c->send = c->sym + y.send;
  c->csend = c->sym + y.csend;
  cudaMemset(c->sym, 0, (size_t)y.total);
  cudaMalloc(&c->slot, sizeof(int) * (size_t)T * K);
  cudaMalloc(&c->count, sizeof(int) * (size_t)E);
  cudaMalloc(&c->ebase, sizeof(int) * (size_t)(E + 1));
  cudaMalloc(&c->rcnt, sizeof(int) * (size_t)c->L * R);
  cudaMalloc(&c->status, sizeof(uint32_t) * ST_WORDS);
  cudaMemset(c->rcnt, 0, sizeof(int) * (size_t)c->L * R);
  // Load every kernel now: with lazy loading, the first launch of a kernel queued behind a spinning wait
  // would first wait for that wait to end.
  cudaFuncAttributes attr;
  cudaFuncGetAttributes(&attr, route_kernel);
  cudaFuncGetAttributes(&attr, pack_kernel);
  cudaFuncGetAttributes(&attr, dispatch_send_kernel);
  cudaFuncGetAttributes(&attr, wait_kernel);
  cudaFuncGetAttributes(&attr, dispatch_layout_kernel);
  cudaFuncGetAttributes(&attr, combine_send_kernel);
  cudaFuncGetAttributes(&attr, combine_fold_kernel);
  if (cudaDeviceSynchronize() != cudaSuccess || cudaGetLastError() != cudaSuccess) return 0;
  return (int64_t)c;
}

// One dispatch call on the legacy default stream (ordered after torch's work on it); blocks until done.
//   x [N, H] bf16, topk [N, K] int64 (validated by the caller), active [R] int32 (updated in place);
//   outputs, zero/-1 filled by the caller for deterministic padding: recv_x [L, R*T, H] bf16 or fp8,
//   recv_scales [L, S, R*T] float32 (fp8 only, the model's column-major storage), recv_count [L] int32,
//   src_info [L, R*T] int32, layout_range [L, R] int64.  key = epoch << 48 | seq << 16 (half = seq & 1);
//   silent: send nothing (a peer that died before sending); timeout_ns < 0: no deadline.
//   status_host[3]: timed-out sources, bad counts, destinations reached directly (bitmasks).
// Returns a cudaError_t, -1 for bad arguments.
MC_API int mc_ep_dispatch(int64_t ctx, int64_t x, int64_t topk, int N, uint64_t key, int use_fp8, int force_put,
                          int silent, int64_t timeout_ns, int64_t active, int64_t recv_x, int64_t recv_scales,
                          int64_t recv_count, int64_t src_info, int64_t layout_range, uint32_t* status_host) {
  Ctx* c = reinterpret_cast<Ctx*>(ctx);
  if (N < 0 || N > c->T || (key & kCountMask) != 0 || (use_fp8 && c->H % 128 != 0)) return -1;
  const int h = half_of(key);
  int* act = reinterpret_cast<int*>(active);
  cudaMemsetAsync(c->status, 0, ST_WORDS * sizeof(uint32_t), 0);
  route_kernel<<<1, 1024>>>(reinterpret_cast<const int64_t*>(topk), N, c->K, c->E, c->slot, c->count, c->ebase);
  if (N > 0)
    pack_kernel<<<N, 128>>>(reinterpret_cast<const __nv_bfloat16*>(x), reinterpret_cast<const int64_t*>(topk), c->K,
                            c->H, use_fp8, c->slot, c->ebase, c->send + (int64_t)h * c->T * c->K * c->msg, c->msg);
  if (!silent) dispatch_send_kernel<<<c->E, kThreads>>>(*c, key, h, force_put, act);
  wait_kernel<<<1, 32 * c->R>>>(c->dsig + (int64_t)h * c->L * c->R, c->L, c->R, key, timeout_ns, act, c->rcnt,
                                nullptr, 0, nullptr, c->status);
  dispatch_layout_kernel<<<c->L * c->R, kThreads>>>(*c, h, use_fp8, reinterpret_cast<uint8_t*>(recv_x),
                                                     reinterpret_cast<float*>(recv_scales),
                                                     reinterpret_cast<int*>(recv_count),
                                                     reinterpret_cast<int*>(src_info),
                                                     reinterpret_cast<int64_t*>(layout_range));
  return finish(c, status_host);
}

// One combine call for the last dispatch (same context, same topk), on the legacy default stream.
//   expert_out [L, R*T, H] bf16 (only valid rows read), topk [N, K] int64, weights [N, K] float32,
//   active [R] int32 (the mask after dispatch; updated in place: an owner whose rows miss the deadline is
//   cleared), out [N, H] bf16.  key, silent, timeout_ns, status_host as mc_ep_dispatch (bad counts: an
//   owner returned a different number of rows than this rank sent it).
MC_API int mc_ep_combine(int64_t ctx, int64_t expert_out, int64_t topk, int64_t weights, int N, uint64_t key,
                         int force_put, int silent, int64_t timeout_ns, int64_t active, int64_t out,
                         uint32_t* status_host) {
  Ctx* c = reinterpret_cast<Ctx*>(ctx);
  if (N < 0 || N > c->T || (key & kCountMask) != 0) return -1;
  const int h = half_of(key);
  int* act = reinterpret_cast<int*>(active);
  cudaMemsetAsync(c->status, 0, ST_WORDS * sizeof(uint32_t), 0);
  if (!silent)
    combine_send_kernel<<<c->L * c->R, kThreads>>>(*c, reinterpret_cast<const __nv_bfloat16*>(expert_out), key, h,
                                                    force_put, act);
  // owner o must return count[o*L + l] rows for its local expert l: what this rank sent it
  wait_kernel<<<1, 32 * c->R>>>(c->csig + (int64_t)h * c->L * c->R, c->L, c->R, key, timeout_ns, act, nullptr,
                                c->count, c->L, act + c->me, c->status);
  if (N > 0)
    combine_fold_kernel<<<N, kThreads>>>(*c, h, reinterpret_cast<const int64_t*>(topk),
                                          reinterpret_cast<const float*>(weights), act,
                                          reinterpret_cast<__nv_bfloat16*>(out));
  return finish(c, status_host);
}

// Collective while every PE is alive (nvshmem_free); after a failure pass free_symmetric = 0 and the
// symmetric memory goes with the process (design §7).
MC_API void mc_ep_destroy(int64_t ctx, int free_symmetric) {
  Ctx* c = reinterpret_cast<Ctx*>(ctx);
  if (free_symmetric) nvshmem_free(c->sym);
  cudaFree(c->slot);
  cudaFree(c->count);
  cudaFree(c->ebase);
  cudaFree(c->rcnt);
  cudaFree(c->status);
  delete c;
}
