"""The whole step, clip-in-step included, captured in a CUDA graph and replayed (GPU only).

The captured step is compared with mechgpu's own eager steps, so every optimizer is captured,
Adagrad too (torch's own Adagrad cannot be: it has no ``capturable``).
"""

import pytest
import torch
from conftest import gpu, requires_cuda
from mechgpu.kernels.optim_spec import SPECS

import mechgpu.optim as mo
from mechgpu.testing.optim_cases import FEATURED

#: every featured case with fp32 states, and with 8-bit ones where its options allow them (the
#: 4,097-element param below gets 8-bit codes and block maxima, at addresses fixed after warm-up)
CAPTURED = [(c, torch.float32) for c in FEATURED] + [(c, "8bit") for c in FEATURED
                                                           if SPECS[c.optimizer].takes_8bit(c.options)]


@gpu
@requires_cuda
@pytest.mark.parametrize(("case", "state_dtype"), CAPTURED, ids=lambda v: getattr(v, "optimizer", str(v)))
def test_captured_step_with_clip_and_tensor_lr_scheduler(case, state_dtype):
    torch.manual_seed(0)
    sizes = (1000, 4097, 3)
    params = [torch.randn(n, device="cuda", requires_grad=True) for n in sizes]
    ref = [p.detach().clone().requires_grad_() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)  # static grads the graph reads
    # torch's capturable (its step counter on the device), where torch's twin has one
    kwargs = {**case.options, **({"capturable": True} if case.torch_takes("capturable") else {})}
    lr = torch.tensor(0.05, device="cuda")
    kwargs["state_dtype"] = state_dtype
    opt = getattr(mo, case.optimizer)(params, lr=lr, max_grad_norm=1.0, **kwargs)
    ref_opt = getattr(mo, case.optimizer)(ref, lr=torch.tensor(0.05, device="cuda"), max_grad_norm=1.0, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    grads = [[torch.randn(n, device="cuda") for n in sizes] for _ in range(9)]

    def eager_step(i):
        for r, g in zip(ref, grads[i]):
            r.grad = g.clone()
        ref_opt.step()
        ref_sched.step()

    # warm up on a side stream (tables uploaded, kernels compiled), then capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            for p, g in zip(params, grads[i]):
                p.grad.copy_(g)
            opt.step()
            sched.step()
            eager_step(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(3, 9):
        for p, g in zip(params, grads[i]):
            p.grad.copy_(g)
        graph.replay()
        sched.step()  # writes the tensor lr in place: the replayed kernel reads it
        eager_step(i)
    torch.cuda.synchronize()
    assert lr.item() == pytest.approx(0.05 * 0.5 ** 4)
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.last_grad_norm, ref_opt.last_grad_norm)


@gpu
@requires_cuda
def test_captured_step_of_a_large_list():
    """The recommended path beyond about 1,000 tensors: the whole step (clip included) captured once
    and replayed. Its contract: the params, grads and states keep their addresses (grads are
    refilled in place, never replaced; nothing is reallocated) while the graph is in use. A replay
    reads the tables the warm-up uploaded: no host work per tensor, no upload during capture."""
    torch.manual_seed(0)
    sizes = [1 + (i * 37) % 700 for i in range(1500)]
    params = [torch.randn(n, device="cuda", requires_grad=True) for n in sizes]
    ref = [p.detach().clone().requires_grad_() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = mo.AdamW(params, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    ref_opt = mo.AdamW(ref, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
    grads = [[torch.randn(n, device="cuda") for n in sizes] for _ in range(6)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            for p, r, g in zip(params, ref, grads[i]):
                p.grad.copy_(g)
                r.grad = g.clone()
            opt.step()
            ref_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    plans = [b.plan for c in opt._group_caches.values() for b in c.buckets]
    uploads = sum(p.uploads for p in plans)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    assert sum(p.uploads for p in plans) == uploads
    for i in range(2, 6):
        for p, r, g in zip(params, ref, grads[i]):
            p.grad.copy_(g)
            r.grad = g.clone()
        graph.replay()
        ref_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
