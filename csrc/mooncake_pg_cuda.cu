// mooncake CUDA fast path, PG side: the fold of a reduction's inputs in one pass.
//
// out[i] = fold(op, in[0][i], in[1][i], ..., in[n-1][i]) exactly as mooncake/model/reduce.py defines it:
// a left fold in input order, seeded with in[0]; float16 / bfloat16 accumulate in float32 and are rounded
// (to nearest even) once at the end; AVG divides the SUM accumulator by n before that rounding.  Every
// step is an explicitly rounded IEEE operation (__fadd_rn & co.), so nvcc can never contract it into an
// FMA and the bits equal the CPU's, except NaN encodings and MIN/MAX of +0 against -0: an output that
// holds a NaN (or, for MIN/MAX, a zero) sets *flag, and the caller folds that result again on the host
// (mooncake/fast/cuda/pg.py, "Same bits as the CPU").
//
// Compared with one torch op per input, the fold reads every input once and writes the output once.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <time.h>

#include "mc_device_sync.cuh"
#include "mc_host_device.cuh"

#define MC_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kFoldMaxInputs = 128;  // pointers passed by value in the kernel's parameters (1 KiB)
constexpr int kFoldThreads = 256;
constexpr int kFoldMaxBlocks = 1024;

// mooncake.model.reduce.ReduceOp and DTYPE_CODES (wire numbers).
enum { kSum = 0, kProduct = 1, kMin = 2, kMax = 3, kAvg = 4 };
enum { kFloat16 = 6, kBFloat16 = 7, kFloat32 = 8, kFloat64 = 9 };

struct FoldInputs {
  const void* ptr[kFoldMaxInputs];
};

template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T narrow(typename Acc<T>::type x);
template <> __device__ __forceinline__ float narrow<float>(float x) { return x; }
template <> __device__ __forceinline__ double narrow<double>(double x) { return x; }
template <> __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// torch.minimum / torch.maximum: a NaN operand gives NaN (flagged, so its encoding does not matter).
template <int OP, typename A>
__device__ __forceinline__ A combine(A acc, A x) {
  if (OP == kSum || OP == kAvg) return add_rn(acc, x);
  if (OP == kProduct) return mul_rn(acc, x);
  if (OP == kMin) return (acc < x || acc != acc) ? acc : x;
  return (acc > x || acc != acc) ? acc : x;
}

template <int OP, typename A>
__device__ __forceinline__ A finalize(A acc, int n, int& bad) {
  if (OP == kAvg) acc = div_rn(acc, static_cast<A>(n));
  // the rounding to a 16-bit float keeps NaN a NaN and, for MIN / MAX, a zero a zero (inputs are exact)
  bad |= (acc != acc) || ((OP == kMin || OP == kMax) && acc == static_cast<A>(0));
  return acc;
}

// V elements of type T per 16-byte vector; a thread folds one vector of every input at a time, loading up
// to four inputs before combining them so that several loads are in flight.
template <typename T, int OP>
__global__ void __launch_bounds__(kFoldThreads) fold_kernel(FoldInputs in, int n, T* out, int64_t numel,
                                                            int vectorized, int* flag) {
  using A = typename Acc<T>::type;
  constexpr int V = 16 / sizeof(T);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_vec = vectorized ? numel / V : 0;
  int bad = 0;
  for (int64_t v = first; v < num_vec; v += stride) {
    A acc[V];
    uint4 raw = reinterpret_cast<const uint4*>(in.ptr[0])[v];
    const T* xs = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = widen(xs[j]);
    int s = 1;
    for (; s + 4 <= n; s += 4) {
      uint4 r[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) r[u] = reinterpret_cast<const uint4*>(in.ptr[s + u])[v];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const T* x = reinterpret_cast<const T*>(&r[u]);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = combine<OP>(acc[j], widen(x[j]));
      }
    }
    for (; s < n; ++s) {
      uint4 r = reinterpret_cast<const uint4*>(in.ptr[s])[v];
      const T* x = reinterpret_cast<const T*>(&r);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = combine<OP>(acc[j], widen(x[j]));
    }
    uint4 res;
    T* ys = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int j = 0; j < V; ++j) ys[j] = narrow<T>(finalize<OP>(acc[j], n, bad));
    reinterpret_cast<uint4*>(out)[v] = res;
  }
  for (int64_t i = num_vec * V + first; i < numel; i += stride) {
    A acc = widen(static_cast<const T*>(in.ptr[0])[i]);
    for (int s = 1; s < n; ++s) acc = combine<OP>(acc, widen(static_cast<const T*>(in.ptr[s])[i]));
    out[i] = narrow<T>(finalize<OP>(acc, n, bad));
  }
  if (flag != nullptr && __any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(flag, 1);
}

