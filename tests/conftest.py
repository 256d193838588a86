"""Run the real Triton kernels on CPU tensors when no CUDA device is present.

TRITON_INTERPRET must be set before triton is imported, so this runs first.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A test that runs for a minute or more starts first: over pytest-xdist's workers the long ones
# then overlap with the rest, instead of one worker running a three-minute test alone at the end.
long = pytest.mark.long


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the rest keep their order


# Tests parametrised over DEVICES run the kernels on CPU tensors in the interpreter where
# there is no GPU, and on CUDA tensors where there is one. (With a GPU, triton compiles
# for it, and CPU params would take torch's own fallback instead of the kernels.)
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is present")
on_cpu = pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: the kernels are tested on it instead")
DEVICES = [pytest.param("cpu", marks=on_cpu), pytest.param("cuda", marks=[gpu, requires_cuda])]
#: where the kernels run in this session, for tests that need one device
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


class Recorder(torch.optim.SGD):
    """lr=0 SGD that keeps a copy of the grads of every step."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def count_launches(monkeypatch):
    """A function giving the number of triton kernel launches since this call: each is a call of
    the interpreter's GridExecutor on CPU, of JITFunction.run (``kernel[grid](...)``, not a
    warmup) on a GPU."""
    if HAS_CUDA:
        from triton.runtime.jit import JITFunction as cls
        name = "run"
    else:
        from triton.runtime.interpreter import GridExecutor as cls
        name = "__call__"
    calls = []
    original = getattr(cls, name)

    def counting(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counting)
    return lambda: len(calls)


def count_atomics(monkeypatch):
    """A function giving the number of atomic operations (active lanes of every atomic rmw or cas)
    that interpreted kernels have issued since this call. Interpreter only."""
    from triton.runtime.interpreter import InterpreterBuilder

    lanes = []
    rmw, cas = InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas

    def counting_rmw(builder, op, ptr, val, mask, *args, **kwargs):
        lanes.append(int(mask.data.sum()))
        return rmw(builder, op, ptr, val, mask, *args, **kwargs)

    def counting_cas(builder, ptr, *args, **kwargs):
        lanes.append(int(ptr.data.size))
        return cas(builder, ptr, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_atomic_rmw", counting_rmw)
    monkeypatch.setattr(InterpreterBuilder, "create_atomic_cas", counting_cas)
    return lambda: sum(lanes)


def run_without_interpreter(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c script`` in a fresh process without TRITON_INTERPRET (CPU tensors there take
    torch's fallback, and triton compiles instead of interpreting); its output captured as text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


def spawn_interpreted(fn, args: tuple, nprocs: int, timeout_s: float) -> str | None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes with the kernels in triton's
    interpreter; None when all finished, else why not (a timeout, or a rank's exception).
    Ranks still alive at the end are terminated."""
    import torch.multiprocessing as mp

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned children
        ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                return f"timed out after {timeout_s} s (a rank hung in a collective?)"
    except Exception as exc:  # ProcessRaisedException / ProcessExitedException
        return f"{type(exc).__name__}: {exc}"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    return None
