"""mechgpu.optim against torch.optim itself: trajectories, state_dicts, schedulers, bad input.

On CPU the real Triton kernels run in triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch
from conftest import (
    DEVICES,
    HAS_CUDA,
    KERNEL_DEVICE,
    count_atomics,
    count_launches,
    gpu,
    requires_cuda,
    run_without_interpreter,
)
from mechgpu.kernels.optim_spec import SPECS, STATE_KEYS

import mechgpu.optim as mo
from mechgpu.testing.optim_cases import FEATURED, VARIANTS, one_per_rule, state_errors

# The optimizers, their configs, learning rates and state tolerance come from the case database
# (mechgpu.testing.optim_cases), whose trajectories against torch.optim tests/test_cases.py runs:
# FEATURED is one configuration per optimizer; one_per_rule keeps one per kernel rule.
by_name = pytest.mark.parametrize("case", FEATURED, ids=lambda c: c.optimizer)
by_rule = pytest.mark.parametrize("case", one_per_rule(FEATURED), ids=lambda c: c.optimizer)


def make_params(sizes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(device=device, dtype=dtype).requires_grad_() for n in sizes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def two_groups(params, lr):
    """Two param groups with different hyperparameters, for both optimizers alike."""
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], "lr": lr * 0.5, "weight_decay": 0.05}]


def set_random_grads(param_lists, gen, dtype=None):
    for tensors in zip(*param_lists):
        g = torch.randn(tensors[0].shape, generator=gen)
        for p in tensors:
            p.grad = g.to(device=p.device, dtype=dtype or p.dtype)


def assert_states_close(ours, ours_params, ref, ref_params):
    """Every state against the other optimizer's, with the database's state tolerance."""
    errs = state_errors(ours, ours_params, ref, ref_params)
    assert errs.passed, "; ".join(errs.failures[:3])


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_lr_and_betas_with_scheduler(device):
    """lr and betas as tensors; a scheduler writes the tensor lr in place and it takes effect."""
    ours_p = make_params((5, 1000), device)
    ref_p = clone_params(ours_p)
    t = lambda v: torch.tensor(v, device=device)
    ours = mo.Adam(ours_p, lr=t(0.01), betas=(t(0.9), t(0.99)), capturable=True)
    ref = torch.optim.Adam(ref_p, lr=t(0.01), betas=(t(0.9), t(0.99)), capturable=device != "cpu")
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, ref)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        set_random_grads([ours_p, ref_p], gen)
        ours.step()
        ref.step()
        for s in scheds:
            s.step()
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(0.01 * 0.5**3)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@by_name
def test_lr_schedulers(case, device):
    ours_p = make_params((7, 300), device)
    ref_p = clone_params(ours_p)
    ours = getattr(mo, case.optimizer)(ours_p, lr=0.1, **case.options)
    ref = getattr(torch.optim, case.optimizer)(ref_p, lr=0.1, **case.options)
    # OneCycleLR cycles the momentum (or beta1) too, where the optimizer has one
    cycle_momentum = case.torch_takes("momentum") or case.torch_takes("betas")
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=8, cycle_momentum=cycle_momentum)
    scheds = [make(ours), make(ref)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(8):
        set_random_grads([ours_p, ref_p], gen)
        ours.step()
        ref.step()
        for s in scheds:
            s.step()
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# state_dict, groups, closures, None grads
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["torch-to-mechgpu", "mechgpu-to-torch"])
@pytest.mark.parametrize("case", VARIANTS, ids=lambda c: c.name)
def test_state_dict_round_trip(case, direction):
    """Save after 5 steps in one implementation, load into the other, and continue identically."""
    first_cls, second_cls = getattr(torch.optim, case.optimizer), getattr(mo, case.optimizer)
    if direction == "mechgpu-to-torch":
        first_cls, second_cls = second_cls, first_cls
    params = make_params((3, 1000, 4097), KERNEL_DEVICE)
    cont_p = clone_params(params)
    first = first_cls(two_groups(params, case.lr), lr=case.lr, **case.options)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        set_random_grads([params], gen)
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # a real checkpoint: no tensors shared with `first`
    buffer.seek(0)
    sd = torch.load(buffer)
    assert all(set(state) <= {"step", *STATE_KEYS} for state in sd["state"].values())  # plain SGD keeps none
    with torch.no_grad():
        for c, p in zip(cont_p, params):
            c.copy_(p)
    second = second_cls(two_groups(cont_p, case.lr), lr=case.lr, **case.options)
    second.load_state_dict(sd)
    for _ in range(5):
        set_random_grads([params, cont_p], gen)
        first.step()
        second.step()
    for a, b in zip(params, cont_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert_states_close(first, params, second, cont_p)


def test_state_dict_keeps_fp32_states_of_bf16_params():
    params = make_params((3, 1000), KERNEL_DEVICE, torch.bfloat16)
    opt = mo.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(6)
    set_random_grads([params], gen)
    opt.step()
    sd = opt.state_dict()
    saved = {k: v.clone() for k, v in sd["state"][1].items()}
    fresh = mo.Adam(params, lr=1e-2)
    fresh.load_state_dict(sd)
    for key, value in saved.items():
        assert fresh.state[params[1]][key].dtype == torch.float32
        assert torch.equal(fresh.state[params[1]][key], value)


def test_add_param_group_closure_zero_grad_and_none_grads():
    ours_p = make_params((3, 1000, 17, 5), KERNEL_DEVICE)
    ref_p = clone_params(ours_p)
    ours = mo.Adam(ours_p[:2], lr=1e-2)
    ref = torch.optim.Adam(ref_p[:2], lr=1e-2)
    gen = torch.Generator().manual_seed(7)

    def run(step_index):
        set_random_grads([ours_p, ref_p], gen)
        if step_index % 3 == 1:  # the third param has no grad on some steps: skipped, step not counted
            ours_p[2].grad = ref_p[2].grad = None
        target = torch.randn(1000, generator=gen).to(KERNEL_DEVICE)

        def closure(params):
            def f():
                return ((params[1] - target) ** 2).sum()
            return f

        loss_ours = ours.step(closure(ours_p))
        loss_ref = ref.step(closure(ref_p))
        assert torch.equal(loss_ours, loss_ref)

    for i in range(3):
        run(i)
    ours.add_param_group({"params": ours_p[2:], "lr": 3e-3, "amsgrad": True})
    ref.add_param_group({"params": ref_p[2:], "lr": 3e-3, "amsgrad": True})
    for i in range(3, 9):
        run(i)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert ours.state[ours_p[2]]["step"].item() == ref.state[ref_p[2]]["step"].item() == 4
    ours.zero_grad()
    assert all(p.grad is None for p in ours_p)


@pytest.mark.parametrize("subclass", [False, True], ids=["class", "subclass_with_own_step"])
def test_step_hooks_and_profiler_event_as_torchs(subclass):
    """The step runs torch's step pre and post hooks (global and the optimizer's, a pre hook's new
    arguments included) once each, in torch's order, and a profiler records the step under torch's
    name, as torch's own optimizer does; also for a subclass whose own ``step`` (which torch's
    constructor wraps) calls ours. (torch's own base step, wrapped too once any instance of it was made,
    runs the hooks a second time there: the subclass case checks ours against the single run.)"""
    import torch.optim.optimizer as torch_optimizer

    def build(base):
        if not subclass:
            return base
        return type(f"My{base.__name__}", (base,), {"step": lambda self, *a, **k: base.step(self, *a, **k)})

    calls: dict[str, list[str]] = {}
    runs = {}
    for name, cls in (("torch", build(torch.optim.AdamW)), ("ours", build(mo.AdamW))):
        params = make_params((3, 1000), KERNEL_DEVICE)
        for p in params:
            p.grad = torch.ones_like(p)
        opt = cls(params, lr=1e-2)
        seen = calls[name] = []
        opt.register_step_pre_hook(lambda o, a, k, seen=seen: seen.append("pre") or (a, {**k, "closure": lambda: 7.0}))
        opt.register_step_post_hook(lambda o, a, k, seen=seen: seen.append(f"post:{k['closure']()}"))
        pre = torch_optimizer.register_optimizer_step_pre_hook(lambda o, a, k, seen=seen: seen.append("global pre"))
        post = torch_optimizer.register_optimizer_step_post_hook(lambda o, a, k, seen=seen: seen.append("global post"))
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                runs[name] = opt.step()
        finally:
            pre.remove()
            post.remove()
        events = [e.key for e in prof.key_averages() if e.key.startswith("Optimizer.step#")]
        assert events == [f"Optimizer.step#{cls.__name__}.step"], events
    assert calls["ours"] == ["global pre", "pre", "post:7.0", "global post"]
    assert runs["ours"] == 7.0  # the closure the pre hook put in
    if not subclass:
        assert calls["torch"] == calls["ours"] and runs["torch"] == runs["ours"]


@by_name
def test_signature_matches_torch(case):
    """torch's parameters, in torch's order, then mechgpu's keyword-only options."""
    ours = inspect.signature(getattr(mo, case.optimizer).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, case.optimizer).__init__).parameters
    assert list(ours) == list(theirs) + list(mo.MECHGPU_OPTIONS)
    for key in mo.MECHGPU_OPTIONS:
        assert ours[key].kind == inspect.Parameter.KEYWORD_ONLY
    for key in theirs:
        assert ours[key].kind == theirs[key].kind, key
        assert ours[key].default == theirs[key].default, key