template <typename T>
cudaError_t launch_typed(int op, const FoldInputs& in, int n, void* out, int64_t numel, int vectorized,
                         int* flag, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t work = vectorized ? numel / V + numel % V : numel;
  const int blocks = static_cast<int>(
      work == 0 ? 1 : (work + kFoldThreads - 1) / kFoldThreads < kFoldMaxBlocks
                          ? (work + kFoldThreads - 1) / kFoldThreads : kFoldMaxBlocks);
  T* o = static_cast<T*>(out);
  switch (op) {
    case kSum: fold_kernel<T, kSum><<<blocks, kFoldThreads, 0, stream>>>(in, n, o, numel, vectorized, flag); break;
    case kProduct: fold_kernel<T, kProduct><<<blocks, kFoldThreads, 0, stream>>>(in, n, o, numel, vectorized, flag); break;
    case kMin: fold_kernel<T, kMin><<<blocks, kFoldThreads, 0, stream>>>(in, n, o, numel, vectorized, flag); break;
    case kMax: fold_kernel<T, kMax><<<blocks, kFoldThreads, 0, stream>>>(in, n, o, numel, vectorized, flag); break;
    case kAvg: fold_kernel<T, kAvg><<<blocks, kFoldThreads, 0, stream>>>(in, n, o, numel, vectorized, flag); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}


// ------------------------------------------------------------------------------------- device protocol
//
// Collectives with no host step between launch and commit (mooncake/fast/cuda/pg.py, "The device path"):
// eager all_reduce, and all_reduce, reduce_scatter, all_gather, all_to_all and broadcast captured in CUDA
// graphs.  Every rank's words and lanes are reachable from every rank's kernels: eager ops use the control
// words (a host shared-memory segment, registered and mapped into the device), captured ops the rank's
// *pad* (the same word layout in device memory); lanes and pads are device memory shared as allocations
// that importers keep alive (mc_vmm_alloc), so a dead peer's memory stays readable.  One operation, key
// k = epoch << 40 | seq, on lane block `base` (seq parity), `kind` saying what goes in and what is read:
//
//   1. post: wait until every peer released this lane (FREE >= HOLD, or HOLD >= k; a captured op from the
//      third of its epoch on knows it: this rank saw every peer publish the op before, which each did after
//      freeing the lane of the one before that); copy in_bytes of the input into this rank's lane (none for
//      a broadcast's non-root); (last block) system fence, write the fingerprint words, PUB = k.
//   2. read: wait until every peer's PUB == k and its fingerprint words equal this rank's (every rank waits
//      for every peer, so a rank that called something else is seen by all); HOLD = k; read the peers'
//      lanes from rd_off on: fold kinds (all_reduce, reduce_scatter) fold `count` elements of every active
//      rank's lane (ascending active order, the model's fold: fold_range) into the output; copy kinds copy
//      `count` bytes into each of `slots` output slots: slot s from the lane of the rank whose group rank is
//      s (zeros where that rank is inactive), or every slot from the root's (broadcast); (last block)
//      system fence, FREE = k, DONE = k.
//   All_reduce in parts (kind kAllReduceParts, large messages): in step 2 active rank i folds only part i
//   (`part` elements, part_range) of every lane into its own lane's result region (from rd_off on), then
//   (last block) RED = k instead of FREE / DONE; 3. gather: wait until every rank's RED == k; copy every
//   rank's part from its result region into the output; (last block) system fence, FREE = k, DONE = k.
//   Per rank that reads the message about twice, whatever the number of ranks (every lane whole: n times).
//   All_reduce in place on the ranks' own tensors (kind kAllReduceDirect: every rank's tensor lies in shared
//   memory its peers mapped, and `lane[par][i]` is rank i's tensor): step 1 copies nothing and waits for no
//   release (a peer touches this rank's tensor only inside an op that this rank ends after every peer is
//   through with it); in step 2 active rank i folds part i of every tensor and writes the result into part i
//   of every tensor (nobody else reads or writes part i), then RED = k; step 3 waits until every rank's
//   RED == k (every part is in, and nobody reads this rank's tensor any more), then FREE, DONE.  Per rank
//   the message is read once and written once.  Before writing, every block of step 2 writes HOLD = k and,
//   after a system fence, checks that every PUB is still k; its last block writes DRAIN = k (this rank's
//   writes into the peers' tensors are over).  A rank that gives up withdraws its PUB and waits for the
//   DRAIN of every peer whose HOLD = k (withdraw), so no peer writes into its tensor after its op ended; a
//   peer's withdrawn PUB ends the waits for it at once.  Run as one launch per step, the first launch notes
//   whether it published (arrive word 2 * kSteps), and the later ones then run whatever the trouble and
//   epoch words say (exiting at once would leave a published tensor open to its peers).
//
// Single-block launches on sm_90+ overlap the stream's previous kernel (programmatic dependent launch): a
// kernel starts by waiting for its predecessor's end, so only the launch latency is hidden.  Multi-block
// launches do not: the blocks of every rank's launch wait on one another, so they must all be resident at
// once (at least two blocks per SM), and an overlapped launch would hold SMs while it waits.
// Every wait of a launch ends by the launch's start + timeout_ns (GPU clock; the two launches of a
// multi-block operation each have their own start); a wait that passes it gives up: the kernel exits without
// writing the output (a block that gets past step 2's wait writes its part of it; the host protocol writes
// all of it again).  Eager: the host finds how far it got in the words (PUB / DONE) and carries on with the
// host protocol.  Captured in a CUDA graph (graph != 0): seq comes from the count word (epoch << 40 | ops of
// that epoch run, so the first captured op of a new view starts at 0), and a kernel that gives up writes its
// key into the trouble word of every active rank, in its pad and its host words (`note`); a later captured
// kernel of that epoch sees it and exits at once, and one captured under a view epoch other than the
// current (the pad's epoch word) writes its key into its rank's host stale word and exits at once.  The host
// reads trouble and stale in its host words only, and writes the pad only while no captured op runs (or
// just its epoch word).  Every block keeps the block counters (arrive) right whichever way it leaves.
// Mismatched fingerprints give up at once.

constexpr int kDevMaxRanks = 16;
constexpr int kDevThreads = 512;
// word indices, as mooncake/fast/cuda/pg.py lays them out (checked there through mc_pg_dev_layout)
constexpr int kWGraphEpoch = 10, kWGraphTrouble = 11, kWGraphCount = 12, kWGraphStale = 13;
constexpr int kWStall = 14;  // tests: nanoseconds a launch with McPgDevArgs.stall waits before it publishes
constexpr int kLPub = 0, kLMeta = 1, kLDone = 6, kLHold = 7, kLFree = 8, kLRed = 9, kLMetaNumel = 19, kLMetaSlots = 20,
              kLDrain = 21;
constexpr int64_t kWithdrawn = 1LL << 62;  // PUB = key | this: a direct op's rank gave up, nobody writes its tensor
constexpr int kSeqBits = 40;
constexpr int64_t kGraphBit = 1LL << (kSeqBits - 1);
// what a launch moves (mooncake/fast/cuda/pg.py, KIND_*): fold kinds first
enum { kAllReduce = 0, kReduceScatter = 1, kAllGather = 2, kAllToAll = 3, kBroadcast = 4, kAllReduceParts = 5,
       kAllReduceDirect = 6 };
constexpr int kSteps = 3;  // post, read (or fold a part), gather the parts
// McPgDevArgs.trace: one record of kTraceWords per op, at seq % kTraceRecords: the key, then the global timer
// (ns) and the SM's clock (cycles) at each of kTraceMarks points (TraceMark); the last word, the blocks.
constexpr int kTraceRecords = 256, kTraceMarks = 7, kTraceWords = 16;
enum TraceMark { kStart, kGo, kReleased, kPublished, kPeersPublished, kRead, kFinished };

struct McPgDevArgs {
  int64_t ctl[kDevMaxRanks];       // control words of each active rank, in active order (device pointers)
  int64_t note[kDevMaxRanks];      // graph: each active rank's host control words, where the host reads trouble
  int64_t lane[2][kDevMaxRanks];   // lane buffers of each active rank for lane parity 0 / 1
  int64_t base[2];                 // word index of the lane block for parity 0 / 1
  int64_t src, dst;                // this rank's input and output (device pointers)
  int64_t in_bytes;                // bytes of src copied into this rank's lane (0: it sends nothing)
  int64_t rd_off;                  // bytes: where the part this rank reads starts in each lane
  int64_t count;                   // fold kinds: elements folded into dst; copy kinds: bytes per output slot
  int64_t part;                    // all_reduce in parts: elements per part (part i: [i * part, (i + 1) * part))
  int64_t key;                     // eager: the operation's key; graph: epoch << 40 | graph bit
  int64_t fp[3];                   // fingerprint words (meta, numel, slots) of this call
  int64_t timeout_ns;              // every wait of the launch ends by its start + this
  int64_t flag;                    // int32, 1 where the result needs the host fold (0: not wanted)
  int64_t arrive;                  // device int32[2 * kSteps + 1]: blocks through each step, whether one gave up,
                                   // whether a direct op's first launch published
  int64_t trace;                   // device int64[kTraceRecords * kTraceWords] (single-block launches), or 0
  int32_t n, me, op, dtype, phase, kind;
  int32_t graph;                   // 1: captured in a CUDA graph (count, trouble and stale words)
  int32_t slots;                   // copy kinds: output slots of `count` bytes (0: this rank reads nothing)
  int32_t root;                    // broadcast: the root's active index
  int32_t stall;                   // tests (1): before publishing, wait as long as this rank's host word kWStall says
  int32_t rank[kDevMaxRanks];      // group rank of each active rank (its output slot for copy kinds)
};

__device__ __forceinline__ int64_t* words(const McPgDevArgs& a, int i) {
  return reinterpret_cast<int64_t*>(a.ctl[i]);
}

// Profiling (a.trace != 0, single-block launches, thread 0): when this op reached `mark`.  kGo also writes
// the key and the kernel's start, which come before the key is known.
__device__ __forceinline__ void trace(const McPgDevArgs& a, int64_t key, TraceMark mark, uint64_t start = 0,
                                      long long start_clock = 0) {
  if (a.trace == 0 || gridDim.x != 1 || threadIdx.x != 0) return;
  int64_t* rec = reinterpret_cast<int64_t*>(a.trace) + ((key & (kGraphBit - 1)) % kTraceRecords) * kTraceWords;
  rec[1 + mark] = static_cast<int64_t>(mc_sync::global_timer_ns());
  rec[1 + kTraceMarks + mark] = clock64();
  if (mark == kGo) {
    rec[0] = key;
    rec[1 + kStart] = static_cast<int64_t>(start);
    rec[1 + kTraceMarks + kStart] = start_clock;
    rec[kTraceWords - 1] = gridDim.x;
  }
}


// A captured op gave up: its key into the trouble word of every active rank that holds no trouble of this
// epoch or a later one (later captured ops of the epoch exit at once everywhere; every survivor's PG face
// raises at its next call, also where the rank's own replay got through).  Eager: nothing.
__device__ __forceinline__ void give_up(const McPgDevArgs& a, int64_t key) {
  if (!a.graph) return;
  for (int i = 0; i < a.n; ++i) {
    int64_t* where[2] = {words(a, i) + kWGraphTrouble, reinterpret_cast<int64_t*>(a.note[i]) + kWGraphTrouble};
    for (int64_t* t : where) {
      const int64_t have = mc_sync::ld_acquire_sys(t);
      if (have == 0 || (have >> kSeqBits) < (key >> kSeqBits)) mc_sync::st_release_sys(t, key);
    }
  }
}

// A direct op (kAllReduceDirect) this rank gave up, its last block of the step, thread 0: once its kernel ends,
// no peer may write into its tensor.  PUB = key | kWithdrawn, then a system fence: a peer that re-checks PUB
// after that (every block does, after its HOLD = key and a fence, before writing) writes nothing; a peer whose
// HOLD = key may have passed its re-check, so wait until it reports DRAIN = key (its blocks are through
// writing; every rank writes DRAIN before it waits here, so two ranks never wait on each other; bounded by a
// fresh timeout).
__device__ void withdraw(const McPgDevArgs& a, int64_t* mine, int64_t base, int64_t key) {
  mc_sync::st_relaxed_sys(mine + base + kLPub, key | kWithdrawn);
  __threadfence_system();
  const uint64_t since = mc_sync::global_timer_ns();
  for (int i = 0; i < a.n; ++i) {
    const int64_t* w = words(a, i);
    if (i == a.me || mc_sync::ld_relaxed_sys(w + base + kLHold) != key) continue;
    while (mc_sync::ld_acquire_sys(w + base + kLDrain) != key &&
           static_cast<int64_t>(mc_sync::global_timer_ns() - since) <= a.timeout_ns)
      __nanosleep(256);
  }
}

// A direct op's first step ended without publishing (thread 0 of its last block): later launches of the op
// exit at once (went), and PUB = key | kWithdrawn ends the peers' waits for this rank at once (none of them saw
// PUB == key, so none writes into this rank's tensor).  Other kinds: nothing.
__device__ void not_published(const McPgDevArgs& a, int* went, int64_t key) {
  if (a.kind != kAllReduceDirect) return;
  *went = 0;
  mc_sync::st_release_sys(words(a, a.me) + a.base[key & 1] + kLPub, key | kWithdrawn);
}

// Every thread of the block: thread i < n spins while cond(i) is 0 for active rank i (not this rank): > 0 it
// holds, < 0 it never will (a peer withdrew), or until the launch's deadline; true on every thread iff it held
// for every rank.
template <typename Cond>
__device__ bool wait_all(const McPgDevArgs& a, uint64_t start, Cond cond) {
  bool ok = true;
  const int i = static_cast<int>(threadIdx.x);
  if (i < a.n && i != a.me) {
    int c = cond(i);
    while (c == 0) {
      if (static_cast<int64_t>(mc_sync::global_timer_ns() - start) > a.timeout_ns) {
        c = cond(i);
        break;
      }
      __nanosleep(32);
      c = cond(i);
    }
    ok = c > 0;
  }
  return __syncthreads_and(ok) != 0;
}

// Thread 0 of each block, once the block is through a step (or skips it): whether it is the last block of
// the launch to get there (the step's counter is reset for the next launch) and, if so, in *failed whether
// some block of the step gave up (reset too).  arrive: int32 [count of each step, failed of each step].
// Every block of a launch calls it for every step the launch runs, whichever way it leaves.
__device__ __forceinline__ bool last_block(const McPgDevArgs& a, int step, bool gave_up, bool* failed) {
  if (gridDim.x == 1) {
    *failed = gave_up;
    return true;
  }
  int* count = reinterpret_cast<int*>(a.arrive) + step;
  int* fail = count + kSteps;
  if (gave_up) atomicOr(fail, 1);
  __threadfence();
  if (atomicAdd(count, 1) != static_cast<int>(gridDim.x) - 1) return false;
  *count = 0;
  *failed = atomicExch(fail, 0) != 0;
  __threadfence();
  return true;
}

// bytes [0, n) of src to dst, every thread of the launch a share (16-byte vectors where everything is aligned)
__device__ __forceinline__ void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n, int64_t tid, int64_t nthreads) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(n)) & 15) == 0) {
    for (int64_t v = tid; v < n / 16; v += nthreads)
      reinterpret_cast<uint4*>(dst)[v] = __ldcg(reinterpret_cast<const uint4*>(src) + v);
  } else {
    for (int64_t b = tid; b < n; b += nthreads) dst[b] = __ldcg(src + b);
  }
}

