"""Float64 references: activations' values and derivatives, the distributions init must draw, and
the step of an optimizer with 8-bit states (the scheme of ``mechgpu.optim.quant8``).

gelu's oracle is torch's formula written as x erfc(-x/sqrt2)/2 (and x sigmoid(2a) for 'tanh'):
torch's own 1 + erf(x/sqrt2) cancels to 0 below x = -8 even in float64. The init targets come
from torch.nn.init's formulas (``calculate_gain``, ``_calculate_fan_in_and_fan_out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SQRT_HALF = math.sqrt(0.5)
GELU_TANH_K0 = math.sqrt(8 / math.pi)  # 2 sqrt(2/pi): 2a = K0 (x + K1 x^3)
GELU_TANH_K1 = 0.044715
UNIFORM_KURTOSIS = 1.8
NORMAL_KURTOSIS = 3.0


# ----------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------
def normal_cdf64(x):
    return 0.5 * torch.special.erfc(-x * SQRT_HALF)


def gelu64(x):
    return x * normal_cdf64(x)


def gelu_grad64(g, x, y):
    return g * (normal_cdf64(x) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def gelu_tanh_2a(x):
    return GELU_TANH_K0 * (x + GELU_TANH_K1 * x**3)


def gelu_tanh64(x):
    return x * torch.sigmoid(gelu_tanh_2a(x))


def gelu_tanh_grad64(g, x, y):
    s = torch.sigmoid(gelu_tanh_2a(x))
    return g * (s + x * s * torch.sigmoid(-gelu_tanh_2a(x)) * GELU_TANH_K0 * (1 + 3 * GELU_TANH_K1 * x * x))


# ----------------------------------------------------------------------------------
# init: the distribution a fill must follow
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The distribution a fill must follow: moments, kurtosis (for the variance's standard
    error) and bounds (``hi_open``: the upper bound is excluded)."""

    mean: float
    std: float
    kurtosis: float
    lo: float | None = None
    hi: float | None = None
    hi_open: bool = False


def _std_normal_pdf(z: float) -> float:
    return 0.0 if math.isinf(z) else math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def truncated_normal_target(mean: float, std: float, a: float, b: float) -> Target:
    """Moments of N(mean, std^2) restricted to [a, b], from the raw moments of the standard
    truncated normal: E[Z^k] = (k-1) E[Z^(k-2)] - (beta^(k-1) phi(beta) - alpha^(k-1) phi(alpha)) / Z."""
    alpha, beta = (a - mean) / std, (b - mean) / std
    mass = 0.5 * (math.erfc(-beta * SQRT_HALF) - math.erfc(-alpha * SQRT_HALF))

    def edge(z: float, k: int) -> float:
        return 0.0 if math.isinf(z) else z ** (k - 1) * _std_normal_pdf(z)

    raw = [1.0, (_std_normal_pdf(alpha) - _std_normal_pdf(beta)) / mass]
    for k in (2, 3, 4):
        raw.append((k - 1) * raw[k - 2] - (edge(beta, k) - edge(alpha, k)) / mass)
    m1, m2, m3, m4 = raw[1:]
    var = m2 - m1 * m1
    fourth = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
    return Target(mean + std * m1, std * math.sqrt(var), fourth / var**2, a, b)


def uniform_target(lo: float, hi: float, dtype: torch.dtype = torch.float32) -> Target:
    """U[lo, hi) as torch (and mechgpu) store it in ``dtype``: each draw rounded to the nearest
    value, and a draw that rounds to hi's rounding or above replaced by lo. In bf16 that moves up
    to one ulp's worth of mass from the top to the bottom, which at 33k samples shifts the mean
    by a few standard errors; the moments here are exact sums over the dtype's grid. In fp32
    the effect is below 1e-7 of the range and the continuous moments are used."""
    if dtype == torch.float32:
        return Target((lo + hi) / 2, (hi - lo) / math.sqrt(12), UNIFORM_KURTOSIS, lo, hi, hi_open=True)
    grid = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).double()
    grid = torch.unique(grid[torch.isfinite(grid)])  # sorted; -0 and +0 merge
    middles = (grid[1:] + grid[:-1]) / 2
    inf = torch.tensor([math.inf], dtype=torch.float64)
    left, right = torch.cat([-inf, middles]), torch.cat([middles, inf])
    mass = (right.clamp(max=hi) - left.clamp(min=lo)).clamp(min=0) / (hi - lo)
    top = grid >= torch.tensor(hi, dtype=dtype).item()
    moved = mass[top].sum()
    mass[top] = 0
    mass[grid == torch.tensor(lo, dtype=dtype).item()] += moved
    mean = (mass * grid).sum().item()
    var = (mass * (grid - mean) ** 2).sum().item()
    kurtosis = (mass * (grid - mean) ** 4).sum().item() / var**2
    return Target(mean, math.sqrt(var), kurtosis, lo, hi, hi_open=True)


