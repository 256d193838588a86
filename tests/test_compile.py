"""Every kernel compiles ahead of time for sm_80 and sm_90a (no GPU needed), without
register spills, with at least 2 resident CTAs (or 32 warps) per SM, and the aligned
variants use 128-bit global loads and stores.

The compilation runs `bench/kernel_report.py --json` in a subprocess without
TRITON_INTERPRET, since the test process itself runs kernels in the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import HAS_CUDA, long, run_without_interpreter
from mechgpu.kernels import aot

from mechgpu.testing.optim_cases import FEATURED, one_per_rule

# Ahead-of-time compilation needs no GPU: CI does it on CPU, so a GPU host does not spend
# its (lent, limited) time on it.
# One xdist worker runs the whole module, so the compile fixture below runs once per session.
pytestmark = [pytest.mark.skipif(HAS_CUDA, reason="compiles for sm_80/sm_90a without a GPU; CI runs it on CPU"),
              pytest.mark.xdist_group("aot-compile"), long]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = aot.all_variants()
REPORT_KEYS = {"kernel", "arch", "registers", "spills", "ldg128", "stg128", "num_warps", "shared", "loop_barriers",
               "ctas_per_sm", "warps_per_sm"}
#: Kernels held at no CTA barrier inside a loop and no shared memory (issue 25): the optimizer's, the
#: activations' and the grid-stride norm and scaling
BARRIER_FREE_KERNELS = {"optimizer_kernel", "step_prologue_kernel", "activation_fwd_kernel", "activation_bwd_kernel",
                        "grad_norm_kernel", "grad_scale_kernel"}


def shared_exemption(variant: aot.KernelVariant) -> tuple[int, str] | None:
    """(the shared bytes allowed, why) for a held variant that needs some, else None (0 B).

    Each exemption is named here and bounded: a staging buffer (8,192 B for a mixed bf16/fp32
    layout conversion) fails all of them."""
    name, constexprs = variant.fn.__name__, variant.constexprs
    allowed, why = 0, []
    if (name == "optimizer_kernel" and constexprs["TELEMETRY"]) or name == "grad_norm_kernel":
        # the two-stage reduction: once per program, after the block loop, each field's sum across the
        # CTA's warps (one fp64 a warp) and the broadcast of the done-counter atomic's result
        allowed, why = allowed + 8 * variant.num_warps, [*why, "one cross-warp reduction after the block loop"]
    if allowed:
        return allowed, "; ".join(why)
    if name == "activation_fwd_kernel" and constexprs["SAVE_MASK"]:
        # relu/leaky_relu pack their mask bits into int32 words; a thread holds its elements in runs
        # of 4 (one 128-bit fp32 access), so a word's bits span threads and reach the words' store
        # layout through shared memory, once per program (no loop). Packing bytes instead still
        # exchanged (tried: the same 512 B)
        return 4 * constexprs["BLOCK"] // 32, "the packed mask words' exchange, once per program"
    return None


@pytest.fixture(scope="module")
def report() -> dict[tuple[str, str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_report.py"), "--json", "-"],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads(out.stdout)["rows"]
    for row in rows:
        assert set(row) == REPORT_KEYS
    return {(r["kernel"], r["arch"]): r for r in rows}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_kernel_compiles_without_spills(report, variant, arch):
    result = report[(variant.name, arch)]
    assert result["spills"] == 0, result
    assert 0 < result["registers"] <= 255, result
    assert aot.meets_occupancy_floor(result["ctas_per_sm"], result["warps_per_sm"]), \
        f"under {aot.CTAS_FLOOR} CTAs and {aot.WARPS_FLOOR} warps per SM: {result}"
    if variant.expect_ldg128:
        assert result["ldg128"] > 0, f"no 128-bit global load: {result}"
    if variant.expect_stg128:
        assert result["stg128"] > 0, f"no 128-bit global store: {result}"
    if variant.fn.__name__ in BARRIER_FREE_KERNELS:
        # no barrier paid per block: reductions accumulate per thread and reduce once after the loop
        assert result["loop_barriers"] == 0, f"CTA barriers inside a loop: {result}"
        # no layout conversion through shared memory, mixed bf16/fp32 streams included
        allowed, why = shared_exemption(variant) or (0, "")
        assert result["shared"] <= allowed, f"shared memory beyond {allowed} B ({why or 'none needed'}): {result}"


SASS_WITH_LOOPS = """
        /*0000*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0010*/                   LDG.E.128 R4, [R2.64] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   BAR.RED.POPC RZ, 0x0, P0 ;
        /*0040*/                   BSYNC B0 ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   BAR.SYNC 0x0 ;
        /*0070*/               @P1 BRA 0x90 ;
        /*0080*/                   WARPSYNC 0xffffffff ;
        /*0090*/                   BAR.ARV 0x1, 0x40 ;
        /*00a0*/                   BRA 0x80 ;
        /*00b0*/                   EXIT ;
