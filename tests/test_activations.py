"""mechgpu.nn activations against torch's own ops: values, gradients, saved bytes, in place, compile.

On CPU the real Triton kernels run in triton's interpreter (see conftest.py).

The float64 oracles, their conditioning and the per-dtype tolerances are the case
database's (``mechgpu.testing.activation_cases``: ``ACTIVATIONS``, ``activation_ulps``, whose docstring
gives the rules); its dense value sweeps and special values run in tests/test_cases.py.
Here: layouts and shapes, masked-off gradients, every element written, saved bytes, in
place, modules, torch.compile. NaN and ±inf must match exactly, and so must the sign of a
zero forward result.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, KERNEL_DEVICE, count_launches, gpu, requires_cuda, run_without_interpreter
from mechgpu.kernels import _launch
from mechgpu.kernels import activation as kernels

import mechgpu.nn as mnn
from mechgpu.nn import functional as MF
from mechgpu.testing import activation_cases, compare

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POISON = -7777.0  # no activation or gradient here produces it

# interpreter numpy warnings (overflow in exp of a huge argument, inf * 0) are expected
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------------
# the activations: float64 oracles, conditioning and tolerances from the case database
# (mechgpu.testing, whose full value sweeps tests/test_cases.py runs)
# ----------------------------------------------------------------------------------
@dataclass
class Act:
    name: str
    kind: str  # the kernel's kind
    ours: Callable  # (x) -> y through mechgpu.nn.functional
    torch_fn: Callable  # torch's own op, any dtype
    oracle: activation_cases.Activation  # the database's float64 oracles and conditioning
    slope: float = 0.0

    @property
    def forward64(self):
        return self.oracle.forward64

    @property
    def backward64(self):
        return self.oracle.backward64

    def __repr__(self):
        return self.name


DB = {a.name: a for a in activation_cases.ACTIVATIONS}


def _leaky(slope):
    """leaky_relu with its own slope: torch's op in float64 is the oracle."""
    oracle = activation_cases.Activation(f"leaky_relu({slope})", lambda mf, x: mf.leaky_relu(x, slope),
                              lambda x: F.leaky_relu(x, slope),
                              lambda g, x, y: torch.ops.aten.leaky_relu_backward(g, x, slope, False))
    return Act(oracle.name, "leaky_relu", lambda x: MF.leaky_relu(x, slope), lambda x: F.leaky_relu(x, slope),
               oracle, slope=slope)


ACTS = [
    Act("sigmoid", "sigmoid", MF.sigmoid, torch.sigmoid, DB["sigmoid"]),
    Act("tanh", "tanh", MF.tanh, torch.tanh, DB["tanh"]),
    Act("relu", "relu", MF.relu, F.relu, DB["relu"]),
    _leaky(activation_cases.LEAKY_SLOPE),
    _leaky(-0.3),
    Act("gelu", "gelu", MF.gelu, F.gelu, DB["gelu"]),
    Act("gelu_tanh", "gelu_tanh", lambda x: MF.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"),
        DB["gelu_tanh"]),
    Act("silu", "silu", MF.silu, F.silu, DB["silu"]),
]
BY_NAME = {a.name: a for a in ACTS}


