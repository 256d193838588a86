"""The activation cases: relu, leaky_relu, gelu ('none' and 'tanh'), silu, sigmoid and tanh,
forward and backward, in fp32/bf16/fp16, against float64 torch (``oracles``), with NaN, ±inf, ±0
and a sweep of [-20, 20] among the inputs. sigmoid and tanh backward read our saved output, as
torch's backward reads its own."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .compare import ACTIVATION_ABS_FLOOR, ACTIVATION_FP32_ULPS, FP32_ULP, Errors, Row, eps, measure, subnormal_step
from .oracles import gelu64, gelu_grad64, gelu_tanh64, gelu_tanh_grad64
from .registry import Case, Context

LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class Activation:
    """An activation, its float64 oracles and how exactly it can be computed in fp32."""

    name: str
    call: Callable  # (mechgpu.nn.functional, x) -> y
    forward64: Callable  # x64 -> y64
    backward64: Callable  # (g64, x64, y64) -> dx64; y is our forward's output
    fp32_backward_ulps: int = ACTIVATION_FP32_ULPS
    ill_conditioned_forward: bool = False  # fp32 intermediates carry one ulp of the input's rounding
    ill_conditioned_backward: bool = False


ATEN = torch.ops.aten
ACTIVATIONS = [
    Activation("relu", lambda mf, x: mf.relu(x), torch.relu,
               lambda g, x, y: ATEN.threshold_backward(g, x, 0)),
    Activation("leaky_relu", lambda mf, x: mf.leaky_relu(x, LEAKY_SLOPE),
               lambda x: torch.nn.functional.leaky_relu(x, LEAKY_SLOPE),
               lambda g, x, y: ATEN.leaky_relu_backward(g, x, LEAKY_SLOPE, False)),
    Activation("gelu", lambda mf, x: mf.gelu(x), gelu64, gelu_grad64,
               fp32_backward_ulps=8, ill_conditioned_backward=True),
    Activation("gelu_tanh", lambda mf, x: mf.gelu(x, approximate="tanh"),
               gelu_tanh64, gelu_tanh_grad64,
               fp32_backward_ulps=8, ill_conditioned_forward=True, ill_conditioned_backward=True),
    Activation("silu", lambda mf, x: mf.silu(x), torch.nn.functional.silu,
               lambda g, x, y: ATEN.silu_backward(g, x), fp32_backward_ulps=8, ill_conditioned_backward=True),
    Activation("sigmoid", lambda mf, x: mf.sigmoid(x), torch.sigmoid,
               lambda g, x, y: ATEN.sigmoid_backward(g, y)),
    Activation("tanh", lambda mf, x: mf.tanh(x), torch.tanh, lambda g, x, y: ATEN.tanh_backward(g, y)),
]


def _input_rounding_allowance(fn: Callable, x64: torch.Tensor) -> torch.Tensor:
    """How much fn's float64 value moves when x moves by one fp32 ulp either way."""
    base = fn(x64)
    return sum((fn(x64 * (1 + sign * FP32_ULP)) - base).abs() for sign in (1.0, -1.0))


def _backward_at(act: Activation, g64: torch.Tensor, x64: torch.Tensor) -> torch.Tensor:
    """The float64 backward at x for the upstream g (for the functions that do not read y)."""
    return act.backward64(g64, x64, None)


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """NaN, ±inf, ±0 (the breakpoint), ±max, ±tiny and large and small magnitudes, in float64."""
    info = torch.finfo(dtype)
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e4, -1e4, 1.0, -1.0, info.tiny, -info.tiny,
              1e-3, -1e-3, 20.0, -20.0, info.max, -info.max]
    if dtype != torch.float16:
        values += [1e20, -1e20, 1e-30, -1e-30, 100.0, -100.0]
    return torch.tensor(values, dtype=torch.float64)


def _special_inputs(dtype: torch.dtype, dense: bool) -> torch.Tensor:
    """The special values, a sweep of [-20, 20] (dense in full runs) and, in full runs, tiny magnitudes."""
    parts = [special_values(dtype), torch.linspace(-20, 20, 8001 if dense else 321, dtype=torch.float64)]
    if dense:
        tiny = torch.logspace(-30, 1.3, 600, dtype=torch.float64)
        parts += [tiny, -tiny]
    return torch.cat(parts)


def activation_ulps(act: Activation, dtype: torch.dtype, direction: str) -> int:
    """The relative tolerance of an activation, in ulps of ``dtype``: 4 in fp32 (``fp32_backward_ulps``
    for the backward), 1 in bf16/fp16 (the kernel rounds its fp32 result once)."""
    if dtype != torch.float32:
        return 1
    return act.fp32_backward_ulps if direction == "backward" else ACTIVATION_FP32_ULPS


def _forward_backward(act: Activation, ctx: Context) -> Iterator[Row]:
    """Forward and backward on random and special inputs, against the float64 oracles."""
    from mechgpu.nn import functional as mf

    gen = ctx.generator()
    for dtype in ctx.dtypes:
        inputs = [ctx.randn(n, gen, scale=3.0, dtype=dtype) for n in ctx.sizes]
        inputs.append(_special_inputs(dtype, dense=not ctx.quick).to(ctx.device, dtype))
        if not ctx.quick:
            inputs.append(ctx.randn((65, 33), gen, scale=3.0, dtype=dtype).t())  # not contiguous
        forward_ulps = activation_ulps(act, dtype, "forward")
        backward_ulps = activation_ulps(act, dtype, "backward")
        atol = max(ACTIVATION_ABS_FLOOR, subnormal_step(dtype))
        forward, backward = Errors(), Errors()
        for x in inputs:
            x = x.detach().requires_grad_()
            g = ctx.randn(x.shape, gen, dtype=dtype)
            y = act.call(mf, x)
            (dx,) = torch.autograd.grad(y, x, g)
            x64, y64, g64 = x.detach().double(), y.detach().double(), g.double()
            extra = _input_rounding_allowance(act.forward64, x64) if act.ill_conditioned_forward else None
            forward.add(measure(y, act.forward64(x64), rtol=forward_ulps * eps(dtype), atol=atol, dtype=dtype,
                                extra=extra, zero_sign=True, what=f"shape {tuple(x.shape)}"))
            extra = None
            if act.ill_conditioned_backward:
                extra = _input_rounding_allowance(functools.partial(_backward_at, act, g64), x64)
            backward.add(measure(dx, act.backward64(g64, x64, y64), rtol=backward_ulps * eps(dtype), atol=atol,
                                 dtype=dtype, extra=extra, what=f"shape {tuple(x.shape)}"))
        cond = " + cond" if act.ill_conditioned_forward else ""
        yield ctx.row("forward", dtype, forward, f"rtol {forward_ulps * eps(dtype):.2g}, atol {atol:.2g}{cond}")
        cond = " + cond" if act.ill_conditioned_backward else ""
        yield ctx.row("backward", dtype, backward,
                      f"rtol {backward_ulps * eps(dtype):.2g}, atol {atol:.2g}{cond}")


CASES = tuple(Case(f"act.{a.name}", functools.partial(_forward_backward, a)) for a in ACTIVATIONS)
