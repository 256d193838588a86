"""AMP (GradScaler), fp32 master weights, bf16 states and stochastic rounding."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import DEVICES
from mechgpu.kernels.optim_spec import SPECS

import mechgpu.optim as mo
from mechgpu.testing.optim_cases import FEATURED, VARIANTS, one_per_rule

# The optimizers and their options come from the case database (mechgpu.testing.optim_cases):
# FEATURED is one configuration per optimizer; one_per_rule keeps one per kernel rule.
by_name = pytest.mark.parametrize("case", FEATURED, ids=lambda c: c.optimizer)


def tiny_model(dtype, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device, dtype)


def twin(model):
    other = tiny_model(next(model.parameters()).dtype, next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return other


def amp_run(model, opt, device, dtype, steps, init_scale, seed=1):
    """Train with a GradScaler; return per-step (loss, scale, found_inf) and the params."""
    gen = torch.Generator().manual_seed(seed)
    scaler = torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=3)
    trace = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen).to(device, dtype)
        y = torch.randn(32, 4, generator=gen).to(device, dtype)
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float()) * 50
        scaler.scale(loss).backward()
        scaler.step(opt)
        found_inf = sum(v.item() for v in scaler._found_inf_per_device(opt).values())
        scaler.update()
        opt.zero_grad()
        trace.append((loss.item(), scaler.get_scale(), found_inf))
    return trace


def torch_fused_runs(case, device: str) -> bool:
    """Whether the case's torch twin takes fused=True and torch's dispatcher has its fused kernel
    for ``device`` (a fused kernel may exist for some devices only)."""
    kernel = f"aten::_fused_{case.optimizer.lower()}_"
    return case.torch_takes("fused") and torch._C._dispatch_has_kernel_for_dispatch_key(kernel, device.upper())


@pytest.mark.parametrize("device", DEVICES)
@by_name
def test_grad_scaler_matches_torch_fused_fp32(case, device):
    """fp32 params, a scale so large that the first steps overflow: step for step as torch.

    Against torch's fused AMP path where torch has one for the device; else against GradScaler's
    path for unfused optimizers (unscale, then skip the step on inf). Also the unfused path for a
    rule whose torch step makes a missing state (SGD's momentum buffer): torch's fused SGD
    allocates its momentum buffers with empty_like on a first step that GradScaler then skips,
    and later steps read that uninitialised memory.
    """
    spec = SPECS[case.optimizer]
    fused = torch_fused_runs(case, device) and not spec.makes_missing_states
    ours_model = tiny_model(torch.float32, device)
    ref_model = twin(ours_model)
    ours = getattr(mo, case.optimizer)(ours_model.parameters(), lr=1e-2, **case.options)
    path = {"fused": True} if fused else {"foreach": False}
    ref = getattr(torch.optim, case.optimizer)(ref_model.parameters(), lr=1e-2, **path, **case.options)
    trace_ours = amp_run(ours_model, ours, device, torch.float32, 8, init_scale=2.0**127)
    trace_ref = amp_run(ref_model, ref, device, torch.float32, 8, init_scale=2.0**127)
    assert [t[2] for t in trace_ours] == [t[2] for t in trace_ref]
    assert sum(t[2] > 0 for t in trace_ours) >= 2, "the scale should overflow on the first steps"
    assert [t[1] for t in trace_ours] == [t[1] for t in trace_ref]
    for (l_ours, _, _), (l_ref, _, _) in zip(trace_ours, trace_ref):
        assert l_ours == pytest.approx(l_ref, rel=1e-5)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if spec.step_key:  # skipped steps are not counted
        skipped = sum(t[2] > 0 for t in trace_ours)
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            assert ours.state[p][spec.step_key].item() == ref.state[q][spec.step_key].item() == 8 - skipped


@pytest.mark.parametrize("device", DEVICES)
# maximize ascends this loss: its growth (10^9 in 7 SGD steps) makes fp32 rounding outgrow the tolerance
@pytest.mark.parametrize("case", [c for c in VARIANTS if not c.has("maximize")], ids=lambda c: c.name)
def test_steps_skipped_before_any_state_leave_none_through_a_state_dict(case, device):
    """GradScaler skips the first steps (inf grads): torch's step never runs, so no state is made
    but what torch's constructor makes (Adagrad's). mechgpu makes the same and no more (no zero
    momentum buffer that a state_dict would carry as started), and after a torch.save round trip
    of both optimizers the runs go on alike (SGD's dampening shows a buffer carried as started)."""
    ours_model = tiny_model(torch.float32, device)
    ref_model = twin(ours_model)
    classes = getattr(mo, case.optimizer), getattr(torch.optim, case.optimizer)
    ours, ref = (cls(model.parameters(), lr=1e-2, foreach=False, **case.options)
                 for cls, model in zip(classes, (ours_model, ref_model)))
    constructed = {i: {k: v.clone() for k, v in s.items()} for i, s in ref.state_dict()["state"].items()}
    trace_ours = amp_run(ours_model, ours, device, torch.float32, 2, init_scale=2.0**127)
    trace_ref = amp_run(ref_model, ref, device, torch.float32, 2, init_scale=2.0**127)
    assert [t[2] > 0 for t in trace_ours] == [t[2] > 0 for t in trace_ref] == [True, True]
    for saved in (ours.state_dict()["state"], ref.state_dict()["state"]):
        assert saved.keys() == constructed.keys()
        for i, state in constructed.items():
            assert saved[i].keys() == state.keys() and all(torch.equal(saved[i][k], v) for k, v in state.items()), i
    reloaded = []
    for model, opt, cls in zip((ours_model, ref_model), (ours, ref), classes):
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        fresh = cls(model.parameters(), lr=1e-2, foreach=False, **case.options)  # mechgpu's take foreach, ignore it
        fresh.load_state_dict(torch.load(buffer))
        reloaded.append(fresh)
    amp_run(ours_model, reloaded[0], device, torch.float32, 5, init_scale=2.0**10, seed=2)
    amp_run(ref_model, reloaded[1], device, torch.float32, 5, init_scale=2.0**10, seed=2)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_fp16_params_match_torch_fused(device):
    """fp16 params with a GradScaler whose scale overflows: the same steps are skipped, and the
    params stay within a few fp16 ulps of torch's fused fp16 run (whose states are fp16)."""
    ours_model = tiny_model(torch.float16, device)
    ref_model = twin(ours_model)
    ours = mo.Adam(ours_model.parameters(), lr=1e-3)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-3, fused=True)
    trace_ours = amp_run(ours_model, ours, device, torch.float16, 10, init_scale=2.0**24)
    trace_ref = amp_run(ref_model, ref, device, torch.float16, 10, init_scale=2.0**24)
    assert [t[2] > 0 for t in trace_ours] == [t[2] > 0 for t in trace_ref]
    assert sum(t[2] > 0 for t in trace_ours) >= 2
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        assert a.dtype == torch.float16
        ulp = torch.finfo(torch.float16).eps * b.float().abs().clamp_min(2**-14)
        assert ((a.float() - b.float()).abs() / ulp).max() <= 4


