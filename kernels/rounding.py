"""Rounding helpers shared by the kernels."""

import os

import triton
import triton.language as tl

# Triton's interpreter truncates fp32 -> bf16, where a GPU's conversion (cvt.rn) rounds to
# nearest even; it reads TRITON_INTERPRET when triton is imported, as this module does.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_like(x, ptr):
    """fp32 -> the element type of ptr, rounding to nearest even.

    On a GPU this is the plain conversion (one cvt.rn). In the interpreter bf16 is rounded
    with integer ops instead, so that both give the same bits.
    """
    if ptr.dtype.element_ty == tl.bfloat16 and INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(tl.bfloat16)
    else:
        return x.to(ptr.dtype.element_ty)
