"""mechgpu's clipping against torch.nn.utils: awkward inputs (inf, NaN, None and empty grads),
torch's errors, unaligned grads, clip-in-step. The norm of every norm type in every dtype, and
1e30-sized grads, are cases of the database (mechgpu.testing) that tests/test_cases.py runs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, KERNEL_DEVICE, count_atomics
from test_optim_safety import isolated

import mechgpu
import mechgpu.optim as mo
from mechgpu.testing.compare import norm_tolerance
from mechgpu.testing.optim_cases import FEATURED


def make_params(sizes, device, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n in sizes:
        p = torch.randn(n, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (scale * torch.randn(n, generator=gen)).to(device=device, dtype=dtype)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 0.0], ids=str)
def test_special_values_none_and_empty_grads(norm_type, device):
    ours = make_params((5, 1000, 0, 7), device)
    ours[2].grad = None
    ours.append(torch.zeros(3, device=device, requires_grad=True))  # never had a grad
    ref = clone_params(ours)
    for params in (ours, ref):
        params[1].grad[17] = math.inf
        params[1].grad[900] = -math.inf
    n_ours = mechgpu.clip_grad_norm_(ours, 1.0, norm_type=norm_type)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    torch.testing.assert_close(n_ours.cpu(), n_ref.cpu(), equal_nan=True)
    for a, b in zip(ours, ref):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), equal_nan=True)
    # NaN anywhere: the norm is NaN and so is every clipped grad, as in torch (p = 0 counts it)
    ours, ref = make_params((5, 300), device), None
    ref = clone_params(ours)
    for params in (ours, ref):
        params[0].grad[2] = math.nan
    n_ours = mechgpu.clip_grad_norm_(ours, 1.0, norm_type=norm_type)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    torch.testing.assert_close(n_ours.cpu(), n_ref.cpu(), equal_nan=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [math.inf, -math.inf, -1.0, -2.5], ids=str)
def test_inf_norm_of_an_empty_grad_is_torchs_error(norm_type, device):
    params = make_params((0, 3), device)
    with pytest.raises(RuntimeError) as ours:
        mechgpu.clip_grad_norm_(params, 1.0, norm_type=norm_type)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, norm_type=norm_type)
    assert "norm on an empty tensor because the operation does not have an identity" in str(ours.value)
    assert str(theirs.value).split(" norm ")[1] == str(ours.value).split(" norm ")[1]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    assert torch.equal(mechgpu.get_total_norm([]), torch.nn.utils.get_total_norm([]))
    params = [torch.zeros(3, device=device, requires_grad=True)]
    assert torch.equal(mechgpu.clip_grad_norm_(params, 1.0).cpu(), torch.tensor(0.0))
    with pytest.warns(UserWarning, match="empty generator"):
        mechgpu.clip_grad_norm_((p for p in []), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_error_if_nonfinite_raises_and_changes_nothing(device):
    params = make_params((10, 100), device)
    params[1].grad[3] = math.inf
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="The total norm of order 2.0 for gradients from `parameters` is non-finite"):
        mechgpu.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


@pytest.mark.parametrize("device", DEVICES)
def test_get_total_norm_and_clip_grads_with_norm(device):
    ours = make_params((3, 1000, 4097), device, scale=2.0)
    ref = clone_params(ours)
    total_ours = mechgpu.get_total_norm([p.grad for p in ours], 2.0)
    total_ref = torch.nn.utils.get_total_norm([p.grad for p in ref], 2.0)
    torch.testing.assert_close(total_ours.cpu(), total_ref.cpu(), rtol=1e-5, atol=0)
    mechgpu.clip_grads_with_norm_(ours, 0.3, total_ref)
    torch.nn.utils.clip_grads_with_norm_(ref, 0.3, total_ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_grads(device):
    base = torch.randn(5001, device=device)
    p = torch.nn.Parameter(torch.randn(5000, device=device))
    p.grad = base[1:]  # 4-byte aligned only
    q = torch.nn.Parameter(torch.randn(777, device=device))
    q.grad = torch.randn(777, device=device)
    ref = clone_params([p, q])
    n_ours = mechgpu.clip_grad_norm_([p, q], 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(n_ours.cpu(), n_ref.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(p.grad.cpu(), ref[0].grad.cpu(), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------
# clip-in-step: the norm and the coefficient stay on the device, grads are not rescaled
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FEATURED, ids=lambda c: c.optimizer)
def test_clip_in_step_matches_torch_clip_then_step(case, device):
    gen = torch.Generator().manual_seed(3)
    ours = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (7, 1000, 4097)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    half = {"params": ours[2:], "lr": 5e-3}
    opt = getattr(mo, case.optimizer)([{"params": ours[:2]}, half], lr=1e-2, max_grad_norm=1.5, **case.options)
    ref_opt = getattr(torch.optim, case.optimizer)([{"params": ref[:2]}, {"params": ref[2:], "lr": 5e-3}], lr=1e-2,
                                                   **case.options)
    for step in range(6):
        scale = 0.01 if step == 2 else 1.0  # one step whose norm is under max_norm: no clipping
        grads = [scale * torch.randn(a.shape, generator=gen).to(device) for a in ours]
        for a, b, g in zip(ours, ref, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref, 1.5)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), norm_ref.cpu(), rtol=1e-5, atol=0)
        assert (norm_ref > 1.5) == (scale == 1.0)
        assert all(torch.equal(a.grad, g) for a, g in zip(ours, grads))  # ours are not rescaled
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


def test_clip_in_step_norm_over_confirmed_caches_follows_every_change():
    """Where every group runs from a cache confirmed or built this step, the step's norm reads the
    grads the caches hold (``_fused._NormOverCaches``, no per-tensor grouping). Between steps the
    grads move, a group is added, a grad goes missing, a param goes unaligned and aligned again:
    each step's norm and params equal torch's clip_grad_norm_ then step, and the path taken is the
    one expected (the general norm while a bucket is unaligned). In a child process, as the safety
    suite's cases: a wrong address would crash it, not the run."""
    isolated(_norm_over_caches_through_changes)


