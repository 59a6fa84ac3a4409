"""The FP8 contract as code: per-token, per-128-channel ("ptp128c") e4m3fn quantization.

For each token and each block of 128 consecutive channels, with ``v`` the bf16 values widened to
float32 (exact) and every operation a single IEEE float32 round-to-nearest-even step (no fusion)::

    amax      = max(fl32(1e-4), max |v|)          # exact; 0x38D1B717 is fl32(1e-4)
    scale     = fl32(448 / amax)                  # one IEEE division
    scale_inv = fl32(amax * fl32(1/448))          # a multiply by 0x3B124925, not a division
    q         = e4m3fn_rne_satfinite(fl32(v * scale))

These are the bits the upstream CUDA kernel produces (``__fdiv_rn``, ``__fmul_rn``,
``cvt.rn.satfinite.e4m3x2.f32``).  Two torch spellings that look equivalent are not:
``448.0 / amax`` is ``amax.reciprocal() * 448`` (two roundings), and ``amax / 448.0`` on CPU is a
true division (differs by one ulp for about half of all amax values).

Saturation never triggers for finite inputs: ``|v| <= amax`` gives ``|v * scale| <= 448 * (1 + 2**-23)``,
which rounds to 448 (the next e4m3fn midpoint is 464), so torch's round-to-nearest-even cast gives the
satfinite result.  Non-finite inputs are outside the contract and rejected.
"""

from __future__ import annotations

import torch

#: channels that share one scale
FP8_BLOCK_CHANNELS = 128
#: largest finite float8_e4m3fn value
FP8_E4M3_MAX = 448.0

_AMAX_FLOOR_BITS = 0x38D1B717  # fl32(1e-4)
_INV_E4M3_MAX_BITS = 0x3B124925  # fl32(1 / 448)


def _fp32_constant(bits: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32, device=device).view(torch.float32)


def _check_blocks(name: str, hidden: int) -> int:
    if hidden % FP8_BLOCK_CHANNELS:
        raise ValueError(
            f"{name}: hidden size {hidden} is not a multiple of {FP8_BLOCK_CHANNELS} "
            f"(FP8 uses one scale per {FP8_BLOCK_CHANNELS} channels)"
        )
    return hidden // FP8_BLOCK_CHANNELS


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize bf16 tokens to float8_e4m3fn with one float32 scale per token and 128 channels.

    Arguments:
        x: ``[num_tokens, hidden]`` bfloat16, finite; ``hidden`` a multiple of 128.

    Returns:
        q: ``[num_tokens, hidden]`` float8_e4m3fn codes.
        scale_inv: ``[num_tokens, hidden // 128]`` float32, contiguous; ``x ≈ q * scale_inv`` blockwise.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8: x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    if x.dtype is not torch.bfloat16:
        raise ValueError(f"quantize_fp8: x must be bfloat16, got {x.dtype}")
    num_tokens, hidden = x.shape
    num_blocks = _check_blocks("quantize_fp8", hidden)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_fp8: x must be finite (inf/NaN inputs are outside the FP8 contract)")
    v = x.float().reshape(num_tokens, num_blocks, FP8_BLOCK_CHANNELS)
    amax = torch.maximum(v.abs().amax(dim=2), _fp32_constant(_AMAX_FLOOR_BITS, x.device))
    scale = torch.full_like(amax, FP8_E4M3_MAX) / amax
    scale_inv = amax * _fp32_constant(_INV_E4M3_MAX_BITS, x.device)
    q = (v * scale.unsqueeze(2)).to(torch.float8_e4m3fn).reshape(num_tokens, hidden)
    return q, scale_inv


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Undo ``quantize_fp8`` up to FP8 precision: ``fl32(float(q) * scale_inv)`` per element.

    Arguments:
        q: ``[num_tokens, hidden]`` float8_e4m3fn; ``hidden`` a multiple of 128.
        scale_inv: ``[num_tokens, hidden // 128]`` float32 (any strides).

    Returns:
        ``[num_tokens, hidden]`` float32.
    """
    if q.dim() != 2:
        raise ValueError(f"dequantize_fp8: q must be 2-D [num_tokens, hidden], got shape {tuple(q.shape)}")
    if q.dtype is not torch.float8_e4m3fn:
        raise ValueError(f"dequantize_fp8: q must be float8_e4m3fn, got {q.dtype}")
    if scale_inv.dtype is not torch.float32:
        raise ValueError(f"dequantize_fp8: scale_inv must be float32, got {scale_inv.dtype}")
    num_tokens, hidden = q.shape
    num_blocks = _check_blocks("dequantize_fp8", hidden)
    if tuple(scale_inv.shape) != (num_tokens, num_blocks):
        raise ValueError(
            f"dequantize_fp8: scale_inv must have shape {(num_tokens, num_blocks)}, got {tuple(scale_inv.shape)}"
        )
    v = q.float().reshape(num_tokens, num_blocks, FP8_BLOCK_CHANNELS) * scale_inv.unsqueeze(2)
    return v.reshape(num_tokens, hidden)
