"""Multi-tensor gradient norms and scaling: the kernels behind clip_grad_norm_.

``grad_norm_kernel`` reduces every tensor of a table in one launch, in two stages. Its
programs stride over the plan's blocks (``MultiTensorPlan.grid`` of them, sized from the
SM count), each keeping its own fp64 partial in registers and storing it once into the
plan's partials workspace. The last program to finish (counted with one atomic per
program: the atomics of a launch do not grow with the element count) combines the
partials into the total norm and the clip coefficient ``min(max_norm / (norm + 1e-6), 1)``
and writes both to ``out``. Nothing returns to the host. Under torch.distributed the last
program stops at the combined partial (``FINALIZE=False``), written to a 3-value
workspace that the caller all-reduces before ``grad_norm_finalize_kernel``.

No overflow for large gradients: each thread's partial of a row of ``multi_tensor.ROW``
elements is computed in fp32 on values divided by the row's largest magnitude, then scaled
back and added in fp64, per thread across the program's blocks; the program sums its threads'
partials once, after its block loop (no barrier per block). NaN anywhere makes the norm NaN,
as in torch.

``grad_scale_kernel`` multiplies every tensor of a table by a coefficient read from
device memory (torch's ``_foreach_mul_`` with a tensor scalar).

Table columns: address, element count, dtype code (0 fp32, 1 bf16, 2 fp16).
Bytes per element: ``mechgpu.traffic.grad_norm_bytes`` (the norm reads each grad once) and
``grad_scale_bytes`` (scaling reads and writes it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import device_guard, mixed_width_warps
from .multi_tensor import (
    PARTIALS_WIDTH,
    VECTOR,
    MultiTensorPlan,
    TableLayout,
    block_slice,
    rows,
    sum_partials,
    whole_vectors,
    zero_rows,
)
from .rounding import round_like

#: One row per tensor: its address, element count and dtype code (DTYPE_CODES).
TABLE = TableLayout("address", "numel", "dtype_code")
_COL_ADDRESS, _COL_NUMEL, _COL_DTYPE_CODE = TABLE.constexprs("address", "numel", "dtype_code")
_NCOL = tl.constexpr(TABLE.width)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Norm kinds (constexpr): the code each p needs is different. (p = 0 is not a reduction
# here: torch's clip counts the tensors with a nonzero norm, which mechgpu.clip leaves to torch.)
KIND_L2, KIND_L1, KIND_MAX, KIND_MIN, KIND_LP = range(5)
_KIND_L2 = tl.constexpr(KIND_L2)
_KIND_L1 = tl.constexpr(KIND_L1)
_KIND_MAX = tl.constexpr(KIND_MAX)
_KIND_MIN = tl.constexpr(KIND_MIN)
_KIND_LP = tl.constexpr(KIND_LP)
WORKSPACE_SIZE = 3  # fp64: sum of |g|^p, NaN count, max or min of |g|; per program, and combined
_WORKSPACE_SIZE = tl.constexpr(WORKSPACE_SIZE)


def norm_kind(norm_type: float) -> int:
    if norm_type == 2.0:
        return KIND_L2
    if norm_type == 1.0:
        return KIND_L1
    if norm_type == math.inf:
        return KIND_MAX
    if norm_type == -math.inf:
        return KIND_MIN
    if norm_type == 0.0:
        raise ValueError("the p = 0 'norm' has no kernel; mechgpu.clip computes it with torch")
    return KIND_LP


def new_workspace(kind: int, device: torch.device) -> torch.Tensor:
    """A 3-value fp64 workspace holding the combine's identity (no |g|^p, no NaN, no extreme)."""
    extreme = math.inf if kind == KIND_MIN else 0.0
    return torch.tensor([0.0, 0.0, extreme], dtype=torch.float64, device=device)


