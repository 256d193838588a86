"""mechgpu.init against torch.nn.init: signatures, distributions, seeding, dtypes, errors,
and init_model's choices. On CPU the Triton fill kernels run in triton's interpreter.

Statistical bounds come from the sample size: a sample mean is within 5 standard errors
of the target (sigma / sqrt(n)), a sample variance within 5 standard errors of its own
(sigma^2 sqrt((kurtosis - 1) / n)); Kolmogorov-Smirnov tests use seeded draws and
p > 1e-3, against the target distribution and against torch's own samples.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import warnings

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICES, KERNEL_DEVICE, count_launches, run_without_interpreter
from mechgpu.kernels import init as K
from scipy import integrate, stats
from torch import nn

import mechgpu.init as mi
from mechgpu.testing import compare, oracles

FUNCTIONS = ["calculate_gain", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
             "kaiming_uniform_", "kaiming_normal_"]
LINEAR = (257, 129)  # 33,153 elements
CONV = (64, 32, 3, 3)  # 18,432 elements
NONLINEARITIES = [("linear", None), ("conv2d", None), ("sigmoid", None), ("tanh", None), ("relu", None),
                  ("leaky_relu", None), ("leaky_relu", 0.2), ("selu", None), ("gelu", None), ("silu", None)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def fans(shape):
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def torch_gain(nonlinearity, param):
    """The oracle's gain: torch's, or the second-moment gain computed here by integration."""
    if nonlinearity in ("gelu", "silu"):
        f = {"gelu": lambda z: z * stats.norm.cdf(z), "silu": lambda z: z * (1.0 / (1.0 + math.exp(-z)))}[nonlinearity]
        second_moment = integrate.quad(lambda z: f(z) ** 2 * stats.norm.pdf(z), -40, 40, epsabs=1e-14)[0]
        return 1.0 / math.sqrt(second_moment)
    return torch.nn.init.calculate_gain(nonlinearity, param)


def check_moments(x: torch.Tensor, mean: float, std: float, kurtosis: float, what: str) -> None:
    """Every element written and the sample mean and variance within the case database's
    standard errors of (mean, std^2) (``compare.sample_errors``)."""
    errs = compare.sample_errors(x, oracles.Target(mean, std, kurtosis), what)
    assert errs.passed, "; ".join(errs.failures)


def check_ks(x: torch.Tensor, cdf, what: str) -> None:
    result = stats.kstest(x.double().flatten().cpu().numpy(), cdf)
    assert result.pvalue > 1e-3, f"{what}: KS statistic {result.statistic:.4g}, p = {result.pvalue:.3g}"


def check_ks_2samp(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    result = stats.ks_2samp(ours.double().flatten().cpu().numpy(), theirs.double().flatten().numpy())
    assert result.pvalue > 1e-3, f"{what}: two-sample KS against torch {result.statistic:.4g}, p = {result.pvalue:.3g}"


def poisoned(shape, device, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_all_written(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        idx = bad.flatten().nonzero()[0].item()
        raise AssertionError(f"{what}: {int(bad.sum())} elements not written, first at flat index {idx}")


def torch_sample(fn_name: str, shape, *args, **kwargs) -> torch.Tensor:
    torch.manual_seed(1234)
    return getattr(torch.nn.init, fn_name)(torch.empty(shape), *args, **kwargs)


# ----------------------------------------------------------------------------------
# the public face
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FUNCTIONS)
def test_signature_matches_torch(name):
    ours = inspect.signature(getattr(mi, name)).parameters
    theirs = inspect.signature(getattr(torch.nn.init, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.values()]


@pytest.mark.parametrize("nonlinearity,param", NONLINEARITIES)
def test_calculate_gain(nonlinearity, param):
    ours = mi.calculate_gain(nonlinearity, param)
    if nonlinearity in ("gelu", "silu"):
        assert ours == pytest.approx(torch_gain(nonlinearity, param), rel=1e-12, abs=0)
    else:
        assert ours == torch.nn.init.calculate_gain(nonlinearity, param)
        assert type(ours) is type(torch.nn.init.calculate_gain(nonlinearity, param))


def test_gelu_silu_gains_preserve_the_second_moment():
    """The defining property: He-initialised layers keep E[y^2] = 1 from N(0, 1) inputs."""
    torch.manual_seed(0)
    z = torch.randn(400_000, dtype=torch.float64)
    for name, f in (("gelu", nn.functional.gelu), ("silu", nn.functional.silu)):
        second_moment = (f(z) ** 2).mean().item()
        tol = 5 * (f(z) ** 2).std().item() / math.sqrt(z.numel())
        assert abs(mi.calculate_gain(name) ** 2 * second_moment - 1) < tol * mi.calculate_gain(name) ** 2


# ----------------------------------------------------------------------------------
# distributions
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("nonlinearity,param", NONLINEARITIES)
def test_kaiming(device, shape, mode, nonlinearity, param):
    fan = fans(shape)[0 if mode == "fan_in" else 1]
    std = torch_gain(nonlinearity, param) / math.sqrt(fan)
    a = 0 if param is None else param
    bound = math.sqrt(3.0) * std
    torch.manual_seed(0)
    w = mi.kaiming_normal_(poisoned(shape, device), a=a, mode=mode, nonlinearity=nonlinearity)
    check_all_written(w, "kaiming_normal_")
    check_moments(w, 0.0, std, oracles.NORMAL_KURTOSIS, f"kaiming_normal_ {shape} {mode} {nonlinearity}")
    check_ks(w, stats.norm(0, std).cdf, "kaiming_normal_")
    u = mi.kaiming_uniform_(poisoned(shape, device), a=a, mode=mode, nonlinearity=nonlinearity)
    check_all_written(u, "kaiming_uniform_")
    assert -bound <= u.min().item() and u.max().item() < bound
    gap = 20 * 2 * bound / u.numel()  # P(no value within gap of an end) = e^-20
    assert u.min().item() < -bound + gap and u.max().item() > bound - gap
    check_moments(u, 0.0, std, oracles.UNIFORM_KURTOSIS, f"kaiming_uniform_ {shape} {mode} {nonlinearity}")
    check_ks(u, stats.uniform(-bound, 2 * bound).cdf, "kaiming_uniform_")
    if nonlinearity not in ("gelu", "silu") and shape == LINEAR:
        kwargs = dict(a=a, mode=mode, nonlinearity=nonlinearity)
        check_ks_2samp(w, torch_sample("kaiming_normal_", shape, **kwargs), "kaiming_normal_")
        check_ks_2samp(u, torch_sample("kaiming_uniform_", shape, **kwargs), "kaiming_uniform_")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [LINEAR, CONV], ids=["linear", "conv"])
@pytest.mark.parametrize("gain", [1.0, 5.0 / 3])
def test_xavier(device, shape, gain):
    fan_in, fan_out = fans(shape)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    bound = math.sqrt(3.0) * std
    torch.manual_seed(0)
    w = mi.xavier_normal_(poisoned(shape, device), gain=gain)
    check_all_written(w, "xavier_normal_")
    check_moments(w, 0.0, std, oracles.NORMAL_KURTOSIS, f"xavier_normal_ {shape} gain {gain}")
    check_ks(w, stats.norm(0, std).cdf, "xavier_normal_")
    check_ks_2samp(w, torch_sample("xavier_normal_", shape, gain=gain), "xavier_normal_")
    u = mi.xavier_uniform_(poisoned(shape, device), gain=gain)
    check_all_written(u, "xavier_uniform_")
    assert -bound <= u.min().item() and u.max().item() < bound
    check_moments(u, 0.0, std, oracles.UNIFORM_KURTOSIS, f"xavier_uniform_ {shape} gain {gain}")
    check_ks(u, stats.uniform(-bound, 2 * bound).cdf, "xavier_uniform_")
    check_ks_2samp(u, torch_sample("xavier_uniform_", shape, gain=gain), "xavier_uniform_")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a,b", [(0.0, 1.0), (-3.0, 5.0), (100.0, 101.0), (-1e-3, 0.0)])
def test_uniform(device, a, b):
    torch.manual_seed(0)
    x = mi.uniform_(poisoned(LINEAR, device), a, b)
    check_all_written(x, "uniform_")
    assert a <= x.min().item() and x.max().item() < b
    width = b - a
    check_moments(x, (a + b) / 2, width / math.sqrt(12), oracles.UNIFORM_KURTOSIS, f"uniform_({a}, {b})")
    check_ks(x, stats.uniform(a, width).cdf, f"uniform_({a}, {b})")
    check_ks_2samp(x, torch_sample("uniform_", LINEAR, a, b), f"uniform_({a}, {b})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (3.0, 0.02), (-1.0, 7.0)])
def test_normal(device, mean, std):
    torch.manual_seed(0)
    x = mi.normal_(poisoned(LINEAR, device), mean, std)
    check_all_written(x, "normal_")
    check_moments(x, mean, std, oracles.NORMAL_KURTOSIS, f"normal_({mean}, {std})")
    check_ks(x, stats.norm(mean, std).cdf, f"normal_({mean}, {std})")
    check_ks_2samp(x, torch_sample("normal_", LINEAR, mean, std), f"normal_({mean}, {std})")
    # both tails reach past 3.5 sigma in 33k draws (P(not) < 1e-6 each), and no further than
    # Box-Muller's radius allows with u >= 2^-33 (6.77 sigma)
    z = (x.double() - mean) / std
    assert 3.5 < z.max().item() < 6.78 and -6.78 < z.min().item() < -3.5


TRUNC_CASES = [
    (0.0, 1.0, -2.0, 2.0),  # torch's defaults
    (0.0, 0.02, -2.0, 2.0),  # the ViT idiom: effectively untruncated
    (1.0, 2.0, 0.0, 7.0),  # asymmetric
    (0.0, 1.0, 3.0, 10.0),  # one-sided, far in the upper tail
    (0.0, 1.0, -9.0, -8.0),  # deep in the lower tail
    (5.0, 1.0, 4.9, 5.1),  # narrow
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean,std,a,b", TRUNC_CASES)
def test_trunc_normal(device, mean, std, a, b):
    target = stats.truncnorm((a - mean) / std, (b - mean) / std, loc=mean, scale=std)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the far-tail cases warn, as torch does
        x = mi.trunc_normal_(poisoned(LINEAR, device), mean, std, a, b)
    check_all_written(x, "trunc_normal_")
    assert a <= x.min().item() and x.max().item() <= b
    t_mean, t_var, t_excess_kurtosis = (float(v) for v in target.stats(moments="mvk"))
    check_moments(x, t_mean, math.sqrt(t_var), t_excess_kurtosis + 3, f"trunc_normal_{(mean, std, a, b)}")
    check_ks(x, target.cdf, f"trunc_normal_{(mean, std, a, b)}")
    if (a - mean) / std > -3 and (b - mean) / std < 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_ks_2samp(x, torch_sample("trunc_normal_", LINEAR, mean, std, a, b), "trunc_normal_")


@triton.jit
def _ppf_kernel(p_ptr, pc_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.5)
    pc = tl.load(pc_ptr + offs, mask=mask, other=0.5)
    tl.store(out_ptr + offs, K.normal_ppf(p, pc), mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_normal_ppf_against_scipy(device):
    """AS241 as transcribed, over the whole range, both tails given with full precision."""
    tail = torch.logspace(-37, math.log10(0.5), 4000, dtype=torch.float64)
    p32 = torch.cat([tail, 1 - tail]).float()  # the upper half as 1 - q rounded to fp32 ...
    pc32 = torch.cat([1 - tail, tail]).float()  # ... with its complement q exact
    out = torch.empty_like(p32, device=device)
    n = p32.numel()
    _ppf_kernel[(triton.cdiv(n, 1024),)](p32.to(device), pc32.to(device), out, n, BLOCK=1024)
    lower = stats.norm.ppf(tail.float().double().numpy())
    expected = torch.cat([torch.from_numpy(lower), -torch.from_numpy(lower)])
    got = out.cpu().double()
    central = (p32.double() - 0.5).abs() <= 0.425
    # the upper half's p is rounded to fp32, so the central branch sees p - 1/2 to 6e-8
    expected = torch.where(central, torch.from_numpy(stats.norm.ppf(p32.double().numpy())), expected)
    err = ((got - expected).abs() / expected.abs().clamp_min(1e-3))
    worst = int(err.argmax())
    assert err.max() < 2e-6, f"worst at p={p32[worst].item():.6g}: {got[worst].item()} vs {expected[worst].item()}"


# ----------------------------------------------------------------------------------
# dtypes: fp32 math, stored in the tensor's dtype
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn,args", [("normal_", (0.5, 2.0)), ("trunc_normal_", (0.0, 1.0, -1.5, 2.0)),
                                     ("uniform_", (-0.3, 0.7)), ("kaiming_uniform_", ())])
def test_low_precision_is_the_fp32_value_rounded(device, dtype, fn, args):
    """Same seed, same fp32 values: the bf16/fp16 fill is the fp32 fill rounded to nearest even."""
    shape = (333, 97)
    ref = getattr(mi, fn)(poisoned(shape, device), *args, generator=torch.Generator().manual_seed(7)).cpu()
    x = getattr(mi, fn)(poisoned(shape, device, dtype), *args, generator=torch.Generator().manual_seed(7)).cpu()
    assert x.dtype == dtype
    expected = ref.to(dtype)
    if fn.endswith("uniform_"):  # a value that rounds up to the upper bound becomes the lower bound
        bound = math.sqrt(3.0) * math.sqrt(2.0 / shape[1])
        lo, hi = args if fn == "uniform_" else (-bound, bound)
        lo_d, hi_d = torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)
        expected = torch.where(expected >= hi_d, lo_d, expected)
    allowed = x == expected
    bad = (~allowed).nonzero()
    assert bad.numel() == 0, (f"{len(bad)} values are not the fp32 value rounded, first at {bad[0].tolist()}: "
                              f"{x[tuple(bad[0])].item()} from {ref[tuple(bad[0])].item()}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bounds_hold_in_every_dtype(device, dtype):
    torch.manual_seed(0)
    u = mi.uniform_(poisoned(LINEAR, device, dtype), -0.1, 0.1)
    lo, hi = torch.tensor(-0.1, dtype=dtype).item(), torch.tensor(0.1, dtype=dtype).item()
    assert u.dtype == dtype and lo <= u.min().item() and u.max().item() < hi
    t = mi.trunc_normal_(poisoned(LINEAR, device, dtype), 0.0, 1.0, -0.5, 0.3)
    lo, hi = torch.tensor(-0.5, dtype=dtype).item(), torch.tensor(0.3, dtype=dtype).item()
    assert t.dtype == dtype and lo <= t.min().item() and t.max().item() <= hi
    check_all_written(t, "trunc_normal_")


# ----------------------------------------------------------------------------------
# seeding and streams
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_repeats_and_consecutive_calls_differ(device):
    torch.manual_seed(3)
    a = mi.normal_(torch.empty(1000, device=device))
    b = mi.normal_(torch.empty(1000, device=device))
    torch.manual_seed(3)
    a2 = mi.normal_(torch.empty(1000, device=device))
    b2 = mi.normal_(torch.empty(1000, device=device))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(1000)


@pytest.mark.parametrize("device", DEVICES)
def test_generator_is_respected(device):
    state = torch.get_rng_state()
    a = mi.xavier_uniform_(torch.empty(50, 40, device=device), generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), state), "the default generator was advanced"
    b = mi.xavier_uniform_(torch.empty(50, 40, device=device), generator=torch.Generator().manual_seed(11))
    c = mi.xavier_uniform_(torch.empty(50, 40, device=device), generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_values_depend_only_on_seed_stream_and_index(device):
    """The block size does not matter: a short fill is a prefix of a long one, and a
    multi-tensor launch gives tensor i the values of a single fill on stream i."""
    fill = K.Fill.normal(0.0, 1.0)
    long, short = torch.empty(70_001, device=device), torch.empty(333, device=device)
    K.fill_(long, fill, seed=2**40 + 9)
    K.fill_(short, fill, seed=2**40 + 9)
    assert torch.equal(short, long[:333])
    tensors = [torch.empty(n, device=device) for n in (5, 4099, 333)]
    plan = K.FillPlan(tensors, [fill, K.Fill.uniform(-1, 1), fill])
    plan.launch(2**40 + 9)
    assert plan.launches == 1
    assert not torch.equal(tensors[2], long[:333])  # stream 2 is not stream 0
    single = torch.empty(333, device=device)
    K.fill_(single, fill, seed=2**40 + 9, stream=2)
    assert torch.equal(tensors[2], single)


@pytest.mark.parametrize("device", DEVICES)
def test_streams_and_neighbours_are_uncorrelated(device):
    n = 20_000
    tensors = [torch.empty(n, device=device) for _ in range(3)]
    K.FillPlan(tensors, [K.Fill.normal(0.0, 1.0)] * 3).launch(2**41 + 1)
    x = torch.stack(tensors).cpu().double()
    corr = torch.corrcoef(x)
    assert (corr - torch.eye(3)).abs().max() < 5 / math.sqrt(n), corr
    for lag in (1, 2, 3, 4, 5, 8, 1024):  # neighbours share a Philox call when lag < 4
        c = torch.corrcoef(torch.stack([x[0, :-lag], x[0, lag:]]))[0, 1].item()
        assert abs(c) < 5 / math.sqrt(n), f"lag {lag}: correlation {c:.4f}"


# ----------------------------------------------------------------------------------
# layouts and sizes
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 4095, 4097, 65537])
def test_awkward_sizes_are_fully_written(device, numel):
    x = mi.normal_(poisoned((numel,), device))
    check_all_written(x, f"normal_ of {numel}")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_transposed_and_unaligned(device):
    base = poisoned((300, 200), device)
    view = base[:, ::2]  # not dense: filled through a temporary
    mi.kaiming_normal_(view)
    check_all_written(view, "strided view")
    assert torch.isnan(base[:, 1::2]).all(), "wrote outside the view"
    check_moments(view, 0.0, math.sqrt(2.0 / 100), oracles.NORMAL_KURTOSIS, "strided view")
    t = poisoned((200, 300), device).t()  # dense, transposed: filled in place
    ptr = t.data_ptr()
    mi.xavier_normal_(t)
    check_all_written(t, "transposed")
    assert t.data_ptr() == ptr
    storage = poisoned((10_001,), device)
    off = storage[1:]  # 4-byte offset: not 16-byte aligned
    model_like = [off, torch.empty(64, device=device)]
    K.FillPlan(model_like, [K.Fill.normal(0, 1), K.Fill.constant(2.0)]).launch(2**40)
    check_all_written(off, "unaligned")
    assert torch.isnan(storage[0]) and (model_like[1] == 2.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors_and_the_version_counter(device):
    assert mi.normal_(torch.empty(0, 5, device=device)).shape == (0, 5)
    with pytest.warns(UserWarning, match="Initializing zero-element tensors is a no-op"):
        mi.kaiming_normal_(torch.empty(0, 5, device=device))
    p = nn.Parameter(torch.empty(8, 8, device=device))
    version = p._version
    mi.xavier_uniform_(p)
    assert p._version > version
    assert p.requires_grad and p.grad_fn is None


def test_unsupported_dtypes_and_meta_use_torch():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = mi.kaiming_uniform_(torch.empty(30, 20, dtype=torch.float64), generator=g1)
    theirs = torch.nn.init.kaiming_uniform_(torch.empty(30, 20, dtype=torch.float64), generator=g2)
    assert ours.dtype == torch.float64 and torch.equal(ours, theirs)
    meta = torch.empty(4, 4, device="meta")
    assert mi.trunc_normal_(meta) is meta and mi.normal_(meta) is meta


def test_cpu_without_interpreter_falls_back_to_torch_with_one_warning():
    code = (
        "import warnings, torch, mechgpu.init as mi\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)\n"
        "    a = mi.normal_(torch.empty(100), 0.0, 2.0, generator=g1)\n"
        "    mi.uniform_(torch.empty(10))\n"
        "b = torch.nn.init.normal_(torch.empty(100), 0.0, 2.0, generator=g2)\n"
        "print(torch.equal(a, b), len(w), 'TRITON_INTERPRET=1' in str(w[0].message))\n"
    )
    out = run_without_interpreter(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "1", "True"], out.stdout


# ----------------------------------------------------------------------------------
# torch's errors and warnings
# ----------------------------------------------------------------------------------
def torch_error(fn, *args, **kwargs) -> BaseException:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


ERROR_CASES = [
    ("xavier_uniform_", (torch.empty(5),), {}),
    ("xavier_normal_", (torch.empty(()),), {}),
    ("kaiming_uniform_", (torch.empty(5),), {}),
    ("kaiming_normal_", (torch.empty(4, 4),), {"mode": "fan_avg"}),
    ("kaiming_uniform_", (torch.empty(4, 4),), {"nonlinearity": "swish"}),
    ("calculate_gain", ("softmax",), {}),
    ("calculate_gain", ("leaky_relu", "0.2"), {}),
    ("calculate_gain", ("leaky_relu", True), {}),
    ("uniform_", (torch.empty(4), 1.0, 0.0), {}),
    ("uniform_", (torch.empty(4, dtype=torch.float16), -1e6, 1e6), {}),
    ("normal_", (torch.empty(4), 0.0, -1.0), {}),
    ("trunc_normal_", (torch.empty(4), 0.0, 0.0), {}),
]


@pytest.mark.parametrize("name,args,kwargs", ERROR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_errors_are_torchs(name, args, kwargs):
    args = tuple(a.to(KERNEL_DEVICE) if torch.is_tensor(a) else a for a in args)  # else torch's fallback runs
    expected = torch_error(getattr(torch.nn.init, name), *args, **kwargs)
    with pytest.raises(type(expected), match=re.escape(str(expected))):
        getattr(mi, name)(*args, **kwargs)


def test_trunc_normal_empty_interval_and_far_mean():
    with pytest.raises(RuntimeError, match=re.escape("uniform_ expects to return a [from, to) range")):
        mi.trunc_normal_(torch.empty(4, device=KERNEL_DEVICE), 0.0, 1.0, 1.0, -1.0)
    message = "mean is more than 2 std from [a, b] in nn.init.trunc_normal_"
    with pytest.warns(UserWarning, match=re.escape(message)):
        torch.nn.init.trunc_normal_(torch.empty(4), 5.0, 1.0, -1.0, 1.0)
    with pytest.warns(UserWarning, match=re.escape(message)):
        x = mi.trunc_normal_(torch.empty(4000, device=KERNEL_DEVICE), 5.0, 1.0, -1.0, 1.0)
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0 and x.mean().item() > 0.7


# ----------------------------------------------------------------------------------
# init_model
# ----------------------------------------------------------------------------------
class GELU(nn.Module):
    """Stands in for mechgpu.nn.GELU (or anyone's): recognised by class name alone."""

    def forward(self, x):
        return nn.functional.gelu(x)


class Functional(nn.Module):
    """Activations as functions and methods, seen through dropout, norms and reshapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 16, bias=False)
        self.fc4 = nn.Linear(16, 4)

    def forward(self, x):
        x = nn.functional.leaky_relu(self.bn(self.conv(x)), negative_slope=0.3).mean((2, 3))
        x = torch.tanh(nn.functional.dropout(self.fc1(x), 0.1))
        x = self.fc2(x).relu()
        x = x + nn.functional.silu(self.fc3(x))
        return self.fc4(x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(8, 8), nn.SiLU()
        self.fc2, self.drop, self.act2 = nn.Linear(8, 8), nn.Dropout(), nn.Sigmoid()
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.fc3(self.act2(self.drop(self.fc2(self.act1(self.fc1(x))))))


def _rows(table):
    return {r.name: (r.activation, r.rule, round(r.gain, 4)) for r in table}


def test_init_model_sequential_choices():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LeakyReLU(0.2),
                          nn.Linear(16, 16), GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 16),
                          nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.SELU(),
                          nn.Conv1d(16, 4, 1), nn.ReLU6(), nn.Linear(1, 3))
    table = mi.init_model(model)
    assert table.found_by == "torch.fx trace"
    assert _rows(table) == {
        "0": ("relu", "kaiming", round(math.sqrt(2), 4)),
        "2": ("leaky_relu", "kaiming", round(math.sqrt(2 / 1.04), 4)),
        "4": ("gelu", "kaiming", 1.5335),
        "6": ("silu", "kaiming", 1.6765),
        "8": ("tanh", "xavier", 1.6667),
        "10": ("sigmoid", "xavier", 1.0),
        "12": ("selu", "lecun", 1.0),
        "14": ("relu", "kaiming", round(math.sqrt(2), 4)),
        "16": ("linear", "xavier", 1.0),
    }
    assert "followed by" in str(table) and len(str(table).splitlines()) == 2 + 9 + 1


def test_init_model_traced_functions_and_module_order():
    assert _rows(mi.init_model(Functional())) == {
        "conv": ("leaky_relu", "kaiming", round(math.sqrt(2 / 1.09), 4)),
        "fc1": ("tanh", "xavier", 1.6667),
        "fc2": ("relu", "kaiming", round(math.sqrt(2), 4)),
        "fc3": ("silu", "kaiming", 1.6765),
        "fc4": ("linear", "xavier", 1.0),
    }
    table = mi.init_model(Untraceable())
    assert table.found_by == "module order"
    assert _rows(table) == {"fc1": ("silu", "kaiming", 1.6765), "fc2": ("sigmoid", "xavier", 1.0),
                            "fc3": ("linear", "xavier", 1.0)}


def test_init_model_recognises_mechgpu_nn():
    import mechgpu.nn as mnn

    names = ["ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "LeakyReLU"]
    layers = []
    for name in names:
        layers += [nn.Linear(8, 8), getattr(mnn, name)()]
    table = mi.init_model(nn.Sequential(*layers))
    expected = {"ReLU": "relu", "GELU": "gelu", "SiLU": "silu", "Tanh": "tanh", "Sigmoid": "sigmoid",
                "LeakyReLU": "leaky_relu"}
    assert [r.activation for r in table] == [expected[n] for n in names]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_init_model_fills_everything_in_one_launch(device, distribution, monkeypatch):
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10),
                          nn.LayerNorm(10)).to(device)
    for p in model.parameters():
        p.data.fill_(float("nan"))
    launches = count_launches(monkeypatch)
    table = mi.init_model(model, distribution=distribution)
    assert table.launches == 1 and launches() == 1
    assert table.untouched == ["5.weight", "5.bias"]
    for row, layer in zip(table, (model[0], model[2], model[4])):
        expected = {"kaiming": math.sqrt(2 / 256), "xavier": (5 / 3) * math.sqrt(2 / 256)}
        std = math.sqrt(2 / 138) if row.name == "4" else expected[row.rule]
        assert row.std == pytest.approx(std)
        kurtosis = oracles.NORMAL_KURTOSIS if distribution == "normal" else oracles.UNIFORM_KURTOSIS
        check_moments(layer.weight, 0.0, std, kurtosis, f"layer {row.name}")
        assert (layer.bias == 0).all()
    # streams: equal shapes, independent values
    model2 = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)).to(device)
    mi.init_model(model2)
    a, b = model2[0].weight.flatten().double().cpu(), model2[1].weight.flatten().double().cpu()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / 128
    before = model2[0].weight.clone()
    table2 = mi.init_model(model2)
    table2.reinit()
    assert not torch.equal(before, model2[0].weight)


def test_init_model_schemes_and_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).to(KERNEL_DEVICE)
    assert [(r.rule, round(r.gain, 4)) for r in mi.init_model(model, "xavier")] == [("xavier", 1.0)] * 3
    assert [(r.rule, round(r.gain, 4)) for r in mi.init_model(model, "kaiming")] == \
        [("kaiming", 1.4142), ("kaiming", 1.6667), ("kaiming", 1.0)]
    with pytest.raises(ValueError, match="scheme 'he' not supported"):
        mi.init_model(model, "he")
    with pytest.raises(ValueError, match="distribution 'cauchy' not supported"):
        mi.init_model(model, distribution="cauchy")
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    mi.init_model(model, generator=g1)
    w = model[0].weight.clone()
    mi.init_model(model, generator=g2)
    assert torch.equal(w, model[0].weight)


class TiedLM(nn.Module):
    """An embedding and an output head sharing one weight, plus a raw parameter of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32, padding_idx=3)
        self.fc, self.act = nn.Linear(32, 32), nn.ReLU()
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(32))

    def forward(self, idx):
        return self.head(self.act(self.fc(self.embed(idx))) * self.scale)