@by_name
def test_constructor_validation_and_flags(case):
    p = make_params((3,), "cpu")
    cls = getattr(mo, case.optimizer)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        cls(p, lr=-1.0)
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        cls(p, differentiable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepted silently, no effect: drop-in for torch's code
        opt = cls(p, foreach=False)
        if case.torch_takes("fused"):
            cls(p, fused=True)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, getattr(torch.optim, case.optimizer))
    if case.torch_takes("betas"):
        with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.0"):
            cls(p, betas=(0.9, 1.0))
    if case.torch_takes("nesterov"):
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
            cls(p, nesterov=True)


@by_name
def test_repr_is_torchs_then_every_mechgpu_option(case):
    p = make_params((3,), "cpu")
    ours = getattr(mo, case.optimizer)(p, lr=0.01, max_grad_norm=0.5, telemetry=True)
    theirs = getattr(torch.optim, case.optimizer)(clone_params(p), lr=0.01)
    groups, options = repr(ours).split("mechgpu options\n")
    assert groups == repr(theirs).removesuffix(")") and groups.startswith(f"{case.optimizer} (\nParameter Group 0")
    lines = options.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:-1]] == list(mo.MECHGPU_OPTIONS) and lines[-1] == ")"
    assert {"    max_grad_norm: 0.5", "    telemetry: True", "    state_dtype: torch.float32"} <= set(lines)