__device__ __forceinline__ void zero_bytes(uint8_t* dst, int64_t n, int64_t tid, int64_t nthreads) {
  for (int64_t b = tid; b < n; b += nthreads) dst[b] = 0;
}

// out[j][e] = fold(op, in[0][e], ..., in[n-1][e]) for e in [0, numel) and each of the nout outputs, every
// thread of the launch a share: the model's fold (the one definition of it for every kind of the device
// protocol); every input element is read before the outputs are written (an output may be an input).
// Returns whether an output this thread wrote needs the host fold.
template <typename T, int OP>
__device__ __forceinline__ int fold_range(T* const* in, int n, T* const* out, int nout, int64_t numel, int64_t tid,
                                          int64_t nthreads) {
  using A = typename Acc<T>::type;
  int bad = 0;
  constexpr int kBatch = 8;  // inputs whose elements are loaded at once (in flight together), then folded in order
  for (int64_t e = tid; e < numel; e += nthreads) {
    A acc = A(0);
    for (int first = 0; first < n; first += kBatch) {
      T x[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
        if (first + j < n) x[j] = __ldcg(in[first + j] + e);
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
        if (first + j < n) acc = first + j == 0 ? widen(x[0]) : combine<OP>(acc, widen(x[j]));
    }
    const T v = narrow<T>(finalize<OP>(acc, n, bad));
    for (int j = 0; j < nout; ++j) out[j][e] = v;
  }
  return bad;
}

// Step 2's reads (the protocol above): this rank's outputs from the lanes of parity `par`.
// All_reduce in parts: part i of `count` elements (the model's fold of it is the active rank i's job).
__device__ __forceinline__ void part_range(const McPgDevArgs& a, int i, int64_t* lo, int64_t* hi) {
  *lo = min(a.count, static_cast<int64_t>(i) * a.part);
  *hi = min(a.count, *lo + a.part);
}

template <typename T, int OP>
__device__ void read_lanes(const McPgDevArgs& a, int par, int64_t tid, int64_t nthreads) {
  if (a.kind == kAllReduceParts || a.kind == kAllReduceDirect) {  // this rank's part of every lane (tensor)
    int64_t lo, hi;
    part_range(a, a.me, &lo, &hi);
    T* in[kDevMaxRanks];
    for (int i = 0; i < a.n; ++i) in[i] = reinterpret_cast<T*>(a.lane[par][i]) + lo;
    T* own = reinterpret_cast<T*>(a.lane[par][a.me] + a.rd_off) + lo;  // parts: into this lane's result region
    const int bad = a.kind == kAllReduceParts ? fold_range<T, OP>(in, a.n, &own, 1, hi - lo, tid, nthreads)
                                              : fold_range<T, OP>(in, a.n, in, a.n, hi - lo, tid, nthreads);
    if (a.flag && bad) *reinterpret_cast<volatile int*>(a.flag) = 1;
    return;
  }
  if (a.kind == kAllReduce || a.kind == kReduceScatter) {
    T* in[kDevMaxRanks];
    for (int i = 0; i < a.n; ++i) in[i] = reinterpret_cast<T*>(a.lane[par][i] + a.rd_off);
    T* out = reinterpret_cast<T*>(a.dst);
    const int bad = fold_range<T, OP>(in, a.n, &out, 1, a.count, tid, nthreads);
    if (a.flag && bad) *reinterpret_cast<volatile int*>(a.flag) = 1;
    return;
  }
  uint8_t* out = reinterpret_cast<uint8_t*>(a.dst);
  for (int s = 0; s < a.slots; ++s) {
    int from = a.kind == kBroadcast ? a.root : -1;
    for (int i = 0; from < 0 && i < a.n; ++i)
      if (a.rank[i] == s) from = i;
    uint8_t* d = out + static_cast<int64_t>(s) * a.count;
    if (from < 0) {
      zero_bytes(d, a.count, tid, nthreads);
    } else if (from != a.me || a.src != a.dst) {  // a broadcast's root holds its result already
      copy_bytes(d, reinterpret_cast<const uint8_t*>(a.lane[par][from] + a.rd_off), a.count, tid, nthreads);
    }
  }
}

// The last block of an operation's last step, once every block got through: the reads of the peers' lanes are
// over (FREE), this rank holds its results (DONE), and a captured op counts as run.
__device__ __forceinline__ void finish_op(const McPgDevArgs& a, int64_t* mine, int64_t base, int64_t key) {
  __threadfence_system();  // releases the stores below
  mc_sync::st_relaxed_sys(mine + base + kLFree, key);
  mc_sync::st_relaxed_sys(mine + base + kLDone, key);
  if (a.graph) mc_sync::st_relaxed_sys(mine + kWGraphCount, (key & ~kGraphBit) + 1);
}

// Fault injection for tests (McPgDevArgs.stall): a late publisher.  Waits the nanoseconds in this rank's host
// word kWStall, read at this point (0: none), at most a minute.
__device__ __noinline__ void stall_before_publish(const int64_t* host_words) {  // (by value: args stay in params)
  const int64_t ns = mc_sync::ld_relaxed_sys(host_words + kWStall);
  if (ns <= 0) return;
  const uint64_t until = mc_sync::global_timer_ns() + static_cast<uint64_t>(ns < 60000000000LL ? ns : 60000000000LL);
  while (mc_sync::global_timer_ns() < until) __nanosleep(1000);
}

template <typename T, int OP>
__global__ void __launch_bounds__(kDevThreads, 2) dev_collective(McPgDevArgs a) {
  __shared__ int64_t s_key;
  __shared__ int s_go;
  mc_sync::wait_previous_grid();
  mc_sync::allow_next_grid();
  const uint64_t start = mc_sync::global_timer_ns();
  const long long start_clock = clock64();
  bool failed = false;
  // a direct op run as one launch per step: whether its first launch published (then its later launches go
  // on whatever the trouble and epoch words say: a peer may be writing into this rank's tensor, see withdraw)
  const bool steps_apart = a.kind == kAllReduceDirect && gridDim.x > 1;
  int* went = reinterpret_cast<int*>(a.arrive) + 2 * kSteps;
  if (threadIdx.x == 0) {
    int64_t key = a.key;
    int go = 1;
    if (a.graph) {  // the count was written by this rank's previous kernel; trouble or a new epoch seen late
      int64_t* own = words(a, a.me);  // only delays the exit to the first wait that ends
      const int64_t epoch = key >> kSeqBits;
      const int64_t ran = mc_sync::ld_relaxed_sys(own + kWGraphCount);
      const int64_t trouble = mc_sync::ld_relaxed_sys(own + kWGraphTrouble);
      const int64_t view = mc_sync::ld_relaxed_sys(own + kWGraphEpoch);
      key |= (ran >> kSeqBits) == epoch ? (ran & (kGraphBit - 1)) : 0;
      if (steps_apart && !(a.phase & 1)) {  // written by the first launch (stream order)
        go = *reinterpret_cast<volatile int*>(went);
      } else if (view != epoch) {  // captured under an earlier view
        int64_t* stale = reinterpret_cast<int64_t*>(a.note[a.me]) + kWGraphStale;
        if (mc_sync::ld_acquire_sys(stale) == 0) mc_sync::st_release_sys(stale, key);
        go = 0;
      } else if (trouble != 0 && (trouble >> kSeqBits) >= epoch) {  // a captured op of this view gave up
        go = 0;
      }
      if (!go) {  // the block counters stay right for the next launch
        for (int step = 0; step < kSteps; ++step)
          if ((a.phase & (1 << step)) && last_block(a, step, true, &failed) && step == 0) not_published(a, went, key);
      }
    }
    s_key = key;
    s_go = go;
  }
  __syncthreads();
  if (!s_go) return;
  const int64_t key = s_key;
  trace(a, key, kGo, start, start_clock);
  const int par = static_cast<int>(key & 1);
  const int64_t base = a.base[par];
  int64_t* mine = words(a, a.me);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  if (a.phase & 1) {
    // A captured op from the epoch's third on: this rank saw every peer publish the previous one, which each
    // did after freeing the lanes of the one before (stream order): the lane of this parity is free.
    const bool known_free = (a.graph && (key & (kGraphBit - 1)) >= 2) || a.kind == kAllReduceDirect;
    const bool released = known_free || wait_all(a, start, [&](int i) {
      const int64_t* w = words(a, i);
      const int64_t held = mc_sync::ld_acquire_sys(w + base + kLHold);
      return mc_sync::ld_acquire_sys(w + base + kLFree) >= held || held >= key ? 1 : 0;
    });
    trace(a, key, kReleased);
    if (released && a.in_bytes > 0)
      copy_bytes(reinterpret_cast<uint8_t*>(a.lane[par][a.me]), reinterpret_cast<const uint8_t*>(a.src), a.in_bytes,
                 tid, nthreads);
    __syncthreads();
    if (threadIdx.x == 0) {
      if (!released) give_up(a, key);
      const bool last = last_block(a, 0, !released, &failed);
      if (last && !failed) {  // every block copied its part: publish
        if (a.stall) stall_before_publish(reinterpret_cast<const int64_t*>(a.note[a.me]));
        mine[base + kLMeta] = a.fp[0];
        mine[base + kLMetaNumel] = a.fp[1];
        mine[base + kLMetaSlots] = a.fp[2];
        __threadfence_system();  // releases the copy and the fingerprint words with PUB
        mc_sync::st_relaxed_sys(mine + base + kLPub, key);
        trace(a, key, kPublished);
      }
      if (last && failed) not_published(a, went, key);
      if (last && !failed && steps_apart) *went = 1;
    }
    if (!(a.phase & 2)) return;
    if (!released) {  // one launch of every step (a single block): the later steps are skipped too
      if (threadIdx.x == 0)
        for (int step = 1; step < kSteps; ++step)
          if (a.phase & (1 << step)) last_block(a, step, true, &failed);
      return;
    }
    __syncthreads();
  }

  const bool parts = a.kind == kAllReduceParts || a.kind == kAllReduceDirect;  // three steps
  if (a.phase & 2) {
    const bool published = wait_all(a, start, [&](int i) {
      const int64_t pub = mc_sync::ld_acquire_sys(words(a, i) + base + kLPub);
      return pub == key ? 1 : pub == (key | kWithdrawn) ? -1 : 0;
    });
    bool same = true;  // the ranks agree on the call (else the host names the difference), and this rank published
    const int t = static_cast<int>(threadIdx.x);
    if (published && t < a.n) {
      const int64_t* w = words(a, t);
      same = t == a.me ? mc_sync::ld_acquire_sys(w + base + kLPub) == key
                       : w[base + kLMeta] == a.fp[0] && w[base + kLMetaNumel] == a.fp[1] &&
                             w[base + kLMetaSlots] == a.fp[2];
    }
    bool ok = __syncthreads_and(published && same) != 0;
    trace(a, key, kPeersPublished);
    const bool direct = a.kind == kAllReduceDirect;
    if (ok && direct) {  // this block writes into the peers' tensors only if none withdrew (see withdraw)
      __shared__ int s_still;
      if (threadIdx.x == 0) {
        mc_sync::st_relaxed_sys(mine + base + kLHold, key);
        __threadfence_system();
        int still = 1;
        for (int i = 0; i < a.n; ++i) still &= mc_sync::ld_relaxed_sys(words(a, i) + base + kLPub) == key;
        s_still = still;
      }
      __syncthreads();
      ok = s_still != 0;
    }
    if (ok) {
      if (!direct && blockIdx.x == 0 && threadIdx.x == 0) mc_sync::st_relaxed_sys(mine + base + kLHold, key);
      read_lanes<T, OP>(a, par, tid, nthreads);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      if (!ok) give_up(a, key);
      trace(a, key, kRead);
      const bool last = last_block(a, 1, !ok, &failed);
      if (last && direct) {  // every block of this rank is through writing into the peers' tensors
        __threadfence_system();
        mc_sync::st_relaxed_sys(mine + base + kLDrain, key);  // before any wait for a peer's DRAIN
        if (failed) withdraw(a, mine, base, key);
      }
      if (last && !failed) {  // every block read (or folded) its part
        if (parts) {
          __threadfence_system();
          mc_sync::st_release_sys(mine + base + kLRed, key);  // this rank's part is in its result region
        } else {
          finish_op(a, mine, base, key);
          trace(a, key, kFinished);
        }
      }
    }
    if (!(a.phase & 4)) return;
    __syncthreads();
  }

  // step 3 (all_reduce in parts or direct): once every rank's part is in (parts: in its result region, copied
  // out now; direct: in this rank's tensor already), the op is done
  const bool own = __syncthreads_and(mc_sync::ld_acquire_sys(mine + base + kLRed) == key) != 0;
  const bool reduced = own && wait_all(a, start, [&](int i) {
    if (mc_sync::ld_acquire_sys(words(a, i) + base + kLRed) == key) return 1;
    return mc_sync::ld_relaxed_sys(words(a, i) + base + kLPub) == (key | kWithdrawn) ? -1 : 0;
  });
  if (reduced && a.kind == kAllReduceParts) {
    for (int i = 0; i < a.n; ++i) {
      int64_t lo, hi;
      part_range(a, i, &lo, &hi);
      copy_bytes(reinterpret_cast<uint8_t*>(a.dst) + lo * static_cast<int64_t>(sizeof(T)),
                 reinterpret_cast<const uint8_t*>(a.lane[par][i] + a.rd_off) + lo * static_cast<int64_t>(sizeof(T)),
                 (hi - lo) * static_cast<int64_t>(sizeof(T)), tid, nthreads);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (!reduced) give_up(a, key);
    const bool last = last_block(a, 2, !reduced, &failed);
    if (last && failed && own && a.kind == kAllReduceDirect) withdraw(a, mine, base, key);  // (else step 2 did)
    if (last && !failed) {  // every block copied its share: done
      finish_op(a, mine, base, key);
      trace(a, key, kFinished);
    }
  }
}

// Whether the current device schedules a kernel before the previous one of its stream ended (programmatic
// dependent launch: sm_90+, and a driver of CUDA 12.3+, which also captures it in graphs): the kernel's launch
// then overlaps its predecessor's last instructions.
bool overlapping_launch() {
  static int cached[64] = {};  // per device: 0 unknown, 1 no, 2 yes (threads racing here store the same value)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    int major = 0, driver = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDriverGetVersion(&driver);
    cached[dev] = major >= 9 && driver >= 12030 ? 2 : 1;
  }
  return cached[dev] == 2;
}

template <typename T, int OP>
cudaError_t dev_launch_one(const McPgDevArgs& a, int blocks, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kDevThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  // single-block launches only: an overlapped launch holds its blocks on the SMs while it waits, and the blocks
  // of every rank's multi-block launches must fit there together (they wait on one another)
  cfg.numAttrs = blocks == 1 && overlapping_launch() ? 1 : 0;
  const cudaError_t rc = cudaLaunchKernelEx(&cfg, dev_collective<T, OP>, a);
  if (rc != cudaSuccess) cudaGetLastError();  // returned here: not left for the caller's next launch check
  return rc;
}

template <typename T>
cudaError_t dev_launch_typed(const McPgDevArgs& a, int blocks, cudaStream_t stream) {
  switch (a.op) {
    case kSum: return dev_launch_one<T, kSum>(a, blocks, stream);
    case kProduct: return dev_launch_one<T, kProduct>(a, blocks, stream);
    case kMin: return dev_launch_one<T, kMin>(a, blocks, stream);
    case kMax: return dev_launch_one<T, kMax>(a, blocks, stream);
    case kAvg: return dev_launch_one<T, kAvg>(a, blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

MC_API int mc_pg_fold_max_inputs(void) { return kFoldMaxInputs; }

// out <- fold(op, inputs[0..num_inputs)) over numel elements of dtype (wire codes), on stream.  flag (a
// device int32, or 0) is zeroed first, then set to 1 if some output needs the host fold.  Inputs may
// alias each other but not out.  Returns a cudaError_t (cudaErrorInvalidValue for an op / dtype / count
// this kernel does not take).
MC_API int mc_pg_fold(int op, int dtype, const int64_t* inputs, int num_inputs, int64_t out, int64_t numel,
                      int64_t flag, int64_t stream) {
  if (num_inputs < 1 || num_inputs > kFoldMaxInputs || numel < 0) return (int)cudaErrorInvalidValue;
  FoldInputs in;
  int vectorized = (out % 16) == 0;
  for (int i = 0; i < num_inputs; ++i) {
    in.ptr[i] = reinterpret_cast<const void*>(inputs[i]);
    vectorized &= (inputs[i] % 16) == 0;
  }
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  int* f = reinterpret_cast<int*>(flag);
  if (f != nullptr) {
    cudaError_t rc = cudaMemsetAsync(f, 0, sizeof(int), s);
    if (rc != cudaSuccess) return (int)rc;
  }
  if (numel == 0) return (int)cudaSuccess;
  void* o = reinterpret_cast<void*>(out);
  cudaError_t rc;
  switch (dtype) {
    case kFloat16: rc = launch_typed<__half>(op, in, num_inputs, o, numel, vectorized, f, s); break;
    case kBFloat16: rc = launch_typed<__nv_bfloat16>(op, in, num_inputs, o, numel, vectorized, f, s); break;
    case kFloat32: rc = launch_typed<float>(op, in, num_inputs, o, numel, vectorized, f, s); break;
    case kFloat64: rc = launch_typed<double>(op, in, num_inputs, o, numel, vectorized, f, s); break;
    default: rc = cudaErrorInvalidValue;
  }
  return (int)rc;
}

// ---- the device protocol's entry points

MC_API int mc_pg_dev_args_size(void) { return (int)sizeof(McPgDevArgs); }
MC_API int mc_pg_dev_max_ranks(void) { return kDevMaxRanks; }
// McPgDevArgs.trace's shape: records, words per record, marks (TraceMark)
MC_API void mc_pg_dev_trace_shape(int32_t* out) {
  out[0] = kTraceRecords;
  out[1] = kTraceWords;
  out[2] = kTraceMarks;
}

// The word indices the kernels assume: graph epoch, PUB, META, DONE, HOLD, FREE, META_NUMEL, META_SLOTS,
// graph trouble, graph count, graph stale, DRAIN, stall.
MC_API void mc_pg_dev_layout(int64_t* out) {
  const int64_t w[13] = {kWGraphEpoch, kLPub, kLMeta, kLDone, kLHold, kLFree, kLMetaNumel, kLMetaSlots,
                         kWGraphTrouble, kWGraphCount, kWGraphStale, kLDrain, kWStall};
  for (int i = 0; i < 13; ++i) out[i] = w[i];
}

// Enqueue one operation of the device protocol on `stream`: blocks == 1 runs every step in one kernel, more
// runs each step (two, or three for an all_reduce in parts) as a kernel of `blocks` blocks.  Fold kinds take
// the kernel fold's dtypes and ops; copy kinds move bytes (any dtype).  Capturable in a CUDA graph.
MC_API int mc_pg_dev_launch(const McPgDevArgs* args, int blocks, int64_t stream) {
  McPgDevArgs a = *args;
  const bool parts = a.kind == kAllReduceParts || a.kind == kAllReduceDirect;
  const bool fold = a.kind == kAllReduce || a.kind == kReduceScatter || parts;
  if (a.n < 1 || a.n > kDevMaxRanks || a.me < 0 || a.me >= a.n || a.count < 0 || a.in_bytes < 0 || a.rd_off < 0 ||
      a.kind < kAllReduce || a.kind > kAllReduceDirect || (a.kind == kAllReduceDirect && a.in_bytes != 0) || (!fold && a.slots < 0) || (parts && a.part < 1) ||
      (a.kind == kBroadcast && (a.root < 0 || a.root >= a.n)) || blocks < 1 || blocks > 1024)
    return (int)cudaErrorInvalidValue;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int steps = parts ? 3 : 2;
  const int launches = blocks == 1 ? 1 : steps;
  for (int l = 0; l < launches; ++l) {
    a.phase = blocks == 1 ? (1 << steps) - 1 : 1 << l;
    cudaError_t rc;
    if (!fold) {  // the fold's type and op are not used
      rc = dev_launch_one<float, kSum>(a, blocks, s);
    } else {
      switch (a.dtype) {
        case kFloat16: rc = dev_launch_typed<__half>(a, blocks, s); break;
        case kBFloat16: rc = dev_launch_typed<__nv_bfloat16>(a, blocks, s); break;
        case kFloat32: rc = dev_launch_typed<float>(a, blocks, s); break;
        case kFloat64: rc = dev_launch_typed<double>(a, blocks, s); break;
        default: rc = cudaErrorInvalidValue;
      }
    }
    if (rc != cudaSuccess) return (int)rc;
  }
  return (int)cudaSuccess;
}

// ---- the quick lane: an eager all_reduce posted and waited for in one call each (mooncake/fast/cuda/pg.py,
// "The quick lane")

// A CUDA event that tells the host a launch is over (blocking-sync, no timing): *event receives it.
MC_API int mc_event_create(int64_t* event) {
  cudaEvent_t e = nullptr;
  cudaError_t rc = cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync);
  *event = reinterpret_cast<int64_t>(e);
  return (int)rc;
}

MC_API int mc_event_destroy(int64_t event) { return (int)cudaEventDestroy(reinterpret_cast<cudaEvent_t>(event)); }

// 0: every work recorded by the event completed; -1: not yet (the runtime's last error cleared of it, so that the
// caller's next launch check does not see it); else a CUDA error.
MC_API int mc_event_query(int64_t event) {
  cudaError_t rc = cudaEventQuery(reinterpret_cast<cudaEvent_t>(event));
  if (rc == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return -1;
  }
  return (int)rc;
}

MC_API int mc_event_sync(int64_t event) { return (int)cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(event)); }

// mc_pg_dev_launch with args->key = key, then `event` recorded on `stream` after it.
MC_API int mc_pg_dev_post(McPgDevArgs* args, int64_t key, int blocks, int64_t stream, int64_t event) {
  args->key = key;
  int rc = mc_pg_dev_launch(args, blocks, stream);
  if (rc != 0) return rc;
  return (int)cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), reinterpret_cast<cudaStream_t>(stream));
}

static inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

static inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Wait, spinning (no GIL: ctypes releases it), until every one of the `n` host words at `words` equals `key`
// (1), or the launch recorded by `event` is over without that (0: the host protocol takes over), or
// `budget_ns` passed (2: still running).  The event is queried every `slice_ns`.  A launch that is over with
// this rank's own word (`words[mine]`) holding `key` got through here: only peers' words are still on their
// way, so the spin goes on for them, within the budget.  Negative: -(CUDA error).
MC_API int mc_pg_quick_wait(const int64_t* words, int n, int mine, int64_t key, int64_t event, int64_t budget_ns,
                            int64_t slice_ns) {
  auto holds = [&](int i) {
    return __atomic_load_n(reinterpret_cast<const int64_t*>(words[i]), __ATOMIC_ACQUIRE) == key;
  };
  auto all_hold = [&]() {
    for (int i = 0; i < n; ++i)
      if (!holds(i)) return false;
    return true;
  };
  const int64_t start = now_ns();
  int64_t next_query = start + slice_ns;
  bool over = false;  // the launch is over and got through here
  for (;;) {
    if (all_hold()) return 1;
    for (int k = 0; k < 16; ++k) spin_pause();
    const int64_t now = now_ns();
    if (!over && now >= next_query) {
      const int q = mc_event_query(event);
      if (q == 0) {
        if (all_hold()) return 1;
        if (!holds(mine)) return 0;  // it gave up: its words are final
        over = true;
      } else if (q != -1) {
        return -q;
      }
      next_query = now + slice_ns;
    }
    if (now - start >= budget_ns) return 2;
  }
}