class AmbiguousBlock(nn.Module):
    """Two layers registered before one activation, and control flow torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.fc_a, self.fc_b, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.GELU()

    def forward(self, x):
        return self.fc_b(self.act(self.fc_a(x))) if x.sum() > 0 else x


def test_init_model_tied_weights_embeddings_and_what_it_leaves_alone():
    model = TiedLM().to(KERNEL_DEVICE)
    weight = model.embed.weight
    table = mi.init_model(model)
    assert table.found_by == "torch.fx trace" and _rows(table) == {
        "embed": ("linear", "embedding", 1.0), "fc": ("relu", "kaiming", round(math.sqrt(2), 4))}
    assert table.tied == {"head": "embed"} and model.head.weight is weight is model.embed.weight
    assert (weight[3] == 0).all()
    rows = torch.cat([weight[:3], weight[4:]])
    check_moments(rows, 0.0, 1 / math.sqrt(32), oracles.NORMAL_KURTOSIS, "embedding rows")
    assert table.left_alone == {"": "TiedLM: parameters init_model has no rule for"}
    assert table.untouched == ["scale"] and (model.scale == 1).all()

    model = nn.Sequential(nn.Linear(8, 8), AmbiguousBlock())
    before = model[1].fc_a.weight.clone()
    table = mi.init_model(model)
    assert table.found_by == "module order" and [r.name for r in table] == ["0"]
    why = "one of fc_a, fc_b feeds act in AmbiguousBlock: which is unknown"
    assert table.left_alone == {"1.fc_a": why, "1.fc_b": why}
    assert torch.equal(before, model[1].fc_a.weight)
    assert f"left alone: 1.fc_a: {why}" in str(table)