def _norm_over_caches_through_changes() -> None:
    from mechgpu.optim import _fused

    fast_steps = []
    launch = _fused._NormOverCaches.launch
    _fused._NormOverCaches.launch = lambda self, *a: fast_steps.append(len(self.plan.numels)) or launch(self, *a)
    gen = torch.Generator().manual_seed(11)
    ours = [torch.randn(n, generator=gen).to(KERNEL_DEVICE).requires_grad_() for n in (7, 1000, 4097, 33)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = mo.AdamW([{"params": ours[:2]}], lr=1e-2, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW([{"params": ref[:2]}], lr=1e-2)
    storage = torch.empty(33 + 1, device=KERNEL_DEVICE)
    # per step: what changes before it, and whether its norm reads the caches (tensors in the norm table)
    plan = [(None, 2), ("grads move", 2), ("grads move", 2), ("group added", 3), ("grads move", 3),
            ("grad missing", 2), ("grads move", 3), ("grads move", 3), ("unaligned param", None),
            ("grads move", None), ("aligned again", 4), ("grads move", 4)]
    for change, fast in plan:
        if change == "group added":
            opt.add_param_group({"params": ours[2:3], "lr": 5e-3})
            ref_opt.add_param_group({"params": ref[2:3], "lr": 5e-3})
        if change == "unaligned param":  # 4 bytes into a fresh storage: the new bucket is unaligned
            opt.add_param_group({"params": [ours[3]]})
            ref_opt.add_param_group({"params": [ref[3]]})
            with torch.no_grad():
                ours[3].data = storage[1:].copy_(ours[3])
        if change == "aligned again":
            with torch.no_grad():
                ours[3].data = ours[3].detach().clone()
        grads = [torch.randn(a.shape, generator=gen).to(KERNEL_DEVICE) for a in ours]
        for a, b, g in zip(ours, ref, grads):
            a.grad, b.grad = g.clone(), g.clone()
        if change == "grad missing":
            ours[1].grad = ref[1].grad = None
        stepped = [p for group in ref_opt.param_groups for p in group["params"] if p.grad is not None]
        before = len(fast_steps)
        opt.step()
        norm_ref = torch.nn.utils.clip_grad_norm_(stepped, 1.0)
        ref_opt.step()
        assert fast_steps[before:] == ([] if fast is None else [fast]), change
        torch.testing.assert_close(opt.last_grad_norm.cpu(), norm_ref.cpu(), rtol=1e-5, atol=0)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FEATURED, ids=lambda c: c.optimizer)
def test_skip_nonfinite_leaves_everything_untouched(case, device):
    params = [torch.randn(n, device=device, requires_grad=True) for n in (5, 1000)]
    opt = getattr(mo, case.optimizer)(params, lr=1e-2, max_grad_norm=1.0, skip_nonfinite=True, **case.options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    counters = getattr(opt, "_own_steps", {})
    before_counters = {k: v.clone() for k, v in counters.items()}
    for bad in (math.inf, math.nan):
        for p in params:
            p.grad = torch.randn_like(p)
        params[1].grad[10] = bad
        opt.step()
        assert not math.isfinite(opt.last_grad_norm.item())
        for p, b in zip(params, before_params):
            assert torch.equal(p.detach(), b)
        for p in params:
            for k, v in opt.state[p].items():
                assert torch.equal(v, before_state[id(p)][k]), k
        for k, v in counters.items():
            assert torch.equal(v, before_counters[k])
    for p in params:  # and a finite step afterwards goes through
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before_params))