"""


def test_loop_barriers_are_those_between_a_backward_branch_and_its_target():
    """Barriers at 0x20, 0x30 (the loop 0x10-0x50) and 0x90 (0x80-0xa0); not 0x0 or 0x60, outside any
    loop, nor the forward branch's span or warp-level BSYNC/WARPSYNC."""
    assert aot.loop_barriers(SASS_WITH_LOOPS) == 3
    assert aot.loop_barriers(SASS_WITH_LOOPS.replace("BRA 0x10", "BRA 0x60")) == 1


def test_aligned_short_tensors_keep_128_bit_loads(report):
    """A block shorter than BLOCK (a short tensor, or a tensor's last block) masks whole vectors at a time
    (multi_tensor.whole_vectors): fp32 Adam's 4 read streams take 2 LDG.E.128 a thread in the full-block
    path and again in the short one (8 before, when only full blocks had them); the norm's three dtype
    branches (2 + 1 + 1 a thread), 4 and 4."""
    for arch in ("sm_80", "sm_90a"):
        assert report[("adam[fp32]", arch)]["ldg128"] >= 2 * 4 * 2, report[("adam[fp32]", arch)]
        assert report[("grad_norm[l2]", arch)]["ldg128"] >= 2 * 4, report[("grad_norm[l2]", arch)]


def test_report_covers_every_kernel():
    import importlib
    import pkgutil

    import mechgpu.kernels as package

    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"mechgpu.kernels.{info.name}")
        kernels |= {obj for name, obj in vars(module).items() if name.endswith("_kernel")}
    assert len(kernels) >= 6 and kernels <= {v.fn for v in VARIANTS}


def test_committed_report_covers_every_variant():
    """bench/results/kernel-report.json is regenerated whenever a kernel variant is added."""
    committed = json.loads(open(os.path.join(ROOT, "bench", "results", "kernel-report.json")).read())
    assert {(r["kernel"], r["arch"]) for r in committed["rows"]} == {
        (v.name, arch) for v in VARIANTS for arch in ("sm_80", "sm_90a")}
    assert committed["summary"]["spills"] == 0


