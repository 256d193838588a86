"""kernels/_interpreter.py: triton's interpreter patches triton.language once per launch, not again
at every device-function call, and the kernels' results are unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA

import mechgpu.nn.functional as mF

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs the kernels only on a CPU host")


@pytest.mark.parametrize("numel", [1000, 9000])  # 1 block, and 9 blocks of device-function calls
def test_language_patched_once_per_launch(numel, monkeypatch):
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "skips_repeats", False), "mechgpu.kernels did not install the skip"
    modules_patched = []
    original = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda pkg, *a: modules_patched.append(pkg) or original(pkg, *a))
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    y = mF.gelu(x)
    torch.testing.assert_close(y, torch.nn.functional.gelu(x.double()).float(), rtol=2e-6, atol=1e-7)
    # one launch: triton.language, its tensor, its math and the descriptor base, patched once each
    assert len(modules_patched) == 4, [getattr(m, "__name__", m) for m in modules_patched]


def test_an_unknown_activation_kind_fails_instead_of_running_another(monkeypatch):
    """Every constexpr chain over kinds ends in its last case by name, then a static_assert: a
    kind added on the host without its kernel branch is an error, not SiLU."""
    from mechgpu.kernels import activation

    monkeypatch.setitem(activation.KINDS, "made_up", max(activation.KINDS.values()) + 1)
    with pytest.raises(Exception, match="unknown KIND"):
        activation.forward(torch.randn(100), "made_up")


def test_an_unknown_optimizer_rule_fails_before_writing(monkeypatch):
    """The same for the update rule: a rule declared without its branch is an error, not Adagrad."""
    import dataclasses

    from mechgpu.kernels.optim_spec import SPECS

    import mechgpu.optim as mo

    p = torch.randn(50, requires_grad=True)
    p.grad = torch.randn(50)
    before = p.detach().clone()
    opt = mo.Adam([p], lr=0.1)
    unknown = max(spec.rule for spec in SPECS.values()) + 1
    monkeypatch.setattr(mo.Adam, "_spec", dataclasses.replace(mo.Adam._spec, rule=unknown))
    with pytest.raises(Exception, match="unknown RULE"):
        opt.step()
    assert torch.equal(p.detach(), before)
