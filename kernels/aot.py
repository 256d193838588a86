"""Ahead-of-time compilation of every kernel for sm_80 and sm_90a, with no GPU needed.

``inspect_variant()`` compiles a kernel variant with ``triton.compile``
and a ``GPUTarget``, then reads the result with the ``ptxas`` and ``cuobjdump`` that
ship in the triton wheel: registers, spill bytes, and the number of 128-bit global
loads and stores (``LDG.E.128`` / ``STG.E.128``) and the CTA barriers inside loops in the
SASS. ``bench/kernel_report.py``
prints it; ``tests/test_compile.py`` checks it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

ARCHS = (80, 90)


@dataclass
class KernelVariant:
    """One compiled specialisation: a kernel plus its argument types and constexprs."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    aligned_args: tuple[str, ...] = ()  # pointer arguments the launcher guarantees 16-byte aligned
    expect_ldg128: bool = True  # must the SASS contain LDG.E.128?
    expect_stg128: bool = True  # must the SASS contain STG.E.128?
    num_warps: int = 4
    maxnreg: int | None = None  # the launcher's register budget (ptx .maxnreg), if it sets one


@dataclass
class CompileResult:
    kernel: str
    arch: str
    registers: int
    spills: int
    ldg128: int
    stg128: int
    num_warps: int
    shared: int  # bytes of shared memory per CTA
    loop_barriers: int  # CTA barriers (BAR.*) inside a loop body of the SASS (``loop_barriers``)
    ctas_per_sm: int
    warps_per_sm: int


# What limits resident CTAs on an SM, for sm_80 and sm_90 (CUDA occupancy rules): a 64K-register
# file allocated per warp in units of 256 registers, at most 64 warps and 32 CTAs, and shared
# memory (164 KiB on sm_80, 228 KiB on sm_90) with 1 KiB reserved per CTA.
SM_LIMITS = {80: {"shared": 164 * 1024}, 90: {"shared": 228 * 1024}}
REGISTERS_PER_SM, REGISTER_UNIT, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM, SHARED_RESERVED = 65536, 256, 64, 32, 1024
#: the occupancy every launched variant must reach: this many CTAs per SM, or WARPS_FLOOR warps
CTAS_FLOOR, WARPS_FLOOR = 2, 32


def ctas_per_sm(registers: int, num_warps: int, shared: int, arch: int) -> int:
    """Resident CTAs per SM of a kernel with ``registers`` per thread, ``num_warps`` per CTA and
    ``shared`` bytes of shared memory, by the register, warp, CTA and shared-memory limits."""
    registers_per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // registers_per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_shared = SM_LIMITS[arch]["shared"] // (shared + SHARED_RESERVED) if shared else MAX_CTAS_PER_SM
    return min(by_registers, by_warps, by_shared, MAX_CTAS_PER_SM)


def meets_occupancy_floor(ctas: int, warps: int) -> bool:
    """At least CTAS_FLOOR resident CTAs per SM, or WARPS_FLOOR resident warps."""
    return ctas >= CTAS_FLOOR or warps >= WARPS_FLOOR


def variant(name: str, fn, signature: dict[str, str], constexprs: dict, aligned: bool,
            num_warps: int, vector_loads: bool | None = None,
            vector_stores: bool | None = None) -> KernelVariant:
    """A variant whose pointer arguments are 16-byte aligned, as torch allocations are.

    ``aligned`` says the kernel was told its tensors are aligned, so the SASS must
    contain 128-bit loads and stores; ``vector_loads``/``vector_stores`` override that
    for kernels that only read (a reduction) or only write (an initialiser).
    """
    full_sig = dict(signature)
    full_sig.update({k: "constexpr" for k in constexprs})
    return KernelVariant(name, fn, full_sig, constexprs,
                         aligned_args=tuple(k for k, v in signature.items() if v.startswith("*")),
                         expect_ldg128=aligned if vector_loads is None else vector_loads,
                         expect_stg128=aligned if vector_stores is None else vector_stores,
                         num_warps=num_warps)


_POINTEE = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16", "int64": "i64",
            "int32": "i32", "int8": "i8", "uint8": "u8"}