@pytest.mark.parametrize("bias", [False, True])
def test_weight_decay_groups_train_as_torchs(bias):
    """Biases and norm weights undecayed; a bias-free Linear leaves the second group empty, as in
    transformers, and both optimizers step it."""
    torch.manual_seed(0)
    model = (torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)) if bias
             else torch.nn.Linear(8, 8, bias=False)).to(KERNEL_DEVICE)
    ref = copy.deepcopy(model)
    ours = mo.AdamW(mo.weight_decay_groups(model, 0.5), lr=0.1)
    theirs = torch.optim.AdamW(mo.weight_decay_groups(ref, 0.5), lr=0.1)
    assert [len(g["params"]) for g in ours.param_groups] == ([1, 3] if bias else [1, 0])
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        set_random_grads([list(model.parameters()), list(ref.parameters())], gen)
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# memory layout: unaligned views, permuted params
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("telemetry", [False, True])
@pytest.mark.parametrize("device", DEVICES)
@by_rule
def test_unaligned_and_permuted_params(case, device, telemetry):
    """Views at odd storage offsets (no 16-byte alignment) and transposed params stay correct; with
    telemetry too (the unaligned launch then updates each block in parts)."""
    base = torch.randn(5000, device=device)
    def params():
        return [
            torch.nn.Parameter(base[1:4098].clone()),       # aligned
            torch.nn.Parameter(base.clone()[1:4098]),       # storage offset 1: 4-byte aligned only
            torch.nn.Parameter(base.clone()[3:1003]),       # storage offset 3
            torch.nn.Parameter(base[:1200].clone().view(30, 40).t()),  # dense but not contiguous
        ]
    ours_p, ref_p = params(), params()
    assert ours_p[1].data_ptr() % 16 != 0 and not ours_p[3].is_contiguous()
    ours = getattr(mo, case.optimizer)(ours_p, lr=1e-2, telemetry=telemetry, **case.options)
    ref = getattr(torch.optim, case.optimizer)(ref_p, lr=1e-2, **case.options)
    gen = torch.Generator().manual_seed(8)
    for _ in range(4):
        for a, b in zip(ours_p, ref_p):
            g = torch.randn(a.shape, generator=gen).to(device)
            a.grad = torch.empty_like(a).copy_(g)  # same strides as the param
            b.grad = g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# bad input: a clear error, and nothing changes