# A step in a process where triton compiles for sm_90 and launches nothing (tests/_compile_only.py):
# the GPU test of "a new lr never recompiles" counts compiled variants with _launch.compiled_variants;
# this runs the same count against triton's real cache on CPU.
COMPILE_ONLY_STEPS = """
import json, sys
sys.path.insert(0, {tests!r})
import _compile_only  # noqa: F401  (first: the stand-in driver and the compile-only launch)
import torch
from triton.compiler import CompiledKernel
import mechgpu.optim as mo
from mechgpu.kernels import optim as kernels
from mechgpu.kernels._launch import compiled_variants

name, options = {name!r}, {options!r}
kernel, prologue = kernels.optimizer_kernel, kernels.step_prologue_kernel
params = [torch.randn(n, requires_grad=True) for n in (1000, 4097)]
for p in params:
    p.grad = torch.randn_like(p)
opt = getattr(mo, name)(params, lr=1e-3, max_grad_norm=1.0, **options)
counts = {{}}
opt.step()
counts["first step"] = compiled_variants(kernel)
counts["prologue"] = compiled_variants(prologue)
for lr in (2e-3, 5e-4, 1.0, 0.0):
    opt.param_groups[0]["lr"] = lr
    opt.step()
counts["float lrs"] = compiled_variants(kernel)
opt.param_groups[0]["lr"] = torch.tensor(1e-3)
opt.step()
counts["tensor lr"] = compiled_variants(kernel)
opt.param_groups[0]["lr"].fill_(3e-3)
opt.step()
opt.param_groups[0]["lr"] = torch.tensor(5e-4)
opt.step()
counts["tensor lrs"] = compiled_variants(kernel)
counts["prologue, tensor lrs"] = compiled_variants(prologue)
cached = [k for fn in (kernel, prologue) for entry in fn.device_caches.values() for k in entry[0].values()]
counts["all CompiledKernel"] = all(isinstance(k, CompiledKernel) for k in cached)
counts["cubins"] = sum(bool(k.asm.get("cubin")) for k in cached)
print(json.dumps(counts))
"""


@pytest.mark.parametrize("case", one_per_rule(FEATURED), ids=lambda c: c.optimizer)
def test_new_lr_never_recompiles_counted_in_triton_cache(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = COMPILE_ONLY_STEPS.format(tests=os.path.join(ROOT, "tests"), name=case.optimizer, options=case.options)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    # A float lr is one variant and any float keeps it; a tensor lr is read through a pointer (one more
    # variant, IS_PTR), and a new tensor or new value keeps that one; the same for the prologue.
    assert counts == {"first step": 1, "prologue": 1, "float lrs": 1, "tensor lr": 2, "tensor lrs": 2,
                      "prologue, tensor lrs": 2, "all CompiledKernel": True, "cubins": 4}, counts


SASS_ORDER = """
import json
from mechgpu.kernels import aot
by_name = {v.name: v for v in aot.all_variants()}
out = {}
for arch in aot.ARCHS:
    for name in ("adam[fp32]", "step_prologue[adam]"):
        opcodes = aot.sass_opcodes(by_name[name], arch)
        out[f"{name} {arch}"] = {
            "first_ldg128": next((i for i, op in enumerate(opcodes) if op == "LDG.E.128"), None),
            "fp64": [i for i, op in enumerate(opcodes) if aot.is_fp64(op)]}
print(json.dumps(out))
"""


def test_adam_issues_its_data_loads_before_any_fp64():
    """Loads first: in plain fp32 Adam's SASS the first 128-bit data load comes before the first
    fp64 instruction. Adam's fp64 bias corrections run once per tensor in the step prologue, whose
    SASS shows them (so the detector sees fp64 where there is some); the update kernel has none."""
    out = run_without_interpreter(SASS_ORDER)
    assert out.returncode == 0, out.stderr[-4000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for arch in aot.ARCHS:
        adam, prologue = found[f"adam[fp32] {arch}"], found[f"step_prologue[adam] {arch}"]
        assert adam["first_ldg128"] is not None, adam
        assert not adam["fp64"] or adam["fp64"][0] > adam["first_ldg128"], adam
        assert adam["fp64"] == [], adam
        assert prologue["fp64"] and prologue["first_ldg128"] is None, prologue


@pytest.mark.parametrize("registers, warps, shared, arch, ctas", [
    (63, 16, 0, 90, 2),      # 64 registers x 512 threads = 32K: two CTAs fill the 64K file
    (73, 16, 0, 90, 1),      # rounded to 80 per thread: 40K, one CTA
    (128, 8, 0, 80, 2),      # 32K per CTA
    (32, 4, 0, 90, 16),      # the 64-warp limit
    (32, 1, 0, 80, 32),      # the 32-CTA limit
    (40, 4, 100_000, 80, 1),  # shared memory: 164 KiB / (100,000 + 1 KiB)
])
def test_occupancy_rules(registers, warps, shared, arch, ctas):
    assert aot.ctas_per_sm(registers, warps, shared, arch) == ctas