def _runtime_type(value) -> str:
    """The AOT signature type of a runtime kernel argument as a launcher passes it."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    return "i32" if isinstance(value, int) else "fp32"


def launched_variant(name: str, fn, arguments: dict, aligned: bool, **expect) -> KernelVariant:
    """The variant a launcher's keyword ``arguments`` (``num_warps`` included) compile to: the
    signature typed from the runtime values, the constexprs as given. ``expect`` as ``variant``'s."""
    arguments = dict(arguments)
    num_warps = arguments.pop("num_warps")
    maxnreg = arguments.pop("maxnreg", None)
    parameters = inspect.signature(fn.fn).parameters  # the Python function, jit-compiled or interpreted
    constexprs = {name: arguments[name] for name, p in parameters.items() if "constexpr" in str(p.annotation)}
    signature = {name: _runtime_type(arguments[name]) for name in parameters if name not in constexprs}
    return dataclasses.replace(variant(name, fn, signature, constexprs, aligned, num_warps, **expect), maxnreg=maxnreg)


def all_variants() -> list[KernelVariant]:
    """Every kernel variant the compile test and the kernel report cover.

    Each kernel module of this package lists its own variants in ``aot_variants()``.
    """
    variants = []
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]),
                       key=lambda m: m.name):
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, "aot_variants"):
            variants += module.aot_variants()
    return variants


# ----------------------------------------------------------------------------------
# compile and inspect
# ----------------------------------------------------------------------------------
def _nvidia_tool(name: str, arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        try:
            tool = nv.get_ptxas(arch)
        except TypeError:  # older triton: get_ptxas() takes no arch
            tool = nv.get_ptxas()
        return tool.path
    bin_dir = os.path.join(os.path.dirname(nv.__file__), "bin")
    return os.path.join(bin_dir, name)


def compile_variant(variant: KernelVariant, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = variant.fn.arg_names
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in variant.aligned_args}
    src = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs)
    options = {"num_warps": variant.num_warps}
    if variant.maxnreg is not None:
        options["maxnreg"] = variant.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _assemble(variant: KernelVariant, arch: int):
    """(compiled kernel, ptxas -v output, SASS text) of a variant."""
    compiled = compile_variant(variant, arch)
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        cubin = os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([_nvidia_tool("ptxas", arch), "-v", f"--gpu-name={gpu_name}", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([_nvidia_tool("cuobjdump", arch), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    return compiled, out.stdout + out.stderr, sass


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_FP64_OPCODES = ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DMMA")


def sass_opcodes(variant: KernelVariant, arch: int) -> list[str]:
    """The opcodes of a variant's SASS, in program order (``LDG.E.128``, ``DADD``, ...)."""
    return _SASS_LINE.findall(_assemble(variant, arch)[2])


_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def loop_barriers(sass: str) -> int:
    """The CTA barrier instructions (``BAR.SYNC``, ``BAR.SYNC.DEFER_BLOCKING``, ``BAR.RED``, ``BAR.ARV``,
    ...) inside a loop of the SASS, a loop body being the instructions from a backward branch's
    target to the branch: in a grid-stride kernel, what each block iteration pays (the block loop
    and any loop inside it or after it, such as a finishing loop over per-program partials).
    Warp-level convergence barriers (``BSSY``/``BSYNC``/``WARPSYNC``) and fences are not CTA barriers."""
    instructions = [(int(address, 16), opcode, operands)
                    for address, opcode, operands in _SASS_INSTRUCTION.findall(sass)]
    loops = []
    for address, opcode, operands in instructions:
        target = _BRANCH_TARGET.search(operands) if opcode.split(".")[0] == "BRA" else None
        if target and int(target.group(1), 16) <= address:
            loops.append((int(target.group(1), 16), address))
    return sum(1 for address, opcode, _ in instructions
               if opcode.split(".")[0] == "BAR" and any(first <= address <= last for first, last in loops))


def is_fp64(opcode: str) -> bool:
    """Whether a SASS opcode computes or converts in fp64 (a 64-bit load is not)."""
    return opcode.startswith(_FP64_OPCODES) or ".F64" in opcode


def inspect_variant(variant: KernelVariant, arch: int) -> CompileResult:
    compiled, info, sass = _assemble(variant, arch)
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    spill_loads = int(re.search(r"(\d+) bytes spill loads", info).group(1))
    shared = int(compiled.metadata.shared)
    ctas = ctas_per_sm(registers, variant.num_warps, shared, arch)
    return CompileResult(
        kernel=variant.name, arch=gpu_name, registers=registers, spills=spill_stores + spill_loads,
        ldg128=len(re.findall(r"LDG\.E\.128", sass)), stg128=len(re.findall(r"STG\.E\.128", sass)),
        num_warps=variant.num_warps, shared=shared, loop_barriers=loop_barriers(sass),
        ctas_per_sm=ctas, warps_per_sm=ctas * variant.num_warps,
    )