# ----------------------------------------------------------------------------------
def _bad_inputs():
    def sparse(p):
        p.grad = torch.sparse_coo_tensor([[0]], [1.0], p.shape, device=p.device)

    def grad_dtype(p):
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.zeros(p.shape, dtype=torch.float64, device=p.device)

    def grad_shape(p):
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.zeros(p.numel() + 1, device=p.device)

    def grad_strides(p):
        p.data = torch.randn(6, 4, device=p.device)
        p.grad = torch.zeros(4, 6, device=p.device).t()

    def non_contiguous(p):
        p.data = torch.randn(10, 8, device=p.device)[:, ::2]
        p.grad = torch.zeros_like(p)

    return [
        (sparse, RuntimeError, "does not support sparse gradients"),
        (grad_dtype, RuntimeError, r"grad of param 1 of group 1 has dtype torch.float64, its param torch.float32"),
        (grad_shape, RuntimeError, r"grad of param 1 of group 1 has shape \(25,\), its param \(24,\)"),
        (grad_strides, RuntimeError, r"grad of param 1 of group 1 has stride \(1, 6\), its param \(4, 1\)"),
        (non_contiguous, RuntimeError, r"param 1 of group 1 is not contiguous"),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64], ids=str)
@by_name
def test_dtypes_the_kernel_does_not_take_step_with_torch(case, dtype, monkeypatch):
    """A float64 or complex group is stepped by torch.optim's own code (one warning), beside a
    float32 group on the kernel; both follow torch."""
    from mechgpu import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    ours_p = [make_params((100,), KERNEL_DEVICE, seed=3), make_params((5, 24), KERNEL_DEVICE, dtype, seed=4)]
    ref_p = [clone_params(group) for group in ours_p]
    ours = getattr(mo, case.optimizer)([{"params": g} for g in ours_p], lr=0.1, **case.options)
    ref = getattr(torch.optim, case.optimizer)([{"params": g} for g in ref_p], lr=0.1, **case.options)
    gen = torch.Generator().manual_seed(5)
    with pytest.warns(UserWarning, match="a dtype the kernels do not take") as caught:
        for _ in range(3):
            for mine, theirs in zip(ours_p, ref_p):
                set_random_grads([mine, theirs], gen)
            ours.step()
            ref.step()
    assert sum("mechgpu" in str(w.message) for w in caught) == 1
    for a, b in zip(ours_p[0], ref_p[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_p[1], ref_p[1]):
        assert a.dtype == dtype and torch.equal(a, b)


@by_name
@pytest.mark.parametrize("spoil,exc,message", _bad_inputs(), ids=lambda x: getattr(x, "__name__", ""))
def test_bad_input_raises_and_changes_nothing(case, spoil, exc, message):
    good = make_params((100, 7), KERNEL_DEVICE, seed=9)
    bad = make_params((5, 24), KERNEL_DEVICE, seed=10)
    opt = getattr(mo, case.optimizer)([{"params": good}, {"params": bad}], lr=0.1, **case.options)
    for p in good + bad:
        p.grad = torch.ones_like(p)
    opt.step()  # states exist; the next step must not touch them either
    before = [p.detach().clone() for p in good + bad]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in good + bad}
    for p in good + bad:
        p.grad = torch.ones_like(p)
    spoil(bad[1])
    if spoil.__name__ == "sparse":  # named as mechgpu's: torch's SGD and Adagrad do take sparse grads
        message = SPECS[case.optimizer].sparse_message
    with pytest.raises(exc, match=message):
        opt.step()
    for p, b in zip(good + [bad[0]], before[:2] + before[2:3]):
        assert torch.equal(p.detach(), b)
    for p in good + bad[:1]:
        for k, v in opt.state[p].items():
            assert torch.equal(v, states[id(p)][k]), k


def test_params_on_different_devices_in_one_group():
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(4, device="meta"))
    a.grad, b.grad = torch.ones(4), torch.ones(4, device="meta")
    opt = mo.Adam([a, b])
    before = a.detach().clone()
    message = "all params of a group must be on one device; param 1 of group 0 is on meta"
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert torch.equal(a.detach(), before) and len(opt.state) == 0