// Register host memory (a shared-memory segment of this or another process) for access from `device`
// (current for the call, so that any thread may register); *device_ptr is its address there.
MC_API int mc_host_register(int64_t ptr, int64_t bytes, int device, int64_t* device_ptr) {
  DeviceScope scope(device);
  if (scope.err != cudaSuccess) return (int)scope.err;
  void* p = reinterpret_cast<void*>(ptr);
  cudaError_t rc = cudaHostRegister(p, static_cast<size_t>(bytes), cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (rc != cudaSuccess) return (int)rc;
  void* d = nullptr;
  rc = cudaHostGetDevicePointer(&d, p, 0);
  if (rc != cudaSuccess) {
    cudaHostUnregister(p);
    return (int)rc;
  }
  *device_ptr = reinterpret_cast<int64_t>(d);
  return (int)cudaSuccess;
}

MC_API int mc_host_unregister(int64_t ptr, int device) {
  DeviceScope scope(device);
  if (scope.err != cudaSuccess) return (int)scope.err;
  return (int)cudaHostUnregister(reinterpret_cast<void*>(ptr));
}

// Let this thread make calls that a CUDA graph capture in global mode forbids (allocating and opening
// lanes while the caller captures): relaxed = 1 switches to relaxed mode and saves the mode in *saved,
// relaxed = 0 restores *saved.
MC_API int mc_capture_mode(int relaxed, int* saved) {
  cudaStreamCaptureMode mode = relaxed ? cudaStreamCaptureModeRelaxed : static_cast<cudaStreamCaptureMode>(*saved);
  cudaError_t rc = cudaThreadExchangeStreamCaptureMode(&mode);
  if (relaxed) *saved = static_cast<int>(mode);
  return (int)rc;
}
