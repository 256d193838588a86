"""AMP (GradScaler), fp32 master weights, bf16 states and stochastic rounding."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import DEVICES

import mechgpu.optim as mo


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_grad_scaler_matches_torch_fused_fp32(name, device):
    """fp32 params, a scale so large that the first steps overflow: step for step as torch.

    Adam/AdamW: against torch's fused AMP path. SGD: against GradScaler's path for unfused
    optimizers (unscale, then skip the step on inf), because torch's fused SGD allocates its
    momentum buffers with empty_like on a first step that GradScaler then skips, and later
    steps read that uninitialised memory.
    """
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    ours_model = tiny_model(torch.float32, device)
    ref_model = twin(ours_model)
    ours = getattr(mo, name)(ours_model.parameters(), lr=1e-2, **kwargs)
    ref = getattr(torch.optim, name)(ref_model.parameters(), lr=1e-2, fused=name != "SGD",
                                     foreach=False if name == "SGD" else None, **kwargs)
    trace_ours = amp_run(ours_model, ours, device, torch.float32, 8, init_scale=2.0**127)
    trace_ref = amp_run(ref_model, ref, device, torch.float32, 8, init_scale=2.0**127)
    assert [t[2] for t in trace_ours] == [t[2] for t in trace_ref]
    assert sum(t[2] > 0 for t in trace_ours) >= 2, "the scale should overflow on the first steps"
    assert [t[1] for t in trace_ours] == [t[1] for t in trace_ref]
    for (l_ours, _, _), (l_ref, _, _) in zip(trace_ours, trace_ref):
        assert l_ours == pytest.approx(l_ref, rel=1e-5)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if name != "SGD":  # skipped steps are not counted
        skipped = sum(t[2] > 0 for t in trace_ours)
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            assert ours.state[p]["step"].item() == ref.state[q]["step"].item() == 8 - skipped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kwargs", [("SGD", {"momentum": 0.9, "dampening": 0.5}), ("Adam", {}),
                                         ("RMSprop", {"momentum": 0.5})])
def test_steps_skipped_before_any_state_leave_none_through_a_state_dict(name, kwargs, device):
    """GradScaler skips the first steps (inf grads): torch's step never runs, so no state is made.
    mechgpu leaves none either (no zero momentum buffer that a state_dict would carry as started),
    and after a torch.save round trip of both optimizers the runs go on alike."""
    ours_model = tiny_model(torch.float32, device)
    ref_model = twin(ours_model)
    ours = getattr(mo, name)(ours_model.parameters(), lr=1e-2, **kwargs)
    ref = getattr(torch.optim, name)(ref_model.parameters(), lr=1e-2, foreach=False, **kwargs)
    trace_ours = amp_run(ours_model, ours, device, torch.float32, 2, init_scale=2.0**127)
    trace_ref = amp_run(ref_model, ref, device, torch.float32, 2, init_scale=2.0**127)
    assert [t[2] > 0 for t in trace_ours] == [t[2] > 0 for t in trace_ref] == [True, True]
    assert ours.state_dict()["state"] == ref.state_dict()["state"] == {}
    reloaded = []
    for model, opt, cls in ((ours_model, ours, getattr(mo, name)), (ref_model, ref, getattr(torch.optim, name))):
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        fresh = cls(model.parameters(), lr=1e-2, foreach=False, **kwargs)  # mechgpu's take foreach and ignore it
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
@pytest.mark.parametrize("name", ["AdamW", "RMSprop", "SGD"])
def test_state_dict_keeps_masters_and_resumes_identically(name, device):
    kwargs = {"momentum": 0.9} if name != "AdamW" else {}
    start, target = regression_problem(device, n=1000)
    straight = start.to(torch.bfloat16).requires_grad_()
    opt = getattr(mo, name)([straight], lr=1e-3, master_weights=True, **kwargs)
    run_quadratic(straight, opt, target, 6)

    first = start.to(torch.bfloat16).requires_grad_()
    opt1 = getattr(mo, name)([first], lr=1e-3, master_weights=True, **kwargs)
    run_quadratic(first, opt1, target, 3)
    buffer = io.BytesIO()
    torch.save({"param": first.detach(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert saved["opt"]["state"][0]["master_param"].dtype == torch.float32
    resumed = saved["param"].clone().requires_grad_()
    opt2 = getattr(mo, name)([resumed], lr=1e-3, master_weights=True, **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed]["master_param"].dtype == torch.float32
    run_quadratic(resumed, opt2, target, 3)
    assert torch.equal(resumed.detach(), straight.detach())
    for key, value in opt.state[straight].items():
        assert torch.equal(opt2.state[resumed][key], value), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Adam", "RMSprop", "SGD"])
def test_bf16_states(name, device):
    """state_dtype=bf16: states are stored in bf16; the trajectory stays near torch's fp32 one."""
    kwargs = {"momentum": 0.9} if name != "Adam" else {}
    start, target = regression_problem(device, n=1000)
    ours = start.clone().requires_grad_()
    ref = start.clone().requires_grad_()
    opt = getattr(mo, name)([ours], lr=1e-2, state_dtype=torch.bfloat16, **kwargs)
    ref_opt = getattr(torch.optim, name)([ref], lr=1e-2, **kwargs)
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