# ----------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------
def ulp(value64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at |value64| (subnormal spacing below tiny)."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(value64.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent) * info.eps


def assert_matches(actual, expected, dtype, ulps, what, inputs=None, oracle=None, check_zero_sign=False):
    """``actual`` (in ``dtype``) against the float64 ``expected``, within ``ulps``.

    With ``oracle`` (inputs -> float64), the change of the oracle when the input moves by
    one fp32 ulp is allowed on top. NaN, ±inf (of expected rounded to dtype) and, with
    ``check_zero_sign``, the sign of zeros must match exactly.
    """
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    got = actual.detach().double().cpu().reshape(-1)
    exp = expected.detach().double().cpu().reshape(-1)
    assert got.shape == exp.shape
    rounded = exp.to(dtype).double()
    nan = exp.isnan()
    bad = torch.nonzero(got.isnan() != nan).flatten()
    assert not len(bad), f"{what}: NaN where torch has none or the reverse, first at {bad[0].item()}: " \
                         f"got {got[bad[0]].item()}, expected {exp[bad[0]].item()}"
    inf = rounded.isinf()
    bad = torch.nonzero(inf & (got != rounded) | ~inf & ~nan & got.isinf()).flatten()
    assert not len(bad), f"{what}: infinity mismatch at {bad[0].item()}: got {got[bad[0]].item()}, " \
                         f"expected {exp[bad[0]].item()}"
    if check_zero_sign:
        zero = (got == 0) & (rounded == 0)
        bad = torch.nonzero(zero & (torch.signbit(got) != torch.signbit(rounded))).flatten()
        assert not len(bad), f"{what}: sign of zero differs at {bad[0].item()}: got {got[bad[0]].item()}, " \
                             f"expected {rounded[bad[0]].item()}"
    finite = ~nan & ~inf
    tol = ulps * ulp(exp, dtype) + compare.ACTIVATION_ABS_FLOOR
    if oracle is not None:
        x = inputs.detach().double().cpu().reshape(-1)
        for sign in (1.0, -1.0):
            moved = oracle(x * (1 + sign * compare.FP32_ULP)).reshape(-1)
            tol = tol + torch.nan_to_num((moved - exp).abs(), nan=0.0, posinf=0.0)
    err = torch.where(finite, (got - exp).abs() / tol, torch.zeros_like(got))
    if err.numel() and err.max() > 1:
        i = err.argmax().item()
        at = f" (input {inputs.detach().reshape(-1)[i].item()!r})" if inputs is not None else ""
        raise AssertionError(f"{what}: element {i}{at}: got {got[i].item()!r}, expected {exp[i].item()!r}, "
                             f"{(got[i] - exp[i]).abs().item() / ulp(exp[i], dtype).item():.2f} ulp; "
                             f"{int((err > 1).sum())} of {err.numel()} outside {ulps} ulp")


def check_forward(act, x, y):
    x64 = x.detach().double()
    dtype = x.dtype
    assert_matches(y, act.forward64(x64), dtype, activation_cases.activation_ulps(act.oracle, dtype, "forward"),
                   f"{act.name} forward {dtype}", inputs=x,
                   oracle=act.forward64 if act.oracle.ill_conditioned_forward else None, check_zero_sign=True)


def check_backward(act, x, y, g, dx):
    x64, y64, g64 = x.detach().double(), y.detach().double(), g.detach().double()
    dtype = x.dtype
    ulps = activation_cases.activation_ulps(act.oracle, dtype, "backward")
    oracle = (lambda xm: act.backward64(g64.reshape(-1), xm, None)) if act.oracle.ill_conditioned_backward else None
    assert_matches(dx, act.backward64(g64, x64, y64), dtype, ulps, f"{act.name} backward {dtype}",
                   inputs=x, oracle=oracle)


def forward_backward(act, x, g):
    """y = act(x) and dx for the upstream g, through mechgpu.nn.functional and autograd."""
    x = x.detach().requires_grad_()
    y = act.ours(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return x, y, dx


def make_input(shape, dtype, device, layout="contiguous", scale=3.0, seed=0):
    """Random N(0, scale^2) values; "transposed" and "strided" give non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return (torch.randn(shape[::-1], generator=gen) * scale).to(device=device, dtype=dtype).t()
    if layout == "strided":
        return (torch.randn(shape[0], 2 * shape[1], generator=gen) * scale).to(device=device, dtype=dtype)[:, ::2]
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------
# values and gradients against torch
# ----------------------------------------------------------------------------------
SHAPES = [((), "contiguous"), ((1,), "contiguous"), ((0, 3), "contiguous"), ((7, 13), "contiguous"),
          ((3, 1000), "contiguous"), ((29, 37), "transposed"), ((30, 33), "strided")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=repr)
def test_matches_torch(act, dtype, shape, layout, device):
    x = make_input(shape, dtype, device, layout)
    assert layout == "contiguous" or not x.is_contiguous()
    g = make_input(shape, dtype, device, seed=1, scale=1.0)
    x, y, dx = forward_backward(act, x, g)
    assert y.shape == x.shape and dx.shape == x.shape and dx.dtype == dtype
    check_forward(act, x, y)
    check_backward(act, x, y, g, dx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["relu", "leaky_relu(0.01)"])
def test_masked_off_gradients_follow_torch(name, device):
    """relu passes no gradient at all where it is flat (a NaN or inf gradient there gives 0,
    as torch's threshold_backward does); leaky_relu multiplies it by the slope."""
    act = BY_NAME[name]
    x = torch.tensor([-1.0, -2.0, 3.0, math.nan, -0.0, 5.0], device=device)
    g = torch.tensor([math.nan, math.inf, math.nan, 2.0, -math.inf, 1.0], device=device)
    x, y, dx = forward_backward(act, x, g)
    xr = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(act.torch_fn(xr), xr, g)
    assert torch.equal(dx.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(dx), torch.nan_to_num(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTS, ids=repr)
def test_expanded_upstream_gradient(act, device):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    x = make_input((5, 300), torch.float32, device).requires_grad_()
    y = act.ours(x)
    y.sum().backward()
    check_backward(act, x, y, torch.ones_like(y), x.grad)


def test_oracles_agree_with_torch_float64():
    """Our float64 gelu oracles equal torch's float64 ops wherever those are accurate, and at
    every special value; below x = -8 torch's own float64 cancels to 0 and ours does not."""
    x = torch.cat([torch.linspace(-3, 20, 2001, dtype=torch.float64), activation_cases.special_values(torch.float32)])
    g = torch.linspace(-2, 2, x.numel(), dtype=torch.float64)
    for act, approximate in ((BY_NAME["gelu"], "none"), (BY_NAME["gelu_tanh"], "tanh")):
        for ours, theirs in ((act.forward64(x), F.gelu(x, approximate=approximate)),
                             (act.backward64(g, x, None), torch.ops.aten.gelu_backward(g, x, approximate=approximate))):
            assert torch.equal(ours.isnan(), theirs.isnan())
            ok = ~theirs.isnan()
            torch.testing.assert_close(ours[ok], theirs[ok], rtol=1e-12, atol=1e-14)
    deep = torch.tensor([-9.0], dtype=torch.float64)
    assert F.gelu(deep).item() == 0.0 and BY_NAME["gelu"].forward64(deep).item() == pytest.approx(-1.016e-18, rel=1e-3)


# ----------------------------------------------------------------------------------
# the kernels write every element (poisoned outputs), every block size
# ----------------------------------------------------------------------------------
def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """The mask layout: element i in bit i % 32 of int32 word i // 32."""
    n = bits.numel()
    padded = torch.zeros(kernels.mask_words(n) * 32, dtype=torch.int64)
    padded[:n] = bits.reshape(-1).cpu().to(torch.int64)
    words = (padded.reshape(-1, 32) << torch.arange(32)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("block", _launch.ELEMENTWISE_BLOCKS)
@pytest.mark.parametrize("n_blocks", [0, 1, 2], ids=["partial", "one-full", "full+partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ACTS, ids=repr)
def test_kernels_write_every_element(act, dtype, n_blocks, block, monkeypatch):
    """Launchers with poisoned out/mask/dx buffers: each element and mask word is written."""
    monkeypatch.setattr(_launch, "elementwise_block", lambda numel: block)
    n = {0: 37, 1: block, 2: 2 * block + 77}[n_blocks]
    x = make_input((n,), dtype, KERNEL_DEVICE, seed=n)
    x[:5] = torch.tensor([math.nan, -0.0, 0.0, math.inf, -math.inf], dtype=dtype)
    g = make_input((n,), dtype, KERNEL_DEVICE, seed=n + 1, scale=1.0)
    out = torch.full_like(x, POISON)
    save_mask = act.kind in kernels.MASK_KINDS
    mask_out = torch.full((kernels.mask_words(n),), 0x5A5A5A5A, dtype=torch.int32, device=KERNEL_DEVICE)
    y, mask = kernels.forward(x, act.kind, slope=act.slope, save_mask=save_mask, out=out, mask_out=mask_out)
    assert y is out
    check_forward(act, x, y)
    if save_mask:
        assert mask is mask_out
        bits = (x > 0) | x.isnan() if act.kind == "relu" else x > 0
        assert torch.equal(mask.cpu(), _pack_bits(bits))
        saved = mask
    else:
        assert mask is None
        saved = y if act.kind in kernels.OUTPUT_KINDS else x
    dx = kernels.backward(g, saved, act.kind, slope=act.slope, out=torch.full_like(x, POISON))
    check_backward(act, x, y, g, dx)


def test_launchers_reject_what_they_cannot_run():
    x = torch.randn(10, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kernels.forward(x, "relu")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        kernels.forward(x.float(), "swish")
    with pytest.raises(ValueError, match="int32 mask of 1 words"):
        kernels.backward(torch.randn(10), torch.zeros(2, dtype=torch.int32), "relu")


# ----------------------------------------------------------------------------------
# what backward keeps: measured with saved_tensors_hooks
# ----------------------------------------------------------------------------------
def saved_by(fn, x):
    """The tensors autograd saves while ``fn(x)`` runs, and the result."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return saved, y


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=repr)
def test_saved_bytes(act, dtype):
    n = 3000
    x = make_input((n,), dtype, KERNEL_DEVICE).requires_grad_()
    ours, y = saved_by(act.ours, x)
    theirs, _ = saved_by(act.torch_fn, x)
    assert len(ours) == 1
    if act.kind in kernels.MASK_KINDS:
        # one bit per element in int32 words: 1/32 of fp32, 1/16 of bf16/fp16, plus padding
        assert ours[0].dtype == torch.int32 and nbytes(ours) == 4 * math.ceil(n / 32)
        assert nbytes(theirs) == n * x.element_size()
        ratio, bits_ratio = nbytes(ours) / nbytes(theirs), 1 / (8 * x.element_size())  # 1/32 or 1/16
        assert bits_ratio <= ratio < bits_ratio + 4 / nbytes(theirs)
    elif act.kind in kernels.OUTPUT_KINDS:
        assert ours[0].data_ptr() == y.data_ptr() and nbytes(ours) == nbytes(theirs)
    else:
        assert ours[0].data_ptr() == x.data_ptr() and nbytes(ours) == nbytes(theirs)


@pytest.mark.parametrize("name", ["relu", "leaky_relu(0.01)", "silu"])
def test_saved_bytes_in_place(name):
    """In place, relu and leaky_relu keep only the mask; silu keeps a copy of its input, as torch."""
    act = BY_NAME[name]
    leaf = make_input((1000,), torch.float32, KERNEL_DEVICE).requires_grad_()
    fn = {"relu": MF.relu, "silu": MF.silu}.get(name, lambda t, inplace: MF.leaky_relu(t, 0.01, inplace))
    torch_fn = {"relu": F.relu, "silu": F.silu}.get(name, lambda t, inplace: F.leaky_relu(t, 0.01, inplace))
    ours, _ = saved_by(lambda t: fn(t * 1.0, inplace=True), leaf)
    theirs, _ = saved_by(lambda t: torch_fn(t * 1.0, inplace=True), leaf)
    if act.kind in kernels.MASK_KINDS:
        assert [t.dtype for t in ours] == [torch.int32] and nbytes(ours) == 4 * math.ceil(1000 / 32)
    else:
        assert nbytes(ours) == nbytes(theirs) == 4000


# ----------------------------------------------------------------------------------
# in place
# ----------------------------------------------------------------------------------
IN_PLACE = {
    "relu": (lambda t: MF.relu(t, inplace=True), lambda t: F.relu(t, inplace=True)),
    "leaky_relu": (lambda t: MF.leaky_relu(t, 0.2, inplace=True), lambda t: F.leaky_relu(t, 0.2, inplace=True)),
    "silu": (lambda t: MF.silu(t, inplace=True), lambda t: F.silu(t, inplace=True)),
}


@pytest.mark.parametrize("view", ["whole", "strided-view"])
@pytest.mark.parametrize("name", list(IN_PLACE))
def test_in_place_matches_torch(name, view):
    """Same tensor back, version bumped, values and gradients as torch's in-place op, also
    on a non-contiguous view of an intermediate."""
    ours_fn, torch_fn = IN_PLACE[name]
    leaf = make_input((30, 33), torch.float32, KERNEL_DEVICE).requires_grad_()
    results = []
    for fn in (ours_fn, torch_fn):
        h = leaf * 2.0
        target = h[:, ::2] if view == "strided-view" else h
        version = target._version
        out = fn(target)
        assert out is target and target._version > version
        (grad,) = torch.autograd.grad((h * h).sum(), leaf)
        results.append((h.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(IN_PLACE))
def test_in_place_errors_and_no_grad_like_torch(name):
    """torch's errors for a leaf that requires grad and for a view of one, raised before
    anything is written; under no_grad both work, with one version bump."""
    ours_fn, torch_fn = IN_PLACE[name]
    for fn in (ours_fn, torch_fn):
        leaf = torch.randn(10, device=KERNEL_DEVICE, requires_grad=True)
        before = leaf.detach().clone()
        with pytest.raises(RuntimeError, match="^a leaf Variable that requires grad is being used in an in-place"):
            fn(leaf)
        with pytest.raises(RuntimeError, match="^a view of a leaf Variable that requires grad is being used in"):
            fn(leaf[2:])
        assert torch.equal(leaf.detach(), before)
    leaves = [torch.randn(10, device=KERNEL_DEVICE).requires_grad_() for _ in range(2)]
    with torch.no_grad():
        leaves[1].copy_(leaves[0])
        versions = [t._version for t in leaves]
        assert ours_fn(leaves[0]) is leaves[0]
        torch_fn(leaves[1])
    assert [t._version for t in leaves] == [v + 1 for v in versions]
    torch.testing.assert_close(leaves[0], leaves[1], rtol=2e-7, atol=1e-7)


def test_in_place_leaky_relu_negative_slope_has_a_backward():
    """torch refuses backward through in-place leaky_relu with a negative slope; ours gives
    the out-of-place gradient (the saved mask does not depend on the slope's sign)."""
    leaf = torch.randn(100, device=KERNEL_DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="negative slope"):
        F.leaky_relu(leaf * 1.0, -0.5, inplace=True).sum().backward()
    (ours,) = torch.autograd.grad(MF.leaky_relu(leaf * 1.0, -0.5, inplace=True).sum(), leaf)
    (theirs,) = torch.autograd.grad(F.leaky_relu(leaf * 1.0, -0.5).sum(), leaf)
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------------
# modules, signatures, swap_activations
# ----------------------------------------------------------------------------------
MODULES = ["Sigmoid", "Tanh", "ReLU", "LeakyReLU", "GELU", "SiLU"]


@pytest.mark.parametrize("name", MODULES)
def test_module_signatures_and_forward(name):
    ours_cls, torch_cls = getattr(mnn, name), getattr(torch.nn, name)
    assert inspect.signature(ours_cls.__init__) == inspect.signature(torch_cls.__init__)
    args = {"ReLU": {"inplace": False}, "LeakyReLU": {"negative_slope": 0.3}, "GELU": {"approximate": "tanh"},
            "SiLU": {"inplace": False}}.get(name, {})
    ours, theirs = ours_cls(**args), torch_cls(**args)
    assert isinstance(ours, torch_cls) and repr(ours) == repr(theirs)
    x = make_input((4, 50), torch.float32, KERNEL_DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_functional_signatures_match_torch():
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in ("relu", "leaky_relu", "silu"):
        assert params(getattr(MF, name)) == params(getattr(F, name)), name
    assert [p[0] for p in params(MF.sigmoid)] == [p[0] for p in params(MF.tanh)] == ["input"]
    # torch's gelu is a builtin, documented as gelu(input, approximate='none')
    assert [(p[0], p[2]) for p in params(MF.gelu)] == [("input", inspect.Parameter.empty), ("approximate", "none")]


def test_gelu_rejects_an_unknown_approximation_like_torch():
    x = torch.randn(3, device=KERNEL_DEVICE)
    for fn in (F.gelu, MF.gelu):
        with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
            fn(x, approximate="fast")


def test_unsupported_dtypes_call_torch():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for act in ACTS:
            (ours,) = torch.autograd.grad(act.ours(x).sum(), x)
            (theirs,) = torch.autograd.grad(act.torch_fn(x).sum(), x)
            assert torch.equal(act.ours(x), act.torch_fn(x)) and torch.equal(ours, theirs), act.name


class _MyReLU(torch.nn.ReLU):
    pass


def test_swap_activations():
    torch.manual_seed(0)
    shared = torch.nn.GELU(approximate="tanh")
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LeakyReLU(0.2, inplace=True), torch.nn.Linear(8, 8))
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.ReLU(inplace=True), block, shared, torch.nn.Linear(8, 8), shared,
        torch.nn.SiLU(), torch.nn.Tanh(), torch.nn.Sigmoid(), _MyReLU(), mnn.ReLU(),
    ).to(KERNEL_DEVICE)
    model[7].eval()
    x = torch.randn(5, 8, device=KERNEL_DEVICE)
    before = model(x)
    old = dict(model.named_children())
    replaced = mnn.swap_activations(model)
    assert set(replaced) == {"1", "2.1", "3", "5", "6", "7", "8"}
    assert replaced["3"] is replaced["5"] is shared and model[3] is model[5]
    assert all(replaced[k] is old[k] for k in ("1", "3", "6", "7", "8"))
    expected = {"1": mnn.ReLU, "3": mnn.GELU, "6": mnn.SiLU, "7": mnn.Tanh, "8": mnn.Sigmoid}
    for key, cls in expected.items():
        assert type(model.get_submodule(key)) is cls
    assert type(model[2][1]) is mnn.LeakyReLU and model[2][1].negative_slope == 0.2 and model[2][1].inplace
    assert model[1].inplace and model[3].approximate == "tanh" and not model[7].training and model[6].training
    assert type(model[9]) is _MyReLU and type(model[10]) is mnn.ReLU  # subclasses and ours: left alone
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert mnn.swap_activations(model) == {}
    with pytest.raises(ValueError, match="bare ReLU"):
        mnn.swap_activations(torch.nn.ReLU())


# ----------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------
def test_torch_compile_fullgraph_matches_eager():
    """A model of every module (the in-place ones too) compiles with fullgraph=True: no graph
    break, mechgpu's ops in the graph, forward and backward equal to eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), mnn.GELU(), torch.nn.Linear(32, 32), mnn.ReLU(inplace=True),
        torch.nn.Linear(32, 32), mnn.SiLU(inplace=True), mnn.LeakyReLU(0.1), mnn.Tanh(), mnn.Sigmoid(),
        mnn.GELU("tanh"), torch.nn.Linear(32, 32), mnn.SiLU(), mnn.LeakyReLU(0.2, inplace=True), mnn.ReLU(),
        torch.nn.Linear(32, 4),
    ).to(KERNEL_DEVICE)
    x = torch.randn(8, 16, device=KERNEL_DEVICE)
    captured = []

    def backend(gm, example_inputs):
        captured.append(str(gm.graph))
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    assert len(captured) == 1
    for op in ("mechgpu.gelu", "mechgpu.silu", "mechgpu.leaky_relu", "mechgpu.tanh", "mechgpu.sigmoid",
               "mechgpu.relu"):
        assert op in captured[0], op
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# the CPU fallback (no interpreter): torch's own op, with a one-time warning
# ----------------------------------------------------------------------------------
def test_cpu_fallback_without_interpreter_warns_once_and_matches_torch():
    script = r"""
import warnings, torch, torch.nn.functional as F
import mechgpu.nn as mnn
from mechgpu import _backend
assert not _backend.INTERPRETED
x = torch.randn(100, requires_grad=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pairs = [(mnn.functional.relu(x), F.relu(x)), (mnn.functional.gelu(x, "tanh"), F.gelu(x, approximate="tanh")),
             (mnn.SiLU()(x), F.silu(x)), (mnn.functional.sigmoid(x), torch.sigmoid(x))]
msgs = [str(w.message) for w in caught if "mechgpu" in str(w.message)]
assert len(msgs) == 1 and "runs torch's own relu" in msgs[0], msgs
assert all(torch.equal(a, b) for a, b in pairs)
print("ok")
"""
    out = run_without_interpreter(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------------
# GPU only: offsets past 2^31 elements
# ----------------------------------------------------------------------------------
@gpu
@requires_cuda
def test_int64_offsets_past_2_pow_31():
    """relu forward and backward on 2^31 + 4173 bf16 elements: the last ones are right."""
    n = 2**31 + 4096 + 77
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    x[-(1 << 20):].normal_()
    y, mask = kernels.forward(x, "relu", save_mask=True)
    tail = slice(n - (1 << 20), n)
    assert torch.equal(y[tail], torch.relu(x[tail]))
    del y
    words = 1 << 10  # the last mask words cover elements [(W - words) 32, n)
    first = (kernels.mask_words(n) - words) * 32
    assert torch.equal(mask[-words:].cpu(), _pack_bits(x[first:] > 0))
    dx = kernels.backward(torch.ones_like(x), mask, "relu")
    assert torch.equal(dx[tail], (x[tail] > 0).to(torch.bfloat16))


# ----------------------------------------------------------------------------------
# torch.func, higher derivatives, TorchScript and torch.export: as with torch's own ops
# ----------------------------------------------------------------------------------
# every activation, and the in-place ones on a copy (a transform's input is a leaf)
TOOL_CASES = {a.name: (a.ours, a.torch_fn) for a in ACTS} | {
    f"{name}_": (lambda t, f=ours: f(t * 1.0), lambda t, f=theirs: f(t * 1.0))
    for name, (ours, theirs) in IN_PLACE.items()}


def _squares(f):
    return lambda t: f(t).square().sum()


def _tangent(x):
    return make_input(tuple(x.shape), x.dtype, x.device, seed=7, scale=1.0)


TRANSFORMS = {
    "grad": lambda f, x: torch.func.grad(_squares(f))(x),
    "jacrev": lambda f, x: torch.func.jacrev(f)(x),
    "per-sample-grad": lambda f, x: torch.func.vmap(torch.func.grad(_squares(f)))(x),
    "grad-of-vmap": lambda f, x: torch.func.grad(_squares(torch.func.vmap(f, in_dims=1)))(x),
    "jvp": lambda f, x: torch.func.jvp(f, (x,), (_tangent(x),))[1],
    "hessian": lambda f, x: torch.func.hessian(_squares(f))(x[0]),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", list(TOOL_CASES))
def test_torch_func_transforms_match_torch(name, transform):
    """fp32 results of torch.func's transforms (and a nesting of each kind) against torch's
    ops under the same transform in float64. Second derivatives (hessian) come from torch ops
    in fp32 on the saved tensors, so they get a wider tolerance."""
    ours, theirs = TOOL_CASES[name]
    x = make_input((3, 5), torch.float32, KERNEL_DEVICE)
    got = TRANSFORMS[transform](ours, x)
    expected = TRANSFORMS[transform](theirs, x.double())
    tol = 2e-6 if transform == "hessian" else 1e-6
    torch.testing.assert_close(got, expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(TOOL_CASES))
def test_vmap_is_one_launch_for_the_batch(name, monkeypatch):
    """vmap over the forward, and over its backward (as jacrev does, with an unbatched saved
    mask or tensor), each run one kernel launch for the whole batch; per-sample sizes are not
    whole mask words. Values against torch in float64."""
    ours, theirs = TOOL_CASES[name]
    x = make_input((5, 7), torch.float32, KERNEL_DEVICE)
    cotangents = make_input((4, 5, 7), torch.float32, KERNEL_DEVICE, seed=3, scale=1.0)
    launches = count_launches(monkeypatch)
    y = torch.func.vmap(ours, in_dims=1, out_dims=1)(x)
    assert launches() == 1
    (batched,) = torch.func.vmap(torch.func.vjp(ours, x)[1])(cotangents)
    assert launches() == 3  # the vjp's forward, and its backward over all the cotangents
    x64 = x.double()
    (expected,) = torch.func.vmap(torch.func.vjp(theirs, x64)[1])(cotangents.double())
    torch.testing.assert_close(y, theirs(x64).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched, expected.float(), rtol=1e-6, atol=1e-6)


# |error| <= tol (1 + |expected|) for four chained derivatives, each result rounded to the
# dtype: a few units of its epsilon (torch's own bf16 and fp16 errors are as large)
DOUBLE_BACKWARD_TOL = {torch.float32: 4e-6, torch.bfloat16: 6e-2, torch.float16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(TOOL_CASES))
def test_double_backward_matches_torch(name, dtype):
    """create_graph=True: a gradient penalty's gradient (second derivatives, in x and in a
    weight in front of the activation) and one more derivative, against torch in float64 on
    the same (rounded) inputs."""
    ours, theirs = TOOL_CASES[name]
    inputs = make_input((4, 9), dtype, KERNEL_DEVICE), make_input((9,), dtype, KERNEL_DEVICE, seed=1, scale=1.0)
    results = []
    for fn, to in ((ours, dtype), (theirs, torch.float64)):
        x, w = (t.detach().to(to).requires_grad_() for t in inputs)
        (dx,) = torch.autograd.grad(fn(x * w).square().sum(), x, create_graph=True)
        penalty_grads = torch.autograd.grad(dx.square().sum(), (x, w), create_graph=True)
        third = torch.autograd.grad(penalty_grads[1].sum(), w)
        results.append((dx, *penalty_grads, *third))
    tol = DOUBLE_BACKWARD_TOL[dtype]
    for what, got, expected in zip(("dx", "d penalty/dx", "d penalty/dw", "third"), *results):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol, msg=lambda m, what=what: f"{what}: {m}")


TRACED = {"ReLU": {}, "ReLU(inplace)": {"inplace": True}, "LeakyReLU": {"negative_slope": 0.2},
          "LeakyReLU(inplace)": {"negative_slope": 0.2, "inplace": True}, "GELU": {},
          "GELU(tanh)": {"approximate": "tanh"}, "SiLU": {}, "SiLU(inplace)": {"inplace": True}, "Tanh": {},
          "Sigmoid": {}}


def _model(nn, cases=TRACED, seed=0):
    """Linear layers, each followed by one activation module of ``cases`` from ``nn`` (mechgpu.nn
    or torch.nn); the same seed gives the same weights."""
    torch.manual_seed(seed)
    layers = []
    for case, kwargs in cases.items():
        layers += [torch.nn.Linear(8, 8), getattr(nn, case.split("(")[0])(**kwargs)]
    return torch.nn.Sequential(*layers).to(KERNEL_DEVICE)


def _assert_same_as_torch(model, torch_model):
    """Outputs and weight gradients bit for bit equal to those of the torch twin."""
    x = torch.randn(3, 8, device=KERNEL_DEVICE)
    results = []
    for m in (model, torch_model):
        out = m(x)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(m.parameters()))))
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("case", list(TRACED))
def test_jit_trace_passes_its_check_and_records_torch_ops(case):
    """torch.jit.trace with its default check (which re-traces under no_grad), of a Linear (whose
    weight makes the traced input require grad) and the module; the trace records torch's op, so
    it computes exactly what torch's module does, forward and backward."""
    model = _model(mnn, {case: TRACED[case]})
    traced = torch.jit.trace(model, torch.randn(3, 8, device=KERNEL_DEVICE))
    _assert_same_as_torch(traced, _model(torch.nn, {case: TRACED[case]}))


def test_jit_script_compiles_torch_ops():
    """A model of every module, and a scripted function calling mechgpu.nn.functional, script to
    torch's own activations: results equal to torch's."""
    _assert_same_as_torch(torch.jit.script(_model(mnn)), _model(torch.nn))

    @torch.jit.script
    def block(t: torch.Tensor) -> torch.Tensor:
        return MF.gelu(MF.leaky_relu(MF.silu(t), 0.2), approximate="tanh") + MF.relu(MF.tanh(t)) * MF.sigmoid(t)

    x = torch.randn(40, device=KERNEL_DEVICE)
    expected = F.gelu(F.leaky_relu(F.silu(x), 0.2), approximate="tanh") + F.relu(torch.tanh(x)) * torch.sigmoid(x)
    assert torch.equal(block(x), expected)


def test_torch_export_records_torch_ops_whatever_triton_interpret():
    """The exported graph is the same with and without TRITON_INTERPRET=1 at export time (torch's
    ops, where the kernel choice used to leak into the graph); the exported program equals
    torch's model."""
    script = r"""
import torch, mechgpu.nn as mnn
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), mnn.ReLU(), mnn.LeakyReLU(0.2, inplace=True), mnn.GELU("tanh"),
                            mnn.SiLU(), mnn.Tanh(), mnn.Sigmoid(), mnn.SiLU(inplace=True), mnn.GELU())
print(torch.export.export(model, (torch.randn(3, 8),)).graph_module.code)
"""
    graphs = [run_without_interpreter(script)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    graphs.append(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300))
    for out in graphs:
        assert out.returncode == 0, out.stderr
    assert graphs[0].stdout == graphs[1].stdout, \
        f"without:\n{graphs[0].stdout}\nwith TRITON_INTERPRET=1:\n{graphs[1].stdout}"
    exported = torch.export.export(_model(mnn), (torch.randn(3, 8, device=KERNEL_DEVICE),)).module()
    _assert_same_as_torch(exported, _model(torch.nn))


def test_traced_scripted_and_exported_models_load_without_mechgpu(tmp_path):
    """What jit.trace, jit.script and torch.export produce holds no mechgpu op: a process that
    never imports mechgpu loads and runs it, and gets torch's results."""
    model, x = _model(mnn), torch.randn(3, 8, device=KERNEL_DEVICE)
    torch.jit.trace(model, x).save(tmp_path / "traced.pt")
    torch.jit.script(model).save(tmp_path / "scripted.pt")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "exported.pt2")
    torch.save((x, _model(torch.nn)(x)), tmp_path / "expected.pt")
    script = rf"""
import sys, torch
x, expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=False)
for path in ("traced.pt", "scripted.pt"):
    assert torch.equal(torch.jit.load({str(tmp_path)!r} + "/" + path)(x), expected), path
assert torch.equal(torch.export.load({str(tmp_path / "exported.pt2")!r}).module()(x), expected)
assert not any(name.startswith("mechgpu") for name in sys.modules)
print("ok")
"""
    out = run_without_interpreter(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("kind", ["relu", "leaky_relu"])
def test_backward_reads_a_strided_mask_as_its_words(kind):
    """A mask that is not contiguous (an expanded word, a strided view) gives the gradient of its
    values, as the materialised mask does."""
    from mechgpu.kernels import activation as kernels

    n = 32 * 5
    grad = torch.randn(n, device=KERNEL_DEVICE)
    word = torch.tensor([0x5A5A5A5A], dtype=torch.int32, device=KERNEL_DEVICE)
    for mask in (word.expand(5), torch.arange(10, dtype=torch.int32, device=KERNEL_DEVICE)[::2] * 0x01010101):
        expected = kernels.backward(grad, mask.clone(), kind, slope=0.1)
        torch.testing.assert_close(kernels.backward(grad, mask, kind, slope=0.1), expected, rtol=0, atol=0)
        bits = ((mask.clone().repeat_interleave(32) >> torch.arange(32, device=KERNEL_DEVICE).repeat(5)) & 1).bool()
        torch.testing.assert_close(expected, torch.where(bits, grad, grad * 0.1 if kind == "leaky_relu" else 0 * grad),
                                   rtol=0, atol=0)
