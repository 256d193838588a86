"""Every kernel compiles ahead of time for sm_80 and sm_90a (no GPU needed), without
register spills, and the aligned variants use 128-bit global loads and stores.

The compilation runs `bench/kernel_report.py --json` in a subprocess without
TRITON_INTERPRET, since the test process itself runs kernels in the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import HAS_CUDA
from mechgpu.kernels import aot

# Ahead-of-time compilation needs no GPU: CI does it on CPU, so a GPU host does not spend
# its (lent, limited) time on it.
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="compiles for sm_80/sm_90a without a GPU; CI runs it on CPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = aot.all_variants()
REPORT_KEYS = {"kernel", "arch", "registers", "spills", "ldg128", "stg128"}


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
    if variant.expect_ldg128:
        assert result["ldg128"] > 0, f"no 128-bit global load: {result}"
    if variant.expect_stg128:
        assert result["stg128"] > 0, f"no 128-bit global store: {result}"


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