def xavier_std(shape: tuple[int, ...], gain: float) -> float:
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_std(shape: tuple[int, ...], a: float, mode: str, nonlinearity: str) -> float:
    fan = torch.nn.init._calculate_correct_fan(torch.empty(shape, device="meta"), mode)
    return torch.nn.init.calculate_gain(nonlinearity, a) / math.sqrt(fan)


# ----------------------------------------------------------------------------------
# 8-bit optimizer states: torch's step in float64 between the scheme's dequantize and quantize
# ----------------------------------------------------------------------------------
def quant8_reference_step(optimizer: str, options: dict, p: torch.Tensor, grad: torch.Tensor, state: dict,
                          lr: float, *, quantized: bool = True) -> dict:
    """One step of ``torch.optim.<optimizer>`` in float64 (``foreach=False``) from ``state`` as an
    8-bit optimizer holds it (a key with a ``key + "_absmax"`` twin is dequantized in float64 by
    ``mechgpu.optim.quant8.dequantize``; other tensors are taken as they are): ``{"param": float64,
    key: ..., ...}`` with each new state quantized (uint8 codes and fp32 absmax, float64 rounding by
    ``quant8.quantize``) where ``quantized``, else in float64. The code books are tables of values
    there, not the kernel's bit operations: an independent reference of the same scheme."""
    from mechgpu.kernels.optim_spec import NONNEGATIVE_KEYS
    from mechgpu.optim.quant8 import ABSMAX_SUFFIX, dequantize, quantize

    p64 = p.detach().double().cpu().clone().requires_grad_()
    p64.grad = grad.detach().double().cpu()
    opt = getattr(torch.optim, optimizer)([p64], lr=lr, foreach=False, **options)
    ref_state = {}
    for key, value in state.items():
        if key.endswith(ABSMAX_SUFFIX):
            continue
        if key + ABSMAX_SUFFIX in state:
            ref_state[key] = dequantize(value.cpu(), state[key + ABSMAX_SUFFIX].cpu(), key in NONNEGATIVE_KEYS,
                                        torch.float64)
        else:
            ref_state[key] = value.detach().cpu().clone() if key == "step" else value.detach().double().cpu()
    if ref_state:
        opt.state[p64] = ref_state
    opt.step()
    out = {"param": p64.detach()}
    for key, value in opt.state[p64].items():
        if key == "step":
            continue
        if quantized:
            out[key], out[key + ABSMAX_SUFFIX] = quantize(value, key in NONNEGATIVE_KEYS)
        else:
            out[key] = value
    return out


def quant8_initial_state(optimizer: str, options: dict, p: torch.Tensor) -> dict:
    """The state an 8-bit optimizer's first step starts from, as ``quant8_reference_step`` reads it:
    torch's fresh state (zeros, or Adagrad's ``initial_accumulator_value``) quantized; SGD's is empty
    (torch makes the momentum buffer from the first grad)."""
    from mechgpu.kernels.optim_spec import SPECS
    from mechgpu.optim.quant8 import ABSMAX_SUFFIX, quantize

    if optimizer == "SGD":
        return {}
    state = {"step": torch.tensor(0.0)}
    fill = options.get("initial_accumulator_value", 0.0)
    for s in SPECS[optimizer].states:
        if s.flag is None or SPECS[optimizer].kernel_flags(options).get(s.flag):
            state[s.key], state[s.key + ABSMAX_SUFFIX] = quantize(
                torch.full(p.shape, fill if s.fill else 0.0, dtype=torch.float64), s.nonnegative)
    return state
