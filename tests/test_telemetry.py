"""Step-size telemetry summed inside the update kernel (``telemetry=True``), against float64."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KERNEL_DEVICE

import mechgpu.optim as mo
from mechgpu.testing.optim_cases import VARIANTS

PRECISIONS = [(torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, {"master_weights": True}),
              (torch.float16, {"master_weights": True})]
SIZES = (1, 1000, 4097, 3, 0)


def _stored(opt, p) -> torch.Tensor:
    """The value a step carries forward, in float64: the master copy, else the param."""
    master = opt.state.get(p, {}).get("master_param")
    return (master if master is not None else p).detach().double().clone()


@pytest.mark.parametrize("dtype, precision", PRECISIONS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", VARIANTS, ids=lambda c: c.name)
def test_telemetry_matches_float64(case, dtype, precision):
    """Per group: ||p|| before, ||p_after - p_before|| and their ratio from the stored values, and the
    non-finite grads (two inf and a NaN in the last step), against float64."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).to(device=KERNEL_DEVICE, dtype=dtype).requires_grad_() for n in SIZES]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]
    opt = getattr(mo, case.optimizer)(groups, lr=1e-2, telemetry=True, **case.options, **precision)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p)
        if step == 2:
            params[2].grad[[5, 70]] = torch.tensor([math.inf, -math.inf], dtype=dtype)
            params[3].grad[1] = math.nan
        before = [_stored(opt, p) for p in params] if step else None
        opt.step()
        if not step:  # the first step makes the master copies
            continue
        for group, telemetry in zip(groups, opt.last_telemetry):
            index = [i for i, p in enumerate(params) if any(p is q for q in group["params"])]
            param_sq = sum(before[i].square().sum() for i in index)
            update_sq = sum((_stored(opt, params[i]) - before[i]).square().sum() for i in index)
            nonfinite = sum((~torch.isfinite(params[i].grad)).sum() for i in index)
            assert telemetry["nonfinite_grads"].item() == nonfinite.item()
            torch.testing.assert_close(telemetry["param_norm"].double(), param_sq.sqrt(), rtol=1e-5, atol=0)
            if nonfinite:
                assert telemetry["update_norm"].isnan() and update_sq.isnan()
                continue
            torch.testing.assert_close(telemetry["update_norm"].double(), update_sq.sqrt(), rtol=1e-5, atol=0)
            torch.testing.assert_close(telemetry["update_ratio"].double(), (update_sq / param_sq).sqrt(),
                                       rtol=2e-5, atol=0)
            assert 0.0 <= telemetry["lost_update_fraction"].item() <= 1.0
            if not opt.can_lose_updates:  # the figure's lost-update panel is left out only where this holds
                assert telemetry["lost_update_fraction"].item() == 0.0
        ours = opt.last_update_norm.double()
        everything = sum((_stored(opt, p) - b).square().sum() for p, b in zip(params, before)).sqrt()
        torch.testing.assert_close(ours, everything.to(ours.device), rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype, precision", PRECISIONS[:3], ids=lambda v: str(v).replace("torch.", ""))
def test_telemetry_of_unaligned_params_matches_float64(dtype, precision):
    """Params at storage offset 1 take the kernel's unaligned variant, whose per-thread rows are strided
    (multi_tensor.rows); sizes around a vector and past a block, against float64."""
    gen = torch.Generator().manual_seed(9)
    bases = [torch.randn(n + 1, generator=gen).to(device=KERNEL_DEVICE, dtype=dtype) for n in (7, 9, 2047, 4097)]
    params = [base[1:].detach().requires_grad_() for base in bases]
    assert all(p.data_ptr() % 16 for p in params)
    opt = mo.Adam(params, lr=1e-2, telemetry=True, **precision)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p)
        if step == 2:
            params[3].grad[4000] = math.nan
            params[0].grad[6] = -math.inf
        before = [_stored(opt, p) for p in params]
        opt.step()
        telemetry = opt.last_telemetry[0]
        assert telemetry["nonfinite_grads"].item() == (2 if step == 2 else 0)
        if step != 1:  # the first step makes the master copies; the last one's update is NaN
            continue
        torch.testing.assert_close(telemetry["param_norm"].double(),
                                   sum(b.square().sum() for b in before).sqrt(), rtol=1e-5, atol=0)
        update_sq = sum((_stored(opt, p) - b).square().sum() for p, b in zip(params, before))
        torch.testing.assert_close(telemetry["update_norm"].double(), update_sq.sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("master", [False, True])
def test_lost_updates_to_bf16_rounding(master):
    """A bf16 run with a tiny lr loses (nearly) every update to rounding; with masters, none."""
    gen = torch.Generator().manual_seed(1)
    params = [(1 + torch.rand(n, generator=gen)).to(KERNEL_DEVICE, torch.bfloat16).requires_grad_() for n in (700, 33)]
    opt = mo.Adam(params, lr=1e-6, telemetry=True, master_weights=master)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p)
        opt.step()
    lost = opt.last_telemetry[0]["lost_update_fraction"].item()
    assert (lost == 0.0) if master else (lost > 0.99), lost
    assert opt.can_lose_updates is not master


