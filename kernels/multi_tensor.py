"""Device-resident tables that let one kernel launch cover any number of tensors.

A multi-tensor launch reads two tables:

* the *tensor table*, int64 ``[T, ncol]``: one row per tensor, whose columns the kernel
  module that reads it declares once as a ``TableLayout`` (the optimizers' param, grad,
  states, step, element count and master copy in ``optim.TABLE``; the norms' address,
  element count and dtype code in ``clip.TABLE``), and builds with ``layout.row(...)``;
* the *block table*, int32 ``[B, 2]``: entry ``i`` is block ``blocks[i, 1]`` of tensor
  ``blocks[i, 0]``. Every tensor has at least one block, so a tensor with no elements
  is still visited. Grid-stride kernels launch ``grid`` programs (sized from the SM
  count, ``_launch.grid_programs``) and program ``pid`` works on entries ``pid``,
  ``pid + grid``, ...; the fills launch one program per block.

The block table depends only on the element counts and is built once per parameter
set. The tensor table is rebuilt on the host each step (addresses change when grads
are re-allocated) but uploaded only when it differs from the copy on the device, and
always into the same device buffer, so its address never changes. Neither needs a
host synchronisation.

A plan belongs to one owner (an optimizer, or one call of a clip function) and is never
shared: its table, its done-counter and its ``workspaces`` (scratch buffers a kernel
family keeps with the plan, such as the norm's per-program partials) are written by the
launches of that owner only. The owner confirms every address before it is uploaded.

Streams: an owner's launches may move from stream to stream in sequence (a CUDA graph is
captured on its own stream; the user orders the streams, as for any tensor). Two launches
of one owner running concurrently, on two streams or in two graphs replayed at once, would
share its table and workspaces as they share the params they update: that is a race, and
unsupported. What one such launch, or an aborted one, leaves behind does not outlive it: the
done-counter is zeroed in-stream before each use, and the table holds only what the host
last uploaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import grid_programs, multi_tensor_block, multi_tensor_warps

#: Per-program partials of a two-stage reduction that its last program reads at a time
PARTIALS_WIDTH = tl.constexpr(1024)
#: Elements per row of a grid-stride reduction's per-thread partials (``rows``): a divisor of every
#: aligned multi-tensor layout's run of elements a thread holds (4 or 8), so a row sits in one
#: thread's registers and its sum takes no shuffle, shared memory or barrier.
ROW = tl.constexpr(4)
#: Elements a thread holds of an unaligned block (``multi_tensor_warps``: 8 a thread, each its own
#: access, thread t holding elements t, t + BLOCK / 8, ...)
STRIDED_ROW = tl.constexpr(8)

#: Elements of the narrowest stream (16-bit) in one 16-byte access. A masked access still compiles
#: to 128-bit loads and stores where its mask is provably constant over such runs (``whole_vectors``).
VECTOR = tl.constexpr(8)


@triton.jit
def whole_vectors(numel):
    """``numel`` rounded down to whole VECTORs, with the hint that it is one: in a block whose offsets
    are contiguous from a multiple of VECTOR, ``offs < whole_vectors(numel)`` is constant over each
    vector, so an aligned short tensor (or a last block) keeps 128-bit accesses for all but its
    last ``numel % VECTOR`` elements, which go element by element (the optimizer and grad_scale take
    them first and VECTOR lanes wide: BLOCK lanes after the vectors cost fp32 Adam 16 registers)."""
    return tl.multiple_of(numel // VECTOR * VECTOR, VECTOR)


@triton.jit
def rows(x, ALIGNED: tl.constexpr, THREADS: tl.constexpr = 0):
    """A BLOCK-long block as rows to reduce along axis 1 within each thread: [BLOCK // ROW, ROW] of
    consecutive elements when ALIGNED (a thread holds runs of 4 or 8), else [BLOCK // STRIDED_ROW,
    STRIDED_ROW] of elements BLOCK // STRIDED_ROW apart (a thread holds every (BLOCK / 8)-th; rows of
    consecutive ones would span lanes and leave each thread 8 rows' accumulators: 440 B spilled).

    Grid-stride reductions keep one accumulator per row across a program's blocks (``zero_rows``)
    and reduce across the CTA once, after the block loop: a block-wide ``tl.sum`` in the loop costs
    two barriers (and shared memory) every block. The rows only place the work; any layout gives
    the same sums.

    ``THREADS`` (unaligned only): the threads of the launch, for a part of a block (a thread then
    holds x.shape[0] / THREADS elements of it, THREADS apart); 0 for a whole block."""
    if ALIGNED:
        return tl.reshape(x, (x.shape[0] // ROW, ROW))
    elif THREADS == 0:
        return tl.trans(tl.reshape(x, (STRIDED_ROW, x.shape[0] // STRIDED_ROW)))
    else:
        return tl.trans(tl.reshape(x, (x.shape[0] // THREADS, THREADS)))


@triton.jit
def zero_rows(BLOCK: tl.constexpr, ALIGNED: tl.constexpr, DTYPE: tl.constexpr):
    """Per-row accumulators of ``rows`` of a BLOCK-long block, zeroed."""
    if ALIGNED:
        return tl.zeros((BLOCK // ROW,), DTYPE)
    else:
        return tl.zeros((BLOCK // STRIDED_ROW,), DTYPE)


@triton.jit
def sum_partials(partials_ptr, count, STRIDE: tl.constexpr, WIDTH: tl.constexpr):
    """The fp64 sum of ``count`` per-program partials ``STRIDE`` apart, read WIDTH at a time; summed
    across the CTA once, after the loop."""
    total = tl.zeros((WIDTH,), tl.float64)
    for first in range(0, count, WIDTH):
        index = first + tl.arange(0, WIDTH)
        total += tl.load(partials_ptr + index * STRIDE, mask=index < count, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def block_slice(table_ptr, blocks_ptr, item, NCOL: tl.constexpr, COL_NUMEL: tl.constexpr, BLOCK: tl.constexpr,
                ALIGNED: tl.constexpr):
    """(tensor index, table row, element count, offsets, start) of block-table entry ``item``, for a
    table of NCOL columns whose element count is column COL_NUMEL."""
    tensor_idx = tl.load(blocks_ptr + 2 * item)
    block_idx = tl.load(blocks_ptr + 2 * item + 1)
    row = table_ptr + tensor_idx.to(tl.int64) * NCOL
    numel = tl.load(row + COL_NUMEL)
    start = block_idx.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return tensor_idx, row, numel, offs, start


class TableLayout:
    """The columns of a tensor table, declared once by the kernel module that reads them.

    ``index(name)`` is a column's position for the host, ``constexpr(name)`` the same for a
    kernel, and ``row(**values)`` one table row by column name (columns not given are 0).
    """

    def __init__(self, *names: str) -> None:
        self.names = names
        self.width = len(names)
        self._index = {name: i for i, name in enumerate(names)}

    def index(self, name: str) -> int:
        return self._index[name]

    def constexpr(self, name: str) -> tl.constexpr:
        return tl.constexpr(self._index[name])

    def constexprs(self, *names: str) -> tuple[tl.constexpr, ...]:
        """``constexpr(name)`` of each name, for a kernel module's column constants."""
        return tuple(map(self.constexpr, names))

    def row(self, **values: int) -> list[int]:
        unknown = set(values) - set(self._index)
        if unknown:
            raise KeyError(f"no column {sorted(unknown)} in this table (its columns: {', '.join(self.names)})")
        return [int(values.get(name, 0)) for name in self.names]


class MultiTensorPlan:
    """The tables and launch shape for one fixed list of tensor sizes on one device."""

    def __init__(self, numels: list[int], device: torch.device, layout: TableLayout,
                 max_block: int | None = None) -> None:
        self.layout = layout
        self.numels = list(numels)
        self.device = device
        self.block = multi_tensor_block(self.numels, max_block)
        self.num_warps = multi_tensor_warps(self.block)
        counts = torch.tensor([max(1, -(-n // self.block)) for n in self.numels], dtype=torch.int64)
        tensor_index = torch.repeat_interleave(torch.arange(len(self.numels)), counts)
        first_program = torch.cumsum(counts, 0) - counts
        block_index = torch.arange(len(tensor_index)) - torch.repeat_interleave(first_program, counts)
        blocks = torch.stack([tensor_index, block_index], dim=1).to(torch.int32)
        self.blocks = blocks.to(device, non_blocking=True)  # pageable memory: staged, no device sync
        self.num_blocks = int(blocks.shape[0])
        self.grid = grid_programs(self.num_blocks, device)  # programs of a grid-stride launch
        # Count of finished programs of a reduction's launch; the last one to finish combines the
        # partials. Zeroed in-stream before each launch that counts (a memset, or the optimizer's
        # step prologue), never trusted to be 0 from the last one.
        self.done = torch.zeros(1, dtype=torch.int32, device=device)
        self.table = torch.zeros((len(self.numels), layout.width), dtype=torch.int64, device=device)
        self._uploaded: list[list[int]] | None = None
        self._columns: dict[str, torch.Tensor] = {}  # upload_column's views of the table
        self.workspaces: dict = {}  # scratch buffers of the owner's kernels, made once
        self.launches: dict = {}  # a kernel family's bound launches of this plan (optim.launch)
        self.uploads = 0  # host-to-device copies of the table so far (a steady state makes none)

    def workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The plan's scratch buffer ``name``, made (uninitialised) on first use and then reused, so
        that a step captured in a CUDA graph after a warm-up step allocates nothing."""
        buffer = self.workspaces.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self.workspaces[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer

    def set_rows(self, rows: list[list[int]]) -> None:
        """Upload the tensor table if it changed since the last upload (no host sync)."""
        if rows != self._uploaded:
            self.table.copy_(torch.tensor(rows, dtype=torch.int64), non_blocking=True)
            self._uploaded = [list(row) for row in rows]
            self.uploads += 1

    def upload_column(self, name: str, values: torch.Tensor) -> None:
        """Upload one column from an int64 host tensor that the caller compared already (the
        compiled confirmation's grad addresses); later ``set_rows``/``set_column`` calls upload
        unconditionally, as the host copy they compare with no longer says what the table holds."""
        column = self._columns.get(name)
        if column is None:  # a view of the one table, which is never reallocated
            column = self._columns[name] = self.table[:, self.layout.index(name)]
        column.copy_(values, non_blocking=True)
        self._uploaded = None
        self.uploads += 1

    def set_column(self, name: str, values: list[int]) -> None:
        """Upload one column (say, the grad addresses of a new step) if it changed."""
        col = self.layout.index(name)
        uploaded = self._uploaded
        if uploaded is not None and all(row[col] == v for row, v in zip(uploaded, values)):
            return
        self.table[:, col].copy_(torch.tensor(values, dtype=torch.int64), non_blocking=True)
        self.uploads += 1
        if uploaded is not None:
            for row, v in zip(uploaded, values):
                row[col] = v
