"""`mechgpu check`: the built-in correctness suite passes, and fails when a kernel is wrong.

On CPU the kernels run in triton's interpreter (see conftest.py); the suite's --quick form
is what CI runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import KERNEL_DEVICE, long

from mechgpu.cli import _select_device
from mechgpu.testing import check, compare, oracles
from mechgpu.testing.environment import triton_version_problem
from mechgpu.testing.registry import Case


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    return parser.parse_args(list(argv))


def table_rows(stdout: str) -> list[str]:
    """The table's lines: they start with a registered case name."""
    return [line for line in stdout.splitlines() if line.split(" ", 1)[0] in check.CASES]


# ----------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------
@long
def test_quick_check_passes_end_to_end():
    out = subprocess.run([sys.executable, "-m", "mechgpu", "check", "--quick"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    head = out.stdout.split("\n\n", 1)[0]
    for label in ("device", "driver", "CUDA runtime", "torch", "triton", "python", "seed"):
        assert re.search(rf"^{label} +\S", head, re.M), f"no {label!r} line in the header:\n{head}"
    assert f"torch         {torch.__version__}" in head
    if not torch.cuda.is_available():
        assert "Triton's interpreter" in head
    assert re.search(r"^case +check +dtype +max abs err +max rel err +tolerance +err/tol +result$", out.stdout, re.M)
    rows = table_rows(out.stdout)
    assert {row.split(" ", 1)[0] for row in rows} == set(check.CASES)  # every case ran
    assert check.families() == ["optim", "clip", "act", "init"]
    assert all(row.endswith(" ok") for row in rows)
    summary = re.search(r"^(\d+) checks, (\d+) failed", out.stdout, re.M)
    assert summary and int(summary.group(1)) == len(rows) and summary.group(2) == "0", out.stdout[-2000:]


# ----------------------------------------------------------------------------------
# a planted error makes the affected checks fail, and only those
# ----------------------------------------------------------------------------------
def _by_check(rows: list[compare.Row]) -> dict[tuple[str, str, str], bool]:
    return {(r.case, r.check, r.dtype): r.passed for r in rows}


def test_wrong_activation_forward_fails(monkeypatch, capsys):
    from mechgpu.kernels import activation

    original = activation.forward

    def off_by_1e3(x, kind, **kwargs):
        y, mask = original(x, kind, **kwargs)
        return y + 1e-3, mask

    monkeypatch.setattr(activation, "forward", off_by_1e3)
    rows = check.run_checks(KERNEL_DEVICE, quick=True, only=["act.relu", "clip.norm_inf"], seed=0)
    results = _by_check(rows)
    for dtype in ("fp32", "bf16", "fp16"):
        assert results[("act.relu", "forward", dtype)] is False
        assert results[("act.relu", "backward", dtype)] is True  # the mask it saves is still right
    failing = [r for r in rows if not r.passed]
    assert failing and all(r.check == "forward" for r in failing)
    assert "outside tolerance" in failing[0].note
    assert all(r.passed for r in rows if r.case == "clip.norm_inf")

    assert check.run(parse("--quick", "--device", KERNEL_DEVICE, "--only", "act.relu", "--seed", "0"),
                     select_device=_select_device) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and re.search(r"^6 checks, 3 failed", out, re.M)


def _wrong_adam_launch(monkeypatch, argument: str, factor: float) -> None:
    """Adam's launches (not the other rules') with ``argument`` multiplied by ``factor``."""
    from mechgpu.kernels import optim as optim_kernels

    original = optim_kernels.launch

    def wrong(plan, dtype, rule, **kwargs):
        if rule == optim_kernels.ADAM:
            kwargs[argument] = kwargs[argument] * factor
        original(plan, dtype, rule, **kwargs)

    monkeypatch.setattr(optim_kernels, "launch", wrong)


def test_wrong_optimizer_step_fails(monkeypatch):
    """Adam's launcher with a 5% larger lr: every Adam trajectory is off; SGD is untouched."""
    _wrong_adam_launch(monkeypatch, "lr", 1.05)
    rows = check.run_checks(KERNEL_DEVICE, quick=True, only=["optim.Adam-amsgrad", "optim.SGD-momentum"], seed=0)
    results = _by_check(rows)
    assert results[("optim.Adam-amsgrad", "params, 3 steps", "fp32")] is False
    assert results[("optim.Adam-amsgrad", "params vs torch fp32 step", "bf16")] is False
    assert results[("optim.Adam-amsgrad", "params vs torch fp32 step", "fp16")] is False
    assert all(r.passed for r in rows if r.case == "optim.SGD-momentum")
    assert check.run(parse("--quick", "--device", KERNEL_DEVICE, "--only", "optim.Adam-amsgrad"),
                     select_device=_select_device) == 1


def test_wrong_8bit_step_fails(monkeypatch):
    """Adam's launcher with half the beta1: the 8-bit states' codes, absmax and the params are off the
    float64 reference of the scheme; SGD's 8-bit rows are untouched."""
    _wrong_adam_launch(monkeypatch, "beta1", 0.5)
    rows = check.run_checks(KERNEL_DEVICE, quick=True, only=["optim.state_dtype_8bit"], seed=0)
    results = _by_check(rows)
    for what in ("params", "8-bit codes", "absmax"):
        dtype = "8bit" if what == "8-bit codes" else "fp32"
        assert results[("optim.state_dtype_8bit", f"Adam {what}", dtype)] is False, what
    assert all(passed for (_, name, _), passed in results.items() if name.startswith("SGD-nesterov"))


def test_code_errors_rule():
    """8-bit codes: one code off at a few ties passes, two codes off or too many ties fail; distance is
    along the value axis (signed code 128 + c is -c: 0 and 128 are both zero, 1 and 129 two apart)."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(8)
    assert compare.code_errors([(codes, codes.clone(), True, "same")]).passed
    one_tie = codes.clone()
    one_tie[5] += 1
    errs = compare.code_errors([(one_tie, codes, True, "tie")])
    assert errs.passed and errs.max_abs == 1 and errs.max_rel == 1 / codes.numel()
    two_off = codes.clone()
    two_off[5] += 2
    assert "2 codes from the reference's, at index 5" in compare.code_errors([(two_off, codes, True, "x")]).failures[0]
    signed = torch.tensor([1], dtype=torch.uint8)
    assert compare.code_errors([(signed, torch.tensor([129], dtype=torch.uint8), False, "s")]).max_abs == 2
    assert compare.code_errors([(torch.tensor([0], dtype=torch.uint8), torch.tensor([128], dtype=torch.uint8),
                                 False, "zero")]).max_abs == 0
    many = codes.clone()
    many[:3] += 1  # 3 of 2048 > 0.1%
    assert "3 of 2048 codes off" in compare.code_errors([(many, codes, True, "many")]).failures[0]
    assert not compare.code_errors([(codes.float(), codes, True, "dtype")]).passed


def test_wrong_grad_norm_fails(monkeypatch):
    """A norm 1% too large: the returned norms fail, the clipped grads (scaled by the kernel's
    own coefficient) still pass."""
    from mechgpu.kernels import clip as clip_kernels

    original = clip_kernels.grad_norm

    def inflated(plan, workspace, out, **kwargs):
        original(plan, workspace, out, **kwargs)
        out[0] *= 1.01

    monkeypatch.setattr(clip_kernels, "grad_norm", inflated)
    rows = check.run_checks(KERNEL_DEVICE, quick=True, only=["clip.norm2"], seed=0)
    for r in rows:
        assert r.passed == ("grads" in r.check), (r.check, r.dtype, r.note)


def test_a_case_that_raises_is_a_failure_not_a_crash(monkeypatch):
    def half_done(ctx):
        yield ctx.row("first", torch.float32, compare.Errors(), "exact")
        raise ZeroDivisionError("planted")

    monkeypatch.setitem(check.CASES, "zz.raises", Case("zz.raises", half_done))
    rows = check.run_checks(KERNEL_DEVICE, only=["zz.raises"], seed=0)
    assert [(r.check, r.passed) for r in rows] == [("first", True), ("raised an exception", False)]
    assert rows[1].note.startswith("ZeroDivisionError: planted")


# ----------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------
def test_json_only_and_seed(tmp_path, capsys):
    path = tmp_path / "results" / "check.json"
    argv = ("--quick", "--device", KERNEL_DEVICE, "--only", "act.tanh", "--only", "init.normal_", "--seed", "7",
            "--json", str(path))
    assert check.run(parse(*argv), select_device=_select_device) == 0
    out = capsys.readouterr().out
    assert "seed          7 (repeat this run with --seed 7)" in out
    doc = json.loads(path.read_text())
    assert doc["seed"] == 7 and doc["quick"] is True and doc["failed"] == 0
    for key in ("device", "device_name", "driver", "cuda_runtime", "torch", "triton", "python"):
        assert doc["environment"][key], key
    assert {r["case"] for r in doc["rows"]} == {"act.tanh", "init.normal_"}
    assert doc["checks"] == len(doc["rows"]) == 6 + 3
    assert set(doc["rows"][0]) == {"case", "check", "dtype", "max_abs", "max_rel", "tolerance", "err_over_tol",
                                   "passed", "note"}
    # the same seed gives the same inputs, so the same errors
    again = check.run_checks(KERNEL_DEVICE, quick=True, only=["act.tanh"], seed=7)
    assert [r.max_abs for r in again] == [r["max_abs"] for r in doc["rows"] if r["case"] == "act.tanh"]


def test_only_without_a_match_is_an_error(capsys):
    assert check.run(parse("--device", KERNEL_DEVICE, "--only", "no-such-kernel"), select_device=_select_device) == 2
    assert "no check name contains 'no-such-kernel'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no check name contains"):
        check.run_checks(KERNEL_DEVICE, only=["no-such-kernel"])


def test_list_prints_every_case(capsys):
    assert check.run(parse("--list"), select_device=_select_device) == 0
    assert capsys.readouterr().out.split() == list(check.CASES)


# ----------------------------------------------------------------------------------
# what cannot run: old or missing triton, CUDA asked for but absent
# ----------------------------------------------------------------------------------
def test_triton_version_gate():
    assert triton_version_problem("3.2.0") is None
    assert triton_version_problem("3.9.0+git1234abcd") is None
    too_old = triton_version_problem("3.1.0")
    assert "triton 3.1.0 is too old" in too_old and "triton>=3.2" in too_old
    assert "too old" in triton_version_problem("2.3.1")
    assert "triton is not installed" in triton_version_problem(None)


@pytest.mark.parametrize("version,message", [("3.1.0", "too old"), (None, "not installed")])
def test_run_refuses_old_or_missing_triton(monkeypatch, capsys, version, message):
    monkeypatch.setattr(check, "installed_triton_version", lambda: version)
    assert check.run(parse("--quick", "--only", "act.relu"), select_device=lambda requested: KERNEL_DEVICE) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "act.relu" not in captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_asked_for_without_cuda(capsys):
    assert check.run(parse("--device", "cuda"), select_device=_select_device) == 2
    assert "--device cuda was asked for, but torch sees no CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# the comparison rules themselves
# ----------------------------------------------------------------------------------
def test_measure_pass_rule():
    one = torch.tensor([1.0, -2.0, math.nan, math.inf])
    assert compare.measure(one, one.double(), rtol=0.0, atol=0.0).passed
    assert not compare.measure(one, torch.tensor([1.0, -2.0, 0.0, math.inf]).double(), rtol=1.0, atol=1.0).passed
    assert not compare.measure(one, torch.tensor([1.0, -2.0, math.nan, -math.inf]).double(), rtol=1, atol=1).passed
    # one bf16 ulp passes at rtol = eps, two do not
    x = torch.tensor([1.0], dtype=torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    ok = compare.measure(x + eps, x.double(), rtol=eps, atol=0.0, dtype=torch.bfloat16)
    assert ok.passed and ok.err_over_tol == pytest.approx(1.0) and ok.max_rel == pytest.approx(eps)
    assert not compare.measure(x + 2 * eps, x.double(), rtol=eps, atol=0.0).passed
    assert not compare.measure(x, x.double(), rtol=eps, atol=0.0, dtype=torch.float16).passed  # wrong dtype
    # below |ref| = atol/rtol the relative error is taken against that floor
    small = compare.measure(torch.tensor([2e-6]), torch.tensor([1e-6]).double(), rtol=1e-3, atol=1e-6)
    assert small.passed and small.max_rel == pytest.approx(1e-3)


def test_sample_errors_catch_wrong_spread_and_unwritten_elements():
    gen = torch.Generator().manual_seed(0)
    normal = oracles.Target(0.0, 1.0, oracles.NORMAL_KURTOSIS)
    assert compare.sample_errors(torch.randn(20000, generator=gen), normal).passed
    assert not compare.sample_errors(1.05 * torch.randn(20000, generator=gen), normal).passed
    poisoned = torch.randn(20000, generator=gen)
    poisoned[123] = math.nan
    assert "1 of 20000 elements not written" in compare.sample_errors(poisoned, normal).failures[0]
    uniform = oracles.uniform_target(-1.0, 1.0)
    assert not compare.sample_errors(torch.rand(20000, generator=gen) * 2 - 1 + 1e-3, uniform).passed  # out of bounds
    # the targets against large samples of torch's own: the truncated normal, and a bf16 uniform
    # whose upper bound rounds down (bf16(1.3) = 1.296875): torch sends draws that round to it
    # to the lower bound, so the mean is 12 standard errors below (a + b) / 2 at this size
    torch.manual_seed(0)
    sample = torch.nn.init.trunc_normal_(torch.empty(200_000), 0.3, 1.0, -1.2, 1.5)
    assert compare.sample_errors(sample, oracles.truncated_normal_target(0.3, 1.0, -1.2, 1.5)).passed
    sample = torch.nn.init.uniform_(torch.empty(1 << 20, dtype=torch.bfloat16), -0.7, 1.3)
    assert compare.sample_errors(sample, oracles.uniform_target(-0.7, 1.3, torch.bfloat16)).passed
    assert not compare.sample_errors(sample, oracles.uniform_target(-0.7, 1.3)).passed
