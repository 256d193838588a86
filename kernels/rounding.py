"""Rounding helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def round_like(x, ptr):
    """fp32 -> the element type of ptr, rounding to nearest even.

    bf16 is rounded with integer ops so that triton's interpreter (which truncates) and the
    GPU (cvt.rn) give the same bits; other types use the plain conversion.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(tl.bfloat16)
    else:
        return x.to(ptr.dtype.element_ty)
