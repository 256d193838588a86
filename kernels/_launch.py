"""The one home for launch heuristics: block sizes and warps for every kernel family."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import triton.language as tl

from ._interpreter import skip_repeated_lang_patches

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # as triton reads it, at import
    skip_repeated_lang_patches()

#: torch dtype -> triton dtype, for the dtypes the kernels take
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def device_guard(device: torch.device):
    """Make ``device`` current for a launch (triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def compiled_variants(jit_fn) -> int:
    """How many specialisations of ``jit_fn`` triton has compiled in this process, on all devices.

    ``jit_fn.device_caches`` maps a device to (kernel_cache, kernel_key_cache, target, backend,
    binder), and kernel_cache maps a specialisation key to its CompiledKernel (triton 3.6 to
    3.9; tests/test_compile.py checks it in a compile-only process). Interpreted kernels
    (TRITON_INTERPRET=1) compile nothing: 0.
    """
    return sum(len(entry[0]) for entry in getattr(jit_fn, "device_caches", {}).values())

# ----------------------------------------------------------------------------------
# The lean launch: triton's compiled kernel bound once per specialisation
# ----------------------------------------------------------------------------------
# ``kernel[grid](**arguments)`` binds the arguments to the signature, computes their
# specialisation (types, 16-byte alignment of pointers, ints equal to 1 or divisible by 16) and
# looks the compiled kernel up: about 20 µs of host time per launch. ``launch`` does that once for
# each ``specialisation`` below, which is at least as fine as triton's (exact ints, the dtype,
# device and alignment of each tensor, every constexpr and launch option), then calls the
# compiled kernel's launcher with the arguments in signature order, on the current stream (a
# CUDA graph's capture stream included). It falls back to the normal call under the interpreter,
# with pre-run hooks, and where triton's internals differ from 3.4-3.9's (``triton.knobs`` and its
# ``runtime`` launch hooks, ``CompiledKernel.run/function/packed_metadata/launch_metadata``; a
# compile future from asynchronous compilation is not bound). triton 3.4-3.6's ``JITFunction.run``
# launches with the same call as 3.9's, which ``_run`` makes.
try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction

    _LEAN = hasattr(_knobs.runtime, "launch_enter_hook") and hasattr(_knobs.runtime, "launch_exit_hook")
except ImportError:  # an older triton: the normal call only
    _LEAN = False

#: (kernel, device, specialisation) -> (compiled kernel, argument names in signature order)
_BOUND: dict[tuple, tuple] = {}
_UNBINDABLE: set = set()  # kernels whose compiled form this triton does not let us call


def specialisation(arguments: dict) -> tuple:
    """What decides which compiled kernel triton picks for ``arguments``: a float is any float
    (triton passes it as fp32 and never specialises on it), a tensor its dtype, device and 16-byte
    alignment, anything else (ints, bools, constexprs, options) its value."""
    key = []
    for value in arguments.values():
        kind = type(value)
        if kind is float:
            key.append(float)
        elif isinstance(value, torch.Tensor):
            key.append((value.dtype, value.get_device(), value.data_ptr() % 16 == 0))
        else:
            key.append(value)
    return tuple(key)


def launch(kernel, grid: tuple, arguments: dict) -> None:
    """``kernel[grid](**arguments)``, through the bound launcher once triton has compiled it for
    this specialisation."""
    if not _LEAN or not isinstance(kernel, _JITFunction) or kernel.pre_run_hooks or kernel in _UNBINDABLE:
        kernel[grid](**arguments)
        return
    device = _driver.active.get_current_device()
    key = (kernel, device, specialisation(arguments))
    bound = _BOUND.get(key)
    if bound is None:
        compiled = kernel[grid](**arguments)
        if compiled is not None and all(hasattr(compiled, a) for a in ("function", "packed_metadata",
                                                                          "launch_metadata")):
            _BOUND[key] = (compiled, kernel.arg_names)
        return
    compiled, names = bound
    try:
        args = [arguments[name] for name in names]
        launcher = compiled.run
    except (AttributeError, KeyError):  # not the internals this was written for
        _UNBINDABLE.add(kernel)
        kernel[grid](**arguments)
        return
    _run(compiled, launcher, tuple(grid) + (1,) * (3 - len(grid)), device, args)


def _run(compiled, launcher, grid: tuple, device: int, args: list) -> None:
    """What ``JITFunction.run`` does once it has the compiled kernel (triton 3.4-3.9): the launcher
    on the current stream, with the launch hooks and their metadata."""
    stream = _driver.active.get_current_stream(device)
    enter = _knobs.runtime.launch_enter_hook
    metadata = None if enter is None else compiled.launch_metadata(grid, stream, *args)
    launcher(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata, enter,
             _knobs.runtime.launch_exit_hook, *args)


def _tensor_spec(value: torch.Tensor) -> tuple:
    return value.dtype, value.get_device(), value.data_ptr() % 16 == 0


class Bound:
    """One kernel's launch with every argument fixed but a few (``slots``): the compiled kernel
    triton picked for a first launch, and that launch's arguments in signature order. ``fill``
    puts new values in the slots if they keep triton's choice (a float for a float; a tensor of
    the same dtype, device and alignment for a tensor), ``run`` launches on the current stream."""

    __slots__ = ("compiled", "launcher", "grid", "device", "template", "slots", "own", "own_spec")

    @classmethod
    def of(cls, kernel, grid: tuple, arguments: dict, values: dict, own: torch.Tensor | None = None) -> Bound | None:
        """The bound form of the launch ``launch(kernel, grid, arguments)`` just made, with the
        arguments named in ``values`` as its slots; None where triton's launcher cannot be bound.
        ``own``: a buffer of the caller's that slots may hold (a spare pointer for an unused argument),
        whose dtype, device and address never change: taken without its checks."""
        if not _LEAN or not isinstance(kernel, _JITFunction) or kernel in _UNBINDABLE:
            return None
        device = _driver.active.get_current_device()
        entry = _BOUND.get((kernel, device, specialisation(arguments)))
        if entry is None:
            return None
        compiled, names = entry
        bound = cls()
        bound.compiled, bound.grid, bound.device = compiled, tuple(grid) + (1,) * (3 - len(grid)), device
        bound.launcher = compiled.run  # loaded by the launch just made
        bound.template = [arguments[name] for name in names]
        bound.own, bound.own_spec = own, None if own is None else _tensor_spec(own)
        bound.slots = []
        for position, name in enumerate(names):
            if name in values:
                value = arguments[name]
                spec = float if type(value) is float else _tensor_spec(value) if isinstance(value, torch.Tensor) \
                    else None
                if spec is None:  # an int or constexpr slot would choose the kernel: not a slot
                    return None
                bound.slots.append((position, name, spec))
                bound.template[position] = None  # no reference kept to a user's tensor
        return bound

    def fill(self, values: dict) -> list | None:
        args = self.template.copy()
        own = self.own
        for position, name, spec in self.slots:
            value = values[name]
            if type(value) is float:
                if spec is not float:
                    return None
            elif value is own:
                if self.own_spec != spec:
                    return None
            elif not isinstance(value, torch.Tensor) or _tensor_spec(value) != spec:
                return None
            args[position] = value
        return args

    def run(self, args: list) -> None:
        _run(self.compiled, self.launcher, self.grid, self.device, args)


def launch_bound(launches: dict, key: tuple, kernel, grid: tuple, make_arguments: Callable[[], dict],
                 values: dict, own: torch.Tensor | None = None) -> None:
    """``launch(kernel, grid, make_arguments())``, through the ``Bound`` kept in ``launches`` (a plan's)
    under ``key`` once there is one: only ``values`` (the arguments that change from launch to launch,
    by name; ``make_arguments()`` holds them too) are filled in. ``key`` must name everything else
    ``make_arguments`` depends on."""
    bound = launches.get(key)
    if bound is not None:
        args = bound.fill(values)
        if args is not None:
            bound.run(args)
            return
    arguments = make_arguments()
    launch(kernel, grid, arguments)
    bound = Bound.of(kernel, grid, arguments, values, own=own)
    if bound is not None:
        launches[key] = bound


# Multi-tensor kernels: one program handles one BLOCK-sized slice of one tensor.
# Larger blocks amortise the per-program table reads; smaller blocks waste fewer
# lanes on small tensors. We take the largest block whose padding costs at most
# MAX_PADDING of the useful work.
# 2048 at most: 8 warps of 8 elements per thread, so that the heaviest variants (up to 128
# registers) still keep two CTAs resident in a 64K register file (kernels/aot.py, ctas_per_sm).
MULTI_TENSOR_BLOCKS = (2048, 1024, 512)
MAX_PADDING = 0.125


def multi_tensor_block(numels: list[int], max_block: int | None = None) -> int:
    """Largest block in MULTI_TENSOR_BLOCKS (up to ``max_block``) whose masked-off lanes stay under
    MAX_PADDING."""
    useful = sum(numels)
    for block in MULTI_TENSOR_BLOCKS:
        if max_block is not None and block > max_block and block != MULTI_TENSOR_BLOCKS[-1]:
            continue
        lanes = sum(max(1, -(-n // block)) * block for n in numels)
        if lanes - useful <= MAX_PADDING * max(useful, 1):
            return block
    return MULTI_TENSOR_BLOCKS[-1]


def multi_tensor_warps(block: int) -> int:
    """8 elements per thread: two 128-bit accesses per fp32 stream, moderate registers."""
    return max(2, min(8, block // 256))


def mixed_width_warps(block: int) -> int:
    """Warps for an aligned multi-tensor update whose streams mix 16-bit and fp32 elements (bf16/fp16
    params with fp32 states or masters): 4 elements per thread, so that a 16-bit stream's 8-byte access
    and an fp32 stream's 16-byte access give each thread the same elements. With 8 per thread
    triton gives the 16-bit streams 8 and the fp32 ones 4 and converts between the two layouts
    through shared memory, with barriers, in every block."""
    return 2 * multi_tensor_warps(block)


#: Resident CTAs per SM a multi-tensor update keeps at least (kernels/aot.py checks it)
MIN_RESIDENT_CTAS = 2
REGISTERS_PER_SM = 65536


def register_budget(num_warps: int) -> int:
    """Registers per thread that keep MIN_RESIDENT_CTAS CTAs of ``num_warps`` warps resident: passed
    to ptxas as ``.maxnreg``. Without it ptxas may hold a kernel at 64 registers for occupancy and
    spill what its slow-path sqrt and division calls keep live (Adagrad over unaligned tensors did)."""
    return REGISTERS_PER_SM // (MIN_RESIDENT_CTAS * num_warps * 32)


# Grid-stride multi-tensor launches (optimizer steps, norms, scaling): each program walks
# blocks pid, pid + P, pid + 2P, ... of the block table, so its prologue (grad control,
# hyperparameters) and its share of a reduction are paid once per program, not per block.
# P is sized from the SM count: 12 programs per SM divide evenly into waves of 2, 3, 4 or 6
# resident CTAs (every launched variant keeps at least 2, tests/test_compile.py), so no SM
# idles through a short last wave. The interpreter has no SMs: CPU_PROGRAMS programs, few
# enough that the tests' tensors give each program several blocks.
PROGRAMS_PER_SM = 12
CPU_PROGRAMS = 3


def grid_programs(num_blocks: int, device: torch.device) -> int:
    """Programs of a grid-stride launch over ``num_blocks`` blocks on ``device`` (at least 1)."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM
    else:
        cap = CPU_PROGRAMS
    return max(1, min(num_blocks, cap))


# Random fills (kernels/init.py): a fill only stores, and one Philox4x32 call feeds four
# neighbouring elements, so a program of BLOCK elements makes BLOCK / 4 Philox calls. A
# single-tensor fill takes the block a multi-tensor launch of that one tensor would take.
def fill_block(numel: int) -> int:
    """Block for a single-tensor fill of ``numel`` elements."""
    return multi_tensor_block([numel])


def fill_warps(block: int) -> int:
    """Warps for a fill program of ``block`` elements."""
    return multi_tensor_warps(block)


# Elementwise kernels (activations): a flat 1-D grid, one program per BLOCK elements.
# Large tensors take 4096-element blocks over 8 warps: 16 elements per thread, four
# 128-bit accesses per fp32 stream in flight. Below ELEMENTWISE_SMALL_NUMEL, 1024-element
# blocks over 4 warps give 4x more programs, so a mid-sized tensor still reaches every SM.
# Each block must hold a whole number of 32-bit mask words (BLOCK % 32 == 0).
ELEMENTWISE_BLOCKS = (4096, 1024)
ELEMENTWISE_SMALL_NUMEL = 1 << 22


def elementwise_block(numel: int) -> int:
    """Elements per program for an elementwise kernel over ``numel`` elements."""
    return ELEMENTWISE_BLOCKS[0] if numel >= ELEMENTWISE_SMALL_NUMEL else ELEMENTWISE_BLOCKS[1]


def elementwise_warps(block: int) -> int:
    """8 elements per thread for 1024-element blocks, 16 for 4096 (4 and 8 warps)."""
    return 4 if block <= 1024 else 8
