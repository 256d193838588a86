"""The one home for launch heuristics: block sizes and warps for every kernel family."""

from __future__ import annotations

# Multi-tensor kernels: one program handles one BLOCK-sized slice of one tensor.
# Larger blocks amortise the per-program table reads; smaller blocks waste fewer
# lanes on small tensors. We take the largest block whose padding costs at most
# MAX_PADDING of the useful work.
MULTI_TENSOR_BLOCKS = (4096, 2048, 1024, 512)
MAX_PADDING = 0.125


def multi_tensor_block(numels: list[int]) -> int:
    """Largest block in MULTI_TENSOR_BLOCKS whose masked-off lanes stay under MAX_PADDING."""
    useful = sum(numels)
    for block in MULTI_TENSOR_BLOCKS:
        lanes = sum(max(1, -(-n // block)) * block for n in numels)
        if lanes - useful <= MAX_PADDING * max(useful, 1):
            return block
    return MULTI_TENSOR_BLOCKS[-1]


def multi_tensor_warps(block: int) -> int:
    """8 elements per thread: two 128-bit accesses per fp32 stream, moderate registers."""
    return max(2, min(16, block // 256))