def test_nonfinite_grads_are_counted_when_the_step_is_skipped():
    params = [torch.randn(n, device=KERNEL_DEVICE, requires_grad=True) for n in (5000, 7)]
    opt = mo.AdamW(params, max_grad_norm=1.0, skip_nonfinite=True, telemetry=True)
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[[3, 4000, 4999]] = math.nan
    params[1].grad[0] = math.inf
    before = [p.detach().clone() for p in params]
    opt.step()
    telemetry = opt.last_telemetry[0]
    assert telemetry["nonfinite_grads"].item() == 4 and telemetry["update_norm"].item() == 0.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_without_telemetry_nothing_is_reported():
    p = torch.randn(10, device=KERNEL_DEVICE, requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = mo.Adam([p], track_update_norm=True)
    opt.step()
    assert opt.last_telemetry is None and opt.last_update_norm is not None


def test_lost_update_fraction_matches_its_definition():
    """bf16 SGD: of the elements whose fp32 update p - lr g differs from p, the fraction whose bf16
    rounding is p again, at three lrs (from most updates lost to few)."""
    gen = torch.Generator().manual_seed(9)
    for lr in (1e-3, 3e-3, 3e-2):
        p = (torch.rand(5000, generator=gen) * 4 - 2).to(KERNEL_DEVICE, torch.bfloat16).requires_grad_()
        p.grad = torch.randn(5000, generator=gen).to(p)
        before = p.detach().float().clone()
        opt = mo.SGD([p], lr=lr, telemetry=True)
        opt.step()
        intended = before - lr * p.grad.float()  # the kernel's fp32 update
        changed = intended != before
        lost = changed & (intended.to(torch.bfloat16).float() == before)
        expected = lost.sum().item() / max(changed.sum().item(), 1)
        assert abs(opt.last_telemetry[0]["lost_update_fraction"].item() - expected) <= 2 / changed.sum().item()
        # the stored param kept its value exactly where the update was lost (or was no update);
        # a GPU's fused multiply-add may round a handful of intended updates differently
        assert ((p.detach().float() == before) != (lost | ~changed)).sum().item() <= 2


def test_a_poisoned_done_counter_does_not_poison_later_steps():
    """The two-stage reductions count finished programs: a counter left non-zero between steps
    (an aborted launch, two streams sharing a plan) must not change the next step's grad norm or
    telemetry, since each launch zeroes it in-stream first. Compared with torch's norm and with
    float64 sums of the params the step changed."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).to(KERNEL_DEVICE).requires_grad_() for n in (5000, 7)]
    opt = mo.AdamW(params, lr=1e-2, max_grad_norm=0.5, telemetry=True)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        if step:  # poison every done counter the optimizer owns, as a partial launch would leave it
            counters = [b.plan.done for c in opt._group_caches.values() for b in c.buckets]
            counters += [plan.done for plan in opt._norm_plans.values()]
            counters += [opt._norm_over_caches.plan.done]  # the clip norm's, over the caches (every step here)
            assert counters and all(c.numel() == 1 for c in counters)
            for c in counters:
                c.fill_(1)
        before = [p.detach().double().clone() for p in params]
        opt.step()
        expected = torch.nn.utils.get_total_norm([g.double() for g in grads], 2.0)
        torch.testing.assert_close(opt.last_grad_norm.double().cpu(), expected.cpu(), rtol=1e-6, atol=0)
        update = math.sqrt(sum(float(((p.detach().double() - b) ** 2).sum()) for p, b in zip(params, before)))
        assert update > 0
        torch.testing.assert_close(float(opt.last_telemetry[0]["update_norm"]), update, rtol=1e-5, atol=0)