def _norm_plans(opt) -> list:
    """An optimizer's clip-norm plans: the general path's and the one over its caches."""
    over_caches = [] if opt._norm_over_caches is None else [opt._norm_over_caches.plan]
    return list(opt._norm_plans.values()) + over_caches


def _uploads(opt) -> int:
    """Host-to-device table uploads an optimizer's plans have made so far."""
    plans = [b.plan for cache in opt._group_caches.values() for b in cache.buckets]
    return sum(plan.uploads for plan in plans + _norm_plans(opt))


@pytest.mark.parametrize("device", DEVICES)
def test_optimizers_of_equal_sizes_keep_their_own_tables(device):
    """Two clip-in-step optimizers over params of the same sizes, stepped in turn: each matches
    torch's clip then step, and once warm a step with the same grads uploads nothing."""
    gen = torch.Generator().manual_seed(21)
    sizes = (7, 1000, 4097)
    pairs = []
    for _ in range(2):
        ours = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in sizes]
        ref = [p.detach().clone().requires_grad_() for p in ours]
        for a, b in zip(ours, ref):
            a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        pairs.append((ours, ref, mo.AdamW(ours, lr=1e-2, max_grad_norm=1.0), torch.optim.AdamW(ref, lr=1e-2)))
    for step in range(5):
        for ours, ref, opt, ref_opt in pairs:
            scale = 3.0 if step % 2 else 0.01
            for a, b in zip(ours, ref):  # the same grad tensors, refilled
                g = scale * torch.randn(a.shape, generator=gen)
                a.grad.copy_(g)
                b.grad.copy_(g)
            uploads = _uploads(opt)
            opt.step()
            norm_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
            if step >= 1:
                assert _uploads(opt) == uploads, "a steady-state step uploaded a table"
            torch.testing.assert_close(opt.last_grad_norm.cpu(), norm_ref.cpu(), rtol=1e-5, atol=0)
            for a, b in zip(ours, ref):
                torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)
    tables = [plan.table.data_ptr() for _, _, opt, _ in pairs for plan in _norm_plans(opt)]
    assert len(set(tables)) == len(tables) == 2