def regression_problem(device, n=4096, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=gen).to(device)
    start = torch.randn(n, generator=gen).to(device)
    return start, target


def run_quadratic(param, opt, target, steps):
    for _ in range(steps):
        param.grad = (param.detach().float() - target).to(param.dtype)
        opt.step()
    return param.detach().float()


@pytest.mark.parametrize("device", DEVICES)
def test_master_weights_track_fp32_more_closely(device):
    """Adam on a quadratic for 200 small steps: bf16 + fp32 masters stays near the fp32 run,
    plain bf16 drifts (updates below half an ulp are lost), stochastic rounding lies between."""
    start, target = regression_problem(device)
    steps, lr = 200, 1e-4
    fp32 = start.clone().requires_grad_()
    reference = run_quadratic(fp32, mo.Adam([fp32], lr=lr), target, steps)
    errors = {}
    for mode, options in (("bf16", {}), ("bf16+master", {"master_weights": True}),
                          ("bf16+stochastic", {"stochastic_rounding": True})):
        p = start.to(torch.bfloat16).requires_grad_()
        result = run_quadratic(p, mo.Adam([p], lr=lr, **options), target, steps)
        errors[mode] = (result - reference).abs().mean().item()
    print("mean |param - fp32 param| after 200 Adam steps:", errors)
    assert errors["bf16+master"] < errors["bf16"] / 4
    assert errors["bf16+stochastic"] < errors["bf16"]
    # masters: the bf16 param is always its master rounded to nearest
    p = start.to(torch.bfloat16).requires_grad_()
    opt = mo.Adam([p], lr=lr, master_weights=True)
    run_quadratic(p, opt, target, 3)
    assert torch.equal(p.detach(), opt.state[p]["master_param"].to(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
@by_name
def test_state_dict_keeps_masters_and_resumes_identically(case, device):
    cls, kwargs = getattr(mo, case.optimizer), case.options
    start, target = regression_problem(device, n=1000)
    straight = start.to(torch.bfloat16).requires_grad_()
    opt = cls([straight], lr=1e-3, master_weights=True, **kwargs)
    run_quadratic(straight, opt, target, 6)

    first = start.to(torch.bfloat16).requires_grad_()
    opt1 = cls([first], lr=1e-3, master_weights=True, **kwargs)
    run_quadratic(first, opt1, target, 3)
    buffer = io.BytesIO()
    torch.save({"param": first.detach(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert saved["opt"]["state"][0]["master_param"].dtype == torch.float32
    resumed = saved["param"].clone().requires_grad_()
    opt2 = cls([resumed], lr=1e-3, master_weights=True, **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed]["master_param"].dtype == torch.float32
    run_quadratic(resumed, opt2, target, 3)
    assert torch.equal(resumed.detach(), straight.detach())
    for key, value in opt.state[straight].items():
        assert torch.equal(opt2.state[resumed][key], value), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", one_per_rule(FEATURED), ids=lambda c: c.optimizer)
def test_bf16_states(case, device):
    """state_dtype=bf16: states are stored in bf16; the trajectory stays near torch's fp32 one."""
    start, target = regression_problem(device, n=1000)
    ours = start.clone().requires_grad_()
    ref = start.clone().requires_grad_()
    opt = getattr(mo, case.optimizer)([ours], lr=1e-2, state_dtype=torch.bfloat16, **case.options)
    ref_opt = getattr(torch.optim, case.optimizer)([ref], lr=1e-2, **case.options)
    run_quadratic(ours, opt, target, 10)
    run_quadratic(ref, ref_opt, target, 10)
    for key, value in opt.state[ours].items():
        if key != "step":
            assert value.dtype == torch.bfloat16, key
            expected = ref_opt.state[ref][key]
            # bf16 keeps 8 bits: 10 steps of rounding, relative to the state's scale
            torch.testing.assert_close(value.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    moved = (ref.detach() - start).abs().mean()
    assert (ours.detach() - ref.detach()).abs().mean() < 0.02 * moved


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_unbiased(device):
    """Updates of a tenth of an ulp: round-to-nearest loses them all, stochastic rounding
    keeps them on average (to within 5 standard errors)."""
    n, steps, delta = 4096, 50, 2.0**-7 / 10  # bf16 ulp at 1.0 is 2^-7
    for stochastic in (False, True):
        p = torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)
        opt = mo.SGD([p], lr=1.0, stochastic_rounding=stochastic)
        for _ in range(steps):
            p.grad = torch.full_like(p, -delta)
            opt.step()
        moved = p.detach().float() - 1.0
        if not stochastic:
            assert torch.equal(moved, torch.zeros_like(moved))
        else:
            expected = steps * delta
            # each step adds 0 or 2^-7 (a Bernoulli(1/10) of an ulp): the mean's standard error
            std_err = (steps * 0.1 * 0.9) ** 0.5 * 2.0**-7 / n**0.5
            assert abs(moved.mean().item() - expected) < 5 * std_err
    # different steps draw different random numbers
    p = torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)
    opt = mo.SGD([p], lr=1.0, stochastic_rounding=True, momentum=0.0)
    p.grad = torch.full_like(p, -delta)
    opt.step()
    first = p.detach().clone() - 1
    opt.step()
    assert not torch.equal(p.detach() - 1 - first, first)


def test_option_validation():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid max_grad_norm: -1"):
        mo.Adam(p, max_grad_norm=-1)
    with pytest.raises(ValueError, match="skip_nonfinite=True needs max_grad_norm"):
        mo.Adam(p, skip_nonfinite=True)
    with pytest.raises(ValueError, match="Invalid state_dtype: torch.float16"):
        mo.SGD(p, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="stochastic_rounding applies to bf16 params without master weights"):
        mo.RMSprop(p, stochastic_rounding=True, master_weights=True)