@triton.jit
def _typed_ptr(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """An address from the table as a typed pointer (16-byte aligned when ALIGNED).

    The alignment hint must be applied to a fresh value, not to a reassigned function
    argument, or the compiler drops it and emits scalar accesses.
    """
    ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load_typed(ptr, offs, mask):
    if mask is None:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_any(row, offs, mask, ALIGNED: tl.constexpr):
    """The block of a tensor of any float dtype, as fp32 (zeros where masked)."""
    code = tl.load(row + _COL_DTYPE_CODE)
    address = tl.load(row + _COL_ADDRESS)
    if code == 0:
        x = _load_typed(_typed_ptr(address, tl.float32, ALIGNED), offs, mask)
    elif code == 1:
        x = _load_typed(_typed_ptr(address, tl.bfloat16, ALIGNED), offs, mask)
    else:
        x = _load_typed(_typed_ptr(address, tl.float16, ALIGNED), offs, mask)
    return x


@triton.jit
def _row_partial(a, mask, norm_type, KIND: tl.constexpr):
    """fp64 partial of |g|^p per row of magnitudes a ([rows, ROW], NaN-free, >= 0; masked lanes hold 0),
    each row computed in fp32 on its values divided by the row's largest, then scaled back in fp64."""
    largest = tl.max(a, axis=1)
    inv = tl.where(largest > 0.0, 1.0 / tl.where(largest > 0.0, largest, 1.0), 0.0)
    scaled = a * inv[:, None]
    if KIND == _KIND_L2:
        s = tl.sum(scaled * scaled, axis=1)
        largest64 = largest.to(tl.float64)
        partial = largest64 * largest64 * s.to(tl.float64)
    elif KIND == _KIND_L1:
        partial = largest.to(tl.float64) * tl.sum(scaled, axis=1).to(tl.float64)
    elif KIND == _KIND_LP:  # any other p: |g|^p = exp2(p log2 |g|) on magnitudes scaled to <= 1
        zero_power = tl.where(norm_type < 0.0, float("inf"), 0.0)  # 0^p
        powered = tl.where(scaled > 0.0, tl.exp2(norm_type * tl.log2(tl.where(scaled > 0.0, scaled, 1.0))), zero_power)
        if mask is not None:  # a masked lane is no element: it must not add 0^p (inf for p < 0)
            powered = tl.where(mask, powered, 0.0)
        log2_scale = norm_type * tl.log2(tl.where(largest > 0.0, largest, 1.0))
        partial = tl.exp2(log2_scale.to(tl.float64)) * tl.sum(powered, axis=1).to(tl.float64)
        partial = tl.where(largest > 0.0, partial, tl.sum(powered, axis=1).to(tl.float64))
    else:
        tl.static_assert(False, "grad norm: KIND has no sum of |g|^p")
    # an inf in the row: the sum is inf (the scaled values above are NaN/0)
    return tl.where(largest == float("inf"), float("inf"), partial)


@triton.jit
def _row_values(row, offs, mask, norm_type, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """One block's (fp64 partial of |g|^p, int32 NaN count, max or min of |g|) per row of ROW elements
    (``multi_tensor.rows``: each row within one thread, so no barrier), by KIND."""
    a = rows(tl.abs(_load_any(row, offs, mask, ALIGNED)), ALIGNED)
    if mask is not None:
        mask = rows(mask, ALIGNED)
    is_nan = a != a
    nan_count = tl.sum(is_nan.to(tl.int32), axis=1)
    a = tl.where(is_nan, 0.0, a)
    partial = tl.zeros((a.shape[0],), tl.float64)
    if KIND == _KIND_MAX:
        extreme = tl.max(a, axis=1)
    elif KIND == _KIND_MIN:
        if mask is not None:
            a = tl.where(mask, a, float("inf"))
        extreme = tl.min(a, axis=1)
    else:
        extreme = tl.zeros((a.shape[0],), tl.float32)
        partial = _row_partial(a, mask, norm_type, KIND)
    return partial, nan_count, extreme


@triton.jit
def _combine_extreme(a, b, KIND: tl.constexpr):
    """The running max (or, for p = -inf, min) of |g|."""
    if KIND == _KIND_MIN:
        return tl.minimum(a, b)
    else:
        return tl.maximum(a, b)


@triton.jit
def _reduce_extreme(x, KIND: tl.constexpr):
    """The max (or, for p = -inf, min) of x."""
    if KIND == _KIND_MIN:
        return tl.min(x, axis=0)
    else:
        return tl.max(x, axis=0)


@triton.jit
def _finalize(total_pow, nan_count, extreme, out_ptr, grad_scale_ptr, norm_type, max_norm,
              KIND: tl.constexpr, UNSCALE: tl.constexpr):
    """Combined (sum |g|^p, NaN count, max or min |g|) -> (total norm, clip coefficient) in out."""
    if KIND == _KIND_L2:
        total = tl.sqrt(total_pow).to(tl.float32)
    elif KIND == _KIND_L1:
        total = total_pow.to(tl.float32)
    elif KIND == _KIND_MAX or KIND == _KIND_MIN:
        total = extreme.to(tl.float32)
    elif KIND == _KIND_LP:
        # total_pow^(1/p) without leaving fp64's range: split off the binary exponent
        bits = total_pow.to(tl.int64, bitcast=True)
        exponent = ((bits >> 52) & 0x7FF) - 1023
        mantissa = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
        log2_total = exponent.to(tl.float32) + tl.log2(mantissa.to(tl.float32))
        total = tl.exp2(log2_total / norm_type)
        # 0^(1/p) and inf^(1/p): 0 and inf for p > 0, the other way round for p < 0
        low = tl.where(norm_type > 0.0, 0.0, float("inf"))
        total = tl.where(total_pow == 0.0, low, total)
        total = tl.where(total_pow == float("inf"), tl.where(norm_type > 0.0, float("inf"), 0.0), total)
    else:
        tl.static_assert(False, "grad norm: unknown KIND")
    if UNSCALE:
        total = total / tl.load(grad_scale_ptr).to(tl.float32)
    total = tl.where(nan_count > 0.0, float("nan"), total)
    coef = tl.minimum(max_norm * tl.div_rn(1.0, total + 1e-6), 1.0)  # torch: reciprocal, then multiply
    coef = tl.where(total != total, total, coef)  # torch: NaN norm -> NaN coefficient
    tl.store(out_ptr, total)
    tl.store(out_ptr + 1, coef)


@triton.jit
def grad_norm_kernel(table_ptr, blocks_ptr, done_ptr, partials_ptr, acc_ptr, out_ptr, grad_scale_ptr,
                     norm_type, max_norm, num_blocks,
                     KIND: tl.constexpr, FINALIZE: tl.constexpr, UNSCALE: tl.constexpr,
                     ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The p-norm of all tensors of a table together, and the clip coefficient.

    out[0] = (sum_i |g_i|^p)^(1/p) (max/min |g| for p = +-inf),
    divided by grad_scale when UNSCALE; out[1] = min(max_norm / (out[0] + 1e-6), 1).
    Without FINALIZE, acc[0:3] = (sum |g|^p, NaN count, max or min |g|) instead.
    Reads each element once (``mechgpu.traffic.grad_norm_bytes``), plus 24 bytes of partials
    written and read per program.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    # per thread and row (multi_tensor.rows), across the program's blocks: reduced once after the loop
    total = zero_rows(BLOCK, ALIGNED, tl.float64)
    nan_count = zero_rows(BLOCK, ALIGNED, tl.int32)
    extreme = zero_rows(BLOCK, ALIGNED, tl.float32)
    if KIND == _KIND_MIN:
        extreme = extreme + float("inf")
    for item in range(pid, num_blocks, programs):
        _, row, numel, offs, start = block_slice(table_ptr, blocks_ptr, item, _NCOL, _COL_NUMEL, BLOCK, ALIGNED)
        if start + BLOCK <= numel:
            block_total, block_nans, block_extreme = _row_values(row, offs, None, norm_type, KIND, ALIGNED)
        elif ALIGNED:  # a short tensor or a last block: its whole vectors (128-bit), then the rest
            # (the rest BLOCK lanes wide: VECTOR lanes, as the optimizer and grad_scale take it, left the
            # l_p norm's registers to ptxas's choice of 48 on sm_80, with 12 B spilled)
            vectors = whole_vectors(numel)
            block_total, block_nans, block_extreme = _row_values(row, offs, offs < vectors, norm_type, KIND, ALIGNED)
            if vectors < numel:
                tail_total, tail_nans, tail_extreme = _row_values(row, offs, (offs >= vectors) & (offs < numel),
                                                                  norm_type, KIND, ALIGNED)
                block_total += tail_total
                block_nans += tail_nans
                block_extreme = _combine_extreme(block_extreme, tail_extreme, KIND)
        else:
            block_total, block_nans, block_extreme = _row_values(row, offs, offs < numel, norm_type, KIND, ALIGNED)
        total += block_total
        nan_count += block_nans
        extreme = _combine_extreme(extreme, block_extreme, KIND)
    mine = partials_ptr + pid * _WORKSPACE_SIZE
    tl.store(mine, tl.sum(total, axis=0))
    tl.store(mine + 1, tl.sum(nan_count.to(tl.float64), axis=0))
    tl.store(mine + 2, _reduce_extreme(extreme, KIND).to(tl.float64))
    finished = tl.atomic_add(done_ptr, 1)  # acq_rel: the partials stored before it are visible after it
    if finished == programs - 1:
        all_total = sum_partials(partials_ptr, programs, _WORKSPACE_SIZE, PARTIALS_WIDTH)
        all_nans = sum_partials(partials_ptr + 1, programs, _WORKSPACE_SIZE, PARTIALS_WIDTH)
        # the extreme, per thread across the loop, then across the CTA
        if KIND == _KIND_MIN:
            extremes = tl.full((PARTIALS_WIDTH,), float("inf"), tl.float64)
        else:
            extremes = tl.zeros((PARTIALS_WIDTH,), tl.float64)
        for first in range(0, programs, PARTIALS_WIDTH):
            index = first + tl.arange(0, PARTIALS_WIDTH)
            partial = tl.load(partials_ptr + index * _WORKSPACE_SIZE + 2, mask=index < programs,
                              other=float("inf") if KIND == _KIND_MIN else 0.0)
            extremes = _combine_extreme(extremes, partial, KIND)
        all_extreme = _reduce_extreme(extremes, KIND)
        if FINALIZE:
            _finalize(all_total, all_nans, all_extreme, out_ptr, grad_scale_ptr, norm_type, max_norm, KIND, UNSCALE)
        else:
            tl.store(acc_ptr, all_total)
            tl.store(acc_ptr + 1, all_nans)
            tl.store(acc_ptr + 2, all_extreme)


@triton.jit
def grad_norm_finalize_kernel(acc_ptr, out_ptr, grad_scale_ptr, norm_type, max_norm,
                              KIND: tl.constexpr, UNSCALE: tl.constexpr):
    """One program: finish a norm whose workspace was all-reduced across ranks."""
    _finalize(tl.load(acc_ptr), tl.load(acc_ptr + 1), tl.load(acc_ptr + 2), out_ptr, grad_scale_ptr,
              norm_type, max_norm, KIND, UNSCALE)


@triton.jit
def _scale_any(row, offs, mask, coef, ALIGNED: tl.constexpr):
    code = tl.load(row + _COL_DTYPE_CODE)
    address = tl.load(row + _COL_ADDRESS)
    if code == 0:
        _scale_typed(_typed_ptr(address, tl.float32, ALIGNED), offs, mask, coef)
    elif code == 1:
        _scale_typed(_typed_ptr(address, tl.bfloat16, ALIGNED), offs, mask, coef)
    else:
        _scale_typed(_typed_ptr(address, tl.float16, ALIGNED), offs, mask, coef)


@triton.jit
def _scale_typed(ptr, offs, mask, coef):
    x = tl.load(ptr + offs, mask=mask).to(tl.float32)
    tl.store(ptr + offs, round_like(x * coef, ptr), mask=mask)


@triton.jit
def grad_scale_kernel(table_ptr, blocks_ptr, coef_ptr, num_blocks, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """g <- g * coef for every tensor of a table, coef read from device memory; grid-stride
    over the plan's blocks. Launched with 4 elements a thread (``_launch.mixed_width_warps``): its
    fp32 and 16-bit branches then share one layout (with 8, triton staged every fp32 block's stores
    through 8 KiB of shared memory, with barriers); 16-bit grads take 64-bit accesses.

    Reads and writes each element (``mechgpu.traffic.grad_scale_bytes``).
    """
    coef = tl.load(coef_ptr).to(tl.float32)
    for item in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        _, row, numel, offs, start = block_slice(table_ptr, blocks_ptr, item, _NCOL, _COL_NUMEL, BLOCK, ALIGNED)
        if start + BLOCK <= numel:
            _scale_any(row, offs, None, coef, ALIGNED)
        elif ALIGNED:  # a short tensor or a last block: its last numel % VECTOR elements, then whole vectors
            vectors = whole_vectors(numel)
            if vectors < numel:
                tail_offs = vectors + tl.arange(0, VECTOR)
                _scale_any(row, tail_offs, tail_offs < numel, coef, ALIGNED)
            _scale_any(row, offs, offs < vectors, coef, ALIGNED)
        else:
            _scale_any(row, offs, offs < numel, coef, ALIGNED)


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------
def norm_rows(tensors: list[torch.Tensor]) -> list[list[int]]:
    return [TABLE.row(address=t.data_ptr(), numel=t.numel(), dtype_code=DTYPE_CODES[t.dtype]) for t in tensors]


def plan_workspace(plan: MultiTensorPlan, kind: int) -> torch.Tensor:
    """The plan's own fp64 workspace for norms of ``kind``, made on first use (so a captured
    step allocates and copies nothing)."""
    workspace = plan.workspaces.get(kind)
    if workspace is None:
        workspace = plan.workspaces[kind] = new_workspace(kind, plan.device)
    return workspace


def grad_norm(plan: MultiTensorPlan, workspace: torch.Tensor, out: torch.Tensor, *, norm_type: float,
              max_norm: float, aligned: bool, finalize: bool = True,
              grad_scale: torch.Tensor | None = None) -> None:
    """Launch the norm over every tensor in ``plan`` (table rows from ``norm_rows``)."""
    kind = norm_kind(norm_type)
    values = dict(partials_ptr=plan.workspace("norm_partials", (plan.grid, WORKSPACE_SIZE), torch.float64),
                  acc_ptr=workspace, out_ptr=out, grad_scale_ptr=grad_scale if grad_scale is not None else out,
                  norm_type=float(norm_type) if math.isfinite(norm_type) else 0.0, max_norm=float(max_norm))
    variant = dict(KIND=kind, FINALIZE=finalize, UNSCALE=grad_scale is not None, ALIGNED=aligned)

    def arguments() -> dict:
        return dict(table_ptr=plan.table, blocks_ptr=plan.blocks, done_ptr=plan.done, **values,
                    num_blocks=plan.num_blocks, **variant, BLOCK=plan.block, num_warps=plan.num_warps)

    with device_guard(plan.device):
        # zeroed in-stream before the launch (a memset a CUDA graph captures): a counter an aborted
        # launch left non-zero cannot spoil this norm
        plan.done.zero_()
        _launch.launch_bound(plan.launches, ("grad_norm", *variant.values()), grad_norm_kernel, (plan.grid,),
                             arguments, values)


def grad_norm_finalize(workspace: torch.Tensor, out: torch.Tensor, *, norm_type: float, max_norm: float,
                       grad_scale: torch.Tensor | None = None) -> None:
    with device_guard(workspace.device):
        grad_norm_finalize_kernel[(1,)](
            workspace, out, grad_scale if grad_scale is not None else out,
            float(norm_type) if math.isfinite(norm_type) else 0.0, float(max_norm),
            KIND=norm_kind(norm_type), UNSCALE=grad_scale is not None,
        )


def scale_(plan: MultiTensorPlan, coef: torch.Tensor, *, aligned: bool) -> None:
    """Multiply every tensor in ``plan`` by the 0-d device tensor ``coef`` (one launch)."""
    with device_guard(plan.device):
        grad_scale_kernel[(plan.grid,)](plan.table, plan.blocks, coef, plan.num_blocks, ALIGNED=aligned,
                                        BLOCK=plan.block, num_warps=mixed_width_warps(plan.block))



def aot_variants() -> list:
    from ._launch import MULTI_TENSOR_BLOCKS, multi_tensor_warps
    from .aot import variant

    block = MULTI_TENSOR_BLOCKS[0]
    warps = multi_tensor_warps(block)
    sig = {"table_ptr": "*i64", "blocks_ptr": "*i32", "done_ptr": "*i32", "partials_ptr": "*fp64",
           "acc_ptr": "*fp64", "out_ptr": "*fp32", "grad_scale_ptr": "*fp32", "norm_type": "fp32",
           "max_norm": "fp32", "num_blocks": "i32"}
    variants = []
    for kind, label in ((KIND_L2, "l2"), (KIND_L1, "l1"), (KIND_MAX, "inf"), (KIND_MIN, "-inf"),
                        (KIND_LP, "lp")):
        cx = {"KIND": kind, "FINALIZE": True, "UNSCALE": kind == KIND_L2, "ALIGNED": True, "BLOCK": block}
        variants.append(variant(f"grad_norm[{label}]", grad_norm_kernel, sig, cx, True, warps,
                                vector_stores=False))
    fin_sig = {"acc_ptr": "*fp64", "out_ptr": "*fp32", "grad_scale_ptr": "*fp32", "norm_type": "fp32",
               "max_norm": "fp32"}
    fin = variant("grad_norm_finalize[l2]", grad_norm_finalize_kernel, fin_sig,
                  {"KIND": KIND_L2, "UNSCALE": True}, False, 1)
    scale_sig = {"table_ptr": "*i64", "blocks_ptr": "*i32", "coef_ptr": "*fp32", "num_blocks": "i32"}
    scale = variant("grad_scale", grad_scale_kernel, scale_sig, {"ALIGNED": True, "BLOCK": block}, True,
                    mixed_width_warps(block))
    return variants + [fin, scale]
