"""Device-resident tables that let one kernel launch cover any number of tensors.

A multi-tensor launch reads two tables:

* the *tensor table*, int64 ``[T, ncol]``: one row per tensor, whose columns the kernel
  module that reads it declares once as a ``TableLayout`` (the optimizers' param, grad,
  states, step, element count and master copy in ``optim.TABLE``; the norms' address,
  element count and dtype code in ``clip.TABLE``), and builds with ``layout.row(...)``;
* the *block table*, int32 ``[P, 2]``: program ``pid`` works on block
  ``blocks[pid, 1]`` of tensor ``blocks[pid, 0]``. Every tensor gets at least one
  program, so a tensor with no elements still has its step counted.

The block table depends only on the element counts and is built once per parameter
set. The tensor table is rebuilt on the host each step (addresses change when grads
are re-allocated) but uploaded only when it differs from the copy on the device, and
always into the same device buffer, so its address never changes. Neither needs a
host synchronisation.

A plan belongs to one owner (an optimizer, or one call of a clip function) and is never
shared: its table, its done-counters and its ``workspaces`` (scratch buffers a kernel
family keeps with the plan, such as the norm's fp64 accumulator) are written by the
launches of that owner only. The owner confirms every address before it is uploaded.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._launch import multi_tensor_block, multi_tensor_warps


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

    def row(self, **values: int) -> list[int]:
        unknown = set(values) - set(self._index)
        if unknown:
            raise KeyError(f"no column {sorted(unknown)} in this table (its columns: {', '.join(self.names)})")
        return [int(values.get(name, 0)) for name in self.names]


class MultiTensorPlan:
    """The tables and launch shape for one fixed list of tensor sizes on one device."""

    def __init__(self, numels: list[int], device: torch.device, layout: TableLayout) -> None:
        self.layout = layout
        self.numels = list(numels)
        self.device = device
        self.block = multi_tensor_block(self.numels)
        self.num_warps = multi_tensor_warps(self.block)
        counts = torch.tensor([max(1, -(-n // self.block)) for n in self.numels], dtype=torch.int64)
        tensor_index = torch.repeat_interleave(torch.arange(len(self.numels)), counts)
        first_program = torch.cumsum(counts, 0) - counts
        block_index = torch.arange(len(tensor_index)) - torch.repeat_interleave(first_program, counts)
        blocks = torch.stack([tensor_index, block_index], dim=1).to(torch.int32)
        self.blocks = blocks.to(device, non_blocking=True)  # pageable memory: staged, no device sync
        self.num_programs = int(blocks.shape[0])
        # Per-tensor (or, for reductions, global) count of finished programs; the last one
        # to finish does the tensor's epilogue and resets its slot, so it is all zeros
        # between launches.
        self.done = torch.zeros(max(1, len(self.numels)), dtype=torch.int32, device=device)
        self.table = torch.zeros((len(self.numels), layout.width), dtype=torch.int64, device=device)
        self._uploaded: list[list[int]] | None = None
        self.workspaces: dict = {}  # scratch buffers of the owner's kernels, made once
        self.uploads = 0  # host-to-device copies of the table so far (a steady state makes none)

    def set_rows(self, rows: list[list[int]]) -> None:
        """Upload the tensor table if it changed since the last upload (no host sync)."""
        if rows != self._uploaded:
            self.table.copy_(torch.tensor(rows, dtype=torch.int64), non_blocking=True)
            self._uploaded = [list(row) for row in rows]
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
