"""Ahead-of-time compilation of every kernel for sm_80 and sm_90a, with no GPU needed.

``compile_report()`` compiles each registered kernel variant with ``triton.compile``
and a ``GPUTarget``, then reads the result with the ``ptxas`` and ``cuobjdump`` that
ship in the triton wheel: registers, spill bytes, and the number of 128-bit global
loads and stores (``LDG.E.128`` / ``STG.E.128``) in the SASS. ``bench/kernel_report.py``
prints it; ``tests/test_compile.py`` checks it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

import triton
import triton.language as tl

ARCHS = (80, 90)


@dataclass
class KernelVariant:
    """One compiled specialisation: a kernel plus its argument types and constexprs."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    aligned_args: tuple[str, ...] = ()  # pointer arguments the launcher guarantees 16-byte aligned
    expect_vector_io: bool = True  # should the SASS contain LDG.E.128 and STG.E.128?
    num_warps: int = 4


@dataclass
class CompileResult:
    kernel: str
    arch: str
    registers: int
    spills: int
    ldg128: int
    stg128: int
    expect_vector_io: bool = field(default=True)

    def as_json(self) -> dict:
        return asdict(self)


def _optim_variants() -> list[KernelVariant]:
    from . import optim
    from ._launch import MULTI_TENSOR_BLOCKS, multi_tensor_warps

    block = MULTI_TENSOR_BLOCKS[0]
    warps = multi_tensor_warps(block)
    tables = {"table_ptr": "*i64", "blocks_ptr": "*i32", "done_ptr": "*i32"}
    variants = []
    for dtype_name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        for aligned in (True, False):
            tag = f"{dtype_name}{'' if aligned else ',unaligned'}"
            common = {"PARAM_DTYPE": dtype, "MAXIMIZE": False, "ALIGNED": aligned, "BLOCK": block}
            for amsgrad, decoupled in ((False, False), (True, True)):
                sig = dict(tables, lr="fp32", beta1="fp32", beta2="fp32", one_minus_beta1="fp32",
                           one_minus_beta2="fp32", eps="fp32", weight_decay="fp32")
                cx = dict(common, LR_IS_PTR=False, BETAS_ARE_PTRS=False, AMSGRAD=amsgrad,
                          DECOUPLED_WD=decoupled)
                name = f"adam[{tag}{',amsgrad,adamw' if amsgrad else ''}]"
                variants.append(_variant(name, optim.adam_kernel, sig, cx, aligned, warps))
            for centered, momentum in ((False, False), (True, True)):
                sig = dict(tables, lr="fp32", alpha="fp32", one_minus_alpha="fp32", eps="fp32",
                           weight_decay="fp32", momentum="fp32")
                cx = dict(common, LR_IS_PTR=False, CENTERED=centered, HAS_MOMENTUM=momentum)
                name = f"rmsprop[{tag}{',centered,momentum' if centered else ''}]"
                variants.append(_variant(name, optim.rmsprop_kernel, sig, cx, aligned, warps))
            for momentum, nesterov in ((False, False), (True, True)):
                sig = {"table_ptr": "*i64", "blocks_ptr": "*i32", "lr": "fp32", "weight_decay": "fp32",
                       "momentum": "fp32", "one_minus_dampening": "fp32"}
                cx = dict(common, LR_IS_PTR=False, WD_IS_PTR=False, HAS_MOMENTUM=momentum,
                          NESTEROV=nesterov)
                name = f"sgd[{tag}{',momentum,nesterov' if momentum else ''}]"
                variants.append(_variant(name, optim.sgd_kernel, sig, cx, aligned, warps))
    # tensor hyperparameters (lr and betas read from device memory)
    sig = dict(tables, lr="*fp32", beta1="*fp32", beta2="*fp32", one_minus_beta1="fp32",
               one_minus_beta2="fp32", eps="fp32", weight_decay="fp32")
    cx = {"PARAM_DTYPE": tl.float32, "MAXIMIZE": True, "ALIGNED": True, "BLOCK": block,
          "LR_IS_PTR": True, "BETAS_ARE_PTRS": True, "AMSGRAD": False, "DECOUPLED_WD": False}
    variants.append(_variant("adam[fp32,tensor-lr-betas]", optim.adam_kernel, sig, cx, True, warps))
    return variants


def _variant(name, fn, signature, constexprs, aligned, warps) -> KernelVariant:
    full_sig = dict(signature)
    full_sig.update({k: "constexpr" for k in constexprs})
    return KernelVariant(name, fn, full_sig, constexprs,
                         aligned_args=tuple(k for k, v in signature.items() if v.startswith("*")),
                         expect_vector_io=aligned, num_warps=warps)


def all_variants() -> list[KernelVariant]:
    """Every kernel variant the compile test and the kernel report cover."""
    return _optim_variants()


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
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": variant.num_warps})


def inspect_variant(variant: KernelVariant, arch: int) -> CompileResult:
    compiled = compile_variant(variant, arch)
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        cubin = os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([_nvidia_tool("ptxas", arch), "-v", f"--gpu-name={gpu_name}", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True)
        info = out.stdout + out.stderr
        sass = subprocess.run([_nvidia_tool("cuobjdump", arch), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    spill_loads = int(re.search(r"(\d+) bytes spill loads", info).group(1))
    return CompileResult(
        kernel=variant.name, arch=gpu_name, registers=registers, spills=spill_stores + spill_loads,
        ldg128=len(re.findall(r"LDG\.E\.128", sass)), stg128=len(re.findall(r"STG\.E\.128", sass)),
        expect_vector_io=variant.expect_vector_io,
    )


def compile_report(archs=ARCHS) -> list[CompileResult]:
    return [inspect_variant(v, arch) for v in all_variants() for arch in archs]