# ----------------------------------------------------------------------------------
# two launches per (group, dtype), whatever the number of tensors
# ----------------------------------------------------------------------------------
@by_rule
def test_launches_per_step_do_not_grow_with_tensors(case, monkeypatch):
    launches = count_launches(monkeypatch)
    counts = {}
    for n_tensors in (3, 40):
        fp32 = make_params([5 + i for i in range(n_tensors)], KERNEL_DEVICE)
        bf16 = make_params([5 + i for i in range(n_tensors)], KERNEL_DEVICE, torch.bfloat16)
        last = make_params((9,), KERNEL_DEVICE)
        opt = getattr(mo, case.optimizer)([{"params": fp32 + bf16}, {"params": last}], lr=case.lr, **case.options)
        gen = torch.Generator().manual_seed(11)
        for _ in range(3):
            set_random_grads([[p for g in opt.param_groups for p in g["params"]]], gen)
            before = launches()
            opt.step()
        counts[n_tensors] = launches() - before
    # two launches (the per-tensor prologue, the update) per bucket; group 0 holds fp32 and bf16
    # params: two buckets; group 1: one
    assert counts == {3: 6, 40: 6}


# ----------------------------------------------------------------------------------
# the CPU fallback (no interpreter): torch's own step, with a one-time warning
# ----------------------------------------------------------------------------------
def test_cpu_fallback_without_interpreter_warns_once_and_matches_torch():
    script = r"""
import warnings, torch
import mechgpu.optim as mo
from mechgpu import _backend
assert not _backend.INTERPRETED
a = [torch.randn(50, requires_grad=True) for _ in range(2)]
b = [p.detach().clone().requires_grad_() for p in a]
ours, ref = mo.AdamW(a, lr=0.1), torch.optim.AdamW(b, lr=0.1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(50); x.grad = g.clone(); y.grad = g.clone()
        ours.step(); ref.step()
msgs = [str(w.message) for w in caught if "mechgpu" in str(w.message)]
assert len(msgs) == 1 and "falls back" not in msgs[0] and "torch.optim.AdamW's own implementation" in msgs[0], msgs
assert all(torch.equal(x, y) for x, y in zip(a, b))
print("ok")
"""
    out = run_without_interpreter(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------------
# GPU only: no host sync in step(), no recompilation for a new lr
# ----------------------------------------------------------------------------------
@gpu
@requires_cuda
@by_rule
def test_step_never_syncs_and_new_lr_never_recompiles(case):
    from mechgpu.kernels import optim as kernels
    from mechgpu.kernels._launch import compiled_variants

    params = make_params((1000, 4097), "cuda")
    opt = getattr(mo, case.optimizer)(params, lr=1e-3, **case.options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()  # first steps may upload tables
    kernel = kernels.optimizer_kernel

    compiled = compiled_variants(kernel)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lr in (1e-3, 2e-3, 5e-4):
            opt.param_groups[0]["lr"] = lr
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert compiled >= 1 and compiled_variants(kernel) == compiled


def test_cached_tables_follow_moved_params_and_grads():
    """The per-group table cache notices a param or grad whose storage was swapped in place."""
    ours_p = make_params((1000, 33), KERNEL_DEVICE)
    ref_p = clone_params(ours_p)
    ours, ref = mo.Adam(ours_p, lr=1e-2), torch.optim.Adam(ref_p, lr=1e-2)
    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE) for p in ours_p]
    for a, b, g in zip(ours_p, ref_p, grads):
        a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    for a, b in zip(ours_p, ref_p):  # new storage under the same param objects
        a.data = a.data.clone()
        b.data = b.data.clone()
        a.grad.data = torch.randn(a.shape, generator=gen).to(KERNEL_DEVICE)  # same grad object, new storage
        b.grad.copy_(a.grad)
    ours.step()
    ref.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    ours_p[1].grad.data = torch.zeros(34, device=KERNEL_DEVICE)  # same object, wrong shape: still caught
    with pytest.raises(RuntimeError, match=r"grad of param 1 of group 0 has shape \(34,\)"):
        ours.step()


@pytest.mark.parametrize("device", DEVICES)
@by_rule
def test_update_norm_from_the_kernel(case, device):
    """track_update_norm: ||p_after - p_before|| over all groups, summed inside the kernel."""
    cls = getattr(mo, case.optimizer)
    params = make_params((1, 1000, 4097), device)
    opt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], lr=1e-2, track_update_norm=True,
              **case.options)
    gen = torch.Generator().manual_seed(13)
    for _ in range(3):
        set_random_grads([params], gen)
        before = [p.detach().clone() for p in params]
        opt.step()
        expected = torch.linalg.vector_norm(torch.cat([(p.detach() - b).double().flatten()
                                                       for p, b in zip(params, before)]))
        assert expected > 0
        torch.testing.assert_close(opt.last_update_norm.double().cpu(), expected.cpu(), rtol=1e-5, atol=0)
    assert cls(params, lr=0.1, **case.options).last_update_norm is None


