// FP8 (E4M3) quantization of one 128-channel group by one warp: the one definition used by EP dispatch,
// the quantizer self-test kernel and the NVSHMEM prototype (the contract: docs/ep-semantics.md, FP8).
#pragma once

#include <cuda_fp8.h>
#include <stdint.h>

// Lane i holds channels 4i .. 4i+3 of the group in v.  amax = max(fl32(1e-4), max |v| over the group),
// scale = 448 / amax (rounded once), code = E4M3(v * scale) saturated to finite.  Returns the lane's four
// codes packed (channel 4i+j in byte j); *scale_inv = amax * fl32(1/448), the group's dequantization factor.
// Every lane of the warp must call it.
__device__ __forceinline__ uint32_t mc_fp8_quantize_group(const float v[4], float* scale_inv) {
  float amax = __int_as_float(0x38D1B717);  // fl32(1e-4)
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = __fdiv_rn(448.0f, amax);
  *scale_inv = __fmul_rn(amax, __int_as_float(0x3B124925));  // fl32(1/448)
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    packed |= (uint32_t)__nv_cvt_float_to_fp8(__fmul_rn(v[i], scale), __NV_SATFINITE, __NV_E4M3) << (8 * i);
  return packed;
}
