"""The optimizers' host path: both confirmations, and the bound triton launch.

A step confirms every address its launches dereference, in Python or through the compiled
extension (mechgpu/optim/_host.cpp, built once into torch's extension folder). Both must give
torch's result or torch's error under every mutation, so the safety suite's cases run here on
each path, forced, in child processes; with the compiled path the child also checks that the
extension confirmed steps (a mutation case that never reached it would prove nothing). The new
mechanism's own weak points get cases of their own: dicts changed behind any hook
(``dict.__setitem__``, ``optimizer.state`` replaced wholesale), storages resized under unchanged
dicts, ``torch.utils.swap_tensors``.

The bound launch (kernels/_launch.Bound) is checked in a compile-only process (tests/_compile_only.py):
it must hand the compiled kernel's launcher exactly what triton's own launch path hands it.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from test_optim_safety import LEGAL_CASES, REJECTED_CASES, Pair, isolated, run_legal, run_rejected

from mechgpu.optim import _fused, _host

PATHS = ("python", "compiled")


def one_per_mutation(cases: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each mutation with its first configuration: the safety suite runs them all, on the path the
    machine has; here each runs on both paths."""
    return list({m: (m, c) for m, c in reversed(cases)}.values())[::-1]


LEGAL_ONE, REJECTED_ONE = one_per_mutation(LEGAL_CASES), one_per_mutation(REJECTED_CASES)
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def built():
    """The compiled extension, built once on this machine (10-20 s the first time, then cached)."""
    if not _host.library().exists():
        _host.build()
    return _host.library()


def on_path(path: str, fn, *args):
    """In the child: ``fn(*args)`` with every step confirmed on ``path``; the compiled path must
    have confirmed at least one step, the Python path none."""
    if path == "compiled":
        _host.loader.module, _host.loader.failed = _host.load(), None
    else:
        _host.loader.module, _host.loader.failed = None, "forced off by the test"
    confirmed = []
    fast = _fused._GroupCache.confirm_fast

    def counted(self, *a):
        ok = fast(self, *a)
        confirmed.append(ok)
        return ok

    _fused._GroupCache.confirm_fast = counted
    result = fn(*args)
    assert any(confirmed) == (path == "compiled"), f"{path}: {len(confirmed)} compiled confirmations tried, " \
                                                    f"{sum(confirmed)} accepted"
    return result


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mutation,config", LEGAL_ONE, ids=[f"{m}-{c}" for m, c in LEGAL_ONE])
def test_legal_mutation_on_each_path(path, mutation, config, built):
    assert isolated(on_path, path, run_legal, mutation, config) == "ok"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mutation,config", REJECTED_ONE, ids=[f"{m}-{c}" for m, c in REJECTED_ONE])
def test_rejected_mutation_on_each_path(path, mutation, config, built):
    assert isolated(on_path, path, run_rejected, mutation, config) == "ok"


# ----------------------------------------------------------------------------------
# mutations aimed at the compiled record: each must give torch's result
# ----------------------------------------------------------------------------------
def _entry(opt, p):
    return next(k for k in opt.state[p] if k != "step")


def entry_set_behind_the_dict(opt, params):
    """A state tensor replaced with dict.__setitem__, which no dict subclass's hook would see."""
    for p in params:
        key = _entry(opt, p)
        dict.__setitem__(opt.state[p], key, torch.full_like(opt.state[p][key], 0.125))


def dict_set_behind_the_state(opt, params):
    """A param's whole state dict replaced behind ``optimizer.state``'s back, by copies."""
    for p in params[::2]:
        dict.__setitem__(opt.state, p, {k: v.clone() for k, v in opt.state[p].items()})