@pytest.mark.skipif(HAS_CUDA, reason="counts atomics in triton's interpreter, which a GPU host does not use")
@pytest.mark.parametrize("options", [{}, {"track_update_norm": True}, {"max_grad_norm": 1.0},
                                     {"track_update_norm": True, "max_grad_norm": 1.0}], ids=str)
def test_atomics_per_step_do_not_grow_with_elements(options, monkeypatch):
    """Two-stage reductions: the update kernel takes no atomics, but one per program for the update
    norm (its last program combines the partials), and the clip norm one per program; programs are
    _launch.CPU_PROGRAMS here, for 3 blocks or 60."""
    from mechgpu.kernels import _launch

    atomics = count_atomics(monkeypatch)
    counts = {}
    for sizes in ((1, 700), (5000, 20_000, 1, 4097, 70_001, 3)):
        params = make_params(sizes, KERNEL_DEVICE)
        opt = mo.AdamW(params, lr=1e-2, **options)
        gen = torch.Generator().manual_seed(2)
        set_random_grads([params], gen)
        opt.step()
        set_random_grads([params], gen)
        before = [p.detach().clone() for p in params]
        start = atomics()
        opt.step()
        counts[len(sizes)] = atomics() - start
        if "track_update_norm" in options:
            expected = torch.linalg.vector_norm(torch.cat([(p.detach() - b).double().flatten()
                                                           for p, b in zip(params, before)]))
            torch.testing.assert_close(opt.last_update_norm.double(), expected, rtol=1e-5, atol=0)
    per_step = _launch.CPU_PROGRAMS * (("track_update_norm" in options) + ("max_grad_norm" in options))
    assert counts == {2: per_step, 6: per_step}


@pytest.mark.skipif(HAS_CUDA, reason="sets the interpreter's program count, which a GPU host does not use")
def test_more_programs_than_one_partials_read(monkeypatch):
    """1,100 programs, over one PARTIALS_WIDTH read of the update-norm and clip partials: the same
    params, norms and update norm as torch."""
    from mechgpu.kernels import _launch

    monkeypatch.setattr(_launch, "CPU_PROGRAMS", 1100)
    sizes = [1 + i % 7 for i in range(1100)]
    ours = make_params(sizes, KERNEL_DEVICE, seed=4)
    ref = clone_params(ours)
    opt = mo.AdamW(ours, lr=1e-2, max_grad_norm=0.5, track_update_norm=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        set_random_grads([ours, ref], gen)
        before = [p.detach().clone() for p in ours]
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
        expected = torch.linalg.vector_norm(torch.cat([(p.detach() - b).double().flatten()
                                                       for p, b in zip(ours, before)]))
        torch.testing.assert_close(opt.last_update_norm.double(), expected, rtol=1e-5, atol=0)
    assert opt._group_caches[0].buckets[0].plan.grid == 1100
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_table_rows_are_built_by_column_name():
    """Each kernel module declares its table once; a row names its columns, so a new column cannot shift the rest."""
    from mechgpu.kernels import optim as kernels

    row = kernels.table_row(param=16, grad=32, states=[48, 64], step=8, numel=5, master=80)
    assert row == [16, 32, 48, 64, 0, 8, 5, 80, 0, 0, 0] and len(row) == kernels.TABLE.width
    assert kernels.row_is_aligned(row)
    # 8-bit states' block maxima, one column per state, streamed too
    quantized = kernels.table_row(param=16, grad=32, states=[48, 64], step=8, numel=5, absmax=[96, 112])
    assert quantized[kernels.TABLE.index("absmax0"):] == [96, 112, 0] and kernels.row_is_aligned(quantized)
    assert not kernels.row_is_aligned(kernels.table_row(param=16, grad=32, states=[48], step=8, numel=5,
                                                        absmax=[100]))
    assert not kernels.row_is_aligned(kernels.table_row(param=16, grad=32, states=[52], step=8, numel=5))
    # the step counter is not streamed, so its alignment does not matter
    assert kernels.row_is_aligned(kernels.table_row(param=16, grad=32, states=[], step=4, numel=5))
    with pytest.raises(KeyError, match="no column"):
        kernels.TABLE.row(parm=1)
    with pytest.raises(ValueError, match="at most 3 state columns"):
        kernels.table_row(param=0, grad=0, states=[0, 0, 0, 0], step=0, numel=0)
