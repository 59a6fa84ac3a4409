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