def test_dtypes_the_kernels_do_not_take_go_to_torch():
    """float64 grads: torch's own clip runs, as mechgpu.nn and mechgpu.init call torch for such dtypes."""
    params = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (3, 1000)]
    for p in params:
        p.grad = torch.randn_like(p)
    twins = [p.detach().clone().requires_grad_() for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    total = mechgpu.clip_grad_norm_(params, max_norm=1.0)
    expected = torch.nn.utils.clip_grad_norm_(twins, max_norm=1.0)
    assert total.dtype == torch.float64 and torch.equal(total, expected)
    assert all(torch.equal(p.grad, t.grad) for p, t in zip(params, twins))


@pytest.mark.filterwarnings("ignore:.*own implementation steps that group")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("torch_dtype", [torch.float64, torch.complex64], ids=str)
@pytest.mark.parametrize("with_kernel_group", [True, False], ids=["kernel+torch groups", "torch groups only"])
def test_clip_in_step_is_one_norm_over_every_group(torch_dtype, with_kernel_group, device):
    """max_grad_norm with a group the kernels step (fp32) and one torch steps (float64 or complex):
    one global norm over every grad, last_grad_norm equal to torch's get_total_norm over all of
    them, the step equal to torch's clip_grad_norm_ then step, and no grad rescaled on any path."""
    groups = [make_params((5, 7), device, torch_dtype, seed=1, scale=3.0)]
    if with_kernel_group:
        groups.insert(0, make_params((3, 1000), device, seed=2, scale=3.0))
    twins = [clone_params(g) for g in groups]
    ours = mo.AdamW([{"params": g} for g in groups], lr=1e-2, max_grad_norm=0.5)
    ref = torch.optim.AdamW([{"params": g} for g in twins], lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for g, t in zip(groups, twins):
            for p, q in zip(g, t):
                p.grad = (3.0 * torch.randn(p.shape, generator=gen, dtype=p.dtype)).to(device)
                q.grad = p.grad.clone()
        given = [p.grad.clone() for g in groups for p in g]
        ours.step()
        ref_params = [q for t in twins for q in t]
        expected = torch.nn.utils.get_total_norm([q.grad for q in ref_params])
        assert ours.last_grad_norm.item() == pytest.approx(expected.item(), rel=1e-5)
        assert expected.item() > 0.5 * 4  # clipping is active
        torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
        ref.step()
        assert all(torch.equal(p.grad, g) for p, g in zip((p for g in groups for p in g), given))
    for g, t in zip(groups, twins):
        for p, q in zip(g, t):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(HAS_CUDA, reason="counts atomics in triton's interpreter, which a GPU host does not use")
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf, 3.5])
def test_norm_atomics_do_not_grow_with_elements(norm_type, monkeypatch):
    """Two-stage norm: per-program partials, combined by the last program; one atomic (the
    done-count) per program, for 3 blocks or 60, and torch's norm either way."""
    from mechgpu.kernels import _launch

    atomics = count_atomics(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    counts = {}
    for sizes in ((700, 3), (5000, 20_000, 1, 4097, 70_001)):
        grads = [torch.randn(n, generator=gen) * 3 for n in sizes]
        start = atomics()
        ours = mechgpu.get_total_norm(grads, norm_type)
        counts[len(sizes)] = atomics() - start
        rtol, atol, _ = norm_tolerance(torch.float32)
        torch.testing.assert_close(ours, torch.nn.utils.get_total_norm(grads, norm_type), rtol=rtol, atol=atol)
    assert counts == {2: _launch.CPU_PROGRAMS, 5: _launch.CPU_PROGRAMS}


@pytest.mark.skipif(HAS_CUDA, reason="sets the interpreter's program count, which a GPU host does not use")
@pytest.mark.parametrize("norm_type", [2.0, -math.inf])
def test_norm_over_more_programs_than_one_partials_read(norm_type, monkeypatch):
    """1,100 programs, over one PARTIALS_WIDTH read of the partials, with a NaN-free inf in the
    last tensor: torch's norm, and the grads clipped as torch clips them."""
    from mechgpu.kernels import _launch

    monkeypatch.setattr(_launch, "CPU_PROGRAMS", 1100)
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(1 + i % 5, generator=gen) for i in range(1100)]
    rtol, atol, _ = norm_tolerance(torch.float32)
    torch.testing.assert_close(mechgpu.get_total_norm(grads, norm_type),
                               torch.nn.utils.get_total_norm(grads, norm_type), rtol=rtol, atol=atol)
    grads[-1][0] = -math.inf
    torch.testing.assert_close(mechgpu.get_total_norm(grads, norm_type),
                               torch.nn.utils.get_total_norm(grads, norm_type), rtol=rtol, atol=atol)