def state_replaced_wholesale(opt, params):
    opt.state = defaultdict(dict, {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def state_storage_resized(opt, params):
    """Each state tensor's storage freed and reallocated under an unchanged dict (as FSDP does with
    params), then refilled."""
    for p in params:
        for key, t in opt.state[p].items():
            if key != "step":
                nbytes = t.untyped_storage().nbytes()
                t.untyped_storage().resize_(0)
                t.untyped_storage().resize_(nbytes)
                t.fill_(0.25)


def param_storage_resized(opt, params):
    for p in params:
        values = p.detach().clone()
        nbytes = p.untyped_storage().nbytes()
        p.untyped_storage().resize_(0)
        p.untyped_storage().resize_(nbytes)
        p.detach().copy_(values)


def states_swapped(opt, params):
    """``torch.utils.swap_tensors`` on every state tensor: same Python objects, other memory."""
    for p in params:
        for key, t in opt.state[p].items():
            if key != "step":
                torch.utils.swap_tensors(t, torch.full_like(t, 0.5))


def params_swapped(opt, params):
    for p in params:
        torch.utils.swap_tensors(p, (p.detach() * 0.5).requires_grad_())


MUTATIONS = {f.__name__: f for f in (entry_set_behind_the_dict, dict_set_behind_the_state, state_replaced_wholesale,
                                     state_storage_resized, param_storage_resized, states_swapped, params_swapped)}
TARGETED = [(m, c) for m in MUTATIONS for c in ("AdamW", "SGD-momentum")]


def run_targeted(mutation: str, config: str) -> str:
    pair = Pair(config)
    pair.step(2)  # built, then confirmed: the compiled record is in use
    pair.both(MUTATIONS[mutation])
    pair.step(3)
    pair.assert_close()
    return "ok"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mutation,config", TARGETED, ids=[f"{m}-{c}" for m, c in TARGETED])
def test_mutation_of_the_compiled_record_matches_torch(path, mutation, config, built):
    assert isolated(on_path, path, run_targeted, mutation, config) == "ok"


def test_pickles_stay_loadable_by_torch():
    """The compiled record lives in the optimizer's caches: a pickled state_dict and a pickled
    optimizer hold only what torch's do (its state is still torch's defaultdict of dicts)."""
    pair = Pair("AdamW")
    pair.step(3)
    assert type(pair.ours.state) is defaultdict and all(type(s) is dict for s in pair.ours.state.values())
    blob = pickle.dumps(pair.ours.state_dict())
    ref = torch.optim.AdamW(pair._groups([p.detach().clone().requires_grad_() for p in pair.ours_p]), lr=pair.lr)
    ref.load_state_dict(pickle.loads(blob))
    assert set(ref.state_dict()["state"]) == set(pair.ours.state_dict()["state"])


# ----------------------------------------------------------------------------------
# the bound launch hands triton's launcher what triton's own launch hands it
# ----------------------------------------------------------------------------------
BOUND_LAUNCH = """
import json, sys
sys.path.insert(0, {tests!r})
import _compile_only
from triton.runtime.jit import JITFunction
JITFunction.run = _compile_only._run  # triton's own launch path, which calls the (no-op) launcher
import torch
import mechgpu.optim as mo

from triton.compiler.compiler import CompiledKernel

calls, runs = [], []
KERNELS = ("step_prologue_kernel", "optimizer_kernel", "grad_norm_kernel")


def recording_launcher(self):  # each compiled kernel's launcher records its arguments
    if self._run is None:
        self.function = 0
        name = self.name
        self._run = (lambda *args: calls.append((name, *args))) if name in KERNELS else (lambda *args: None)


CompiledKernel._init_handles = recording_launcher
_run = JITFunction.run
JITFunction.run = lambda self, *a, **k: (runs.append(self.__name__), _run(self, *a, **k))[1]

def shown(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", value.data_ptr(), str(value.dtype)]
    return [type(value).__name__, value if isinstance(value, (int, float, bool, str)) or value is None else repr(value)]

params = [torch.randn(n, requires_grad=True) for n in (1000, 4097, 3)]
for p in params:
    p.grad = torch.randn_like(p)
opt = mo.{name}(params, lr=1e-3, **{options!r})
steps = []
for lr in (1e-3, 1e-3, 1e-3, 2e-3):  # triton's launches, then the bound ones with the same and a new lr
    opt.param_groups[0]["lr"] = lr
    calls.clear(); runs.clear()
    opt.step()
    steps.append({{"runs": list(runs), "calls": [[*args[:5], *map(shown, args[10:])] for args in calls]}})
print(json.dumps(steps))
"""


@pytest.mark.parametrize("name,options", [("AdamW", {}), ("SGD", {"momentum": 0.9}),
                                          ("Adam", {"amsgrad": True, "max_grad_norm": 1.0})])
def test_bound_launch_passes_what_triton_passes(name, options):
    """Each kernel's bound launch (from the second step on) hands the launcher what triton's own
    launch of it (the first step's) handed: grid, stream, function and every argument."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = BOUND_LAUNCH.format(tests=TESTS, name=name, options=options)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = {"step_prologue_kernel", "optimizer_kernel"}
    if "max_grad_norm" in options:
        kernels.add("grad_norm_kernel")
    assert {call[0] for s in steps for call in s["calls"]} == kernels
    assert kernels <= set(steps[0]["runs"]), steps[0]["runs"]  # triton's own launch, which binds
    assert not any(s["runs"] for s in steps[1:]), [s["runs"] for s in steps]

    for kernel in kernels:
        calls = [[c[1:] for c in s["calls"] if c[0] == kernel] for s in steps]
        assert calls[0] and calls[0] == calls[1] == calls[2], kernel
    same, new_lr = steps[2], steps[3]
    changed = [(a, b) for call_a, call_b in zip(same["calls"], new_lr["calls"]) for a, b in zip(call_a, call_b)
               if a != b]
    assert changed and all(a[0] == b[0] == "float" for a, b in changed), changed  # only the lr-derived floats
    assert [a[1] for a, _ in changed] == [1e-3] * len(changed) and [b[1] for _, b in changed] == [2e-3] * len(changed)


CAPTURE_PROXY = """
import json, sys
sys.path.insert(0, {tests!r})
import _compile_only
import torch
import mechgpu.optim as mo

streams = []
_compile_only._launch_nothing = lambda *args: streams.append(args[3])
stream = [0]
_compile_only.CompileOnlyDriver.get_current_stream = lambda self, device=None: stream[0]
params = [torch.randn(n, requires_grad=True) for n in (1000, 4097, 3) * 400]
for p in params:
    p.grad = torch.zeros_like(p)  # static grads, as a captured step reads
opt = mo.AdamW(params, lr=1e-3, max_grad_norm=1.0)
opt.step()  # one warm-up step, as capture needs
plans = [b.plan for c in opt._group_caches.values() for b in c.buckets] + [opt._norm_over_caches.plan]
uploads = sum(p.uploads for p in plans)
streams.clear()
stream[0] = 12345  # as torch.cuda.graph makes its capture stream current
for p in params:
    p.grad.copy_(torch.randn_like(p))
opt.step()
print(json.dumps({{"uploads": sum(p.uploads for p in plans) - uploads, "streams": streams}}))
"""


def test_steady_step_with_static_grads_uploads_nothing_and_follows_the_stream():
    """What capture needs, checked on CPU (compile-only): with static grads a step after one warm-up
    step copies nothing to the device (the clip norm's table included) and launches on the current
    stream. What only a GPU can show (the
    capture itself, replay, the addresses staying valid) is tests/test_cuda_graphs.py's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CAPTURE_PROXY.format(tests=TESTS)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["uploads"] == 0
    assert result["streams"] and set(result["streams"]) == {12345}, result


def test_extension_loads_in_a_fresh_process(built):
    """Once built, a new process loads the extension on its first step (no compiler runs)."""
    script = ("import torch, mechgpu.optim as mo\nfrom mechgpu.optim import _host\n"
              "p = torch.randn(5, requires_grad=True); p.grad = torch.randn(5)\n"
              "mo.AdamW([p]).step()\nprint(_host.loader.module is not None, _host.loader.failed)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1", "MECHGPU_HOST_EXTENSION": "auto"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split() == ["True", "None"], out.stdout
