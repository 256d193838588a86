"""``mechgpu check``: every kernel against PyTorch's own implementation, on this device.

What is checked (``mechgpu check --list`` prints the case names):

* ``optim.*``: Adam, AdamW (amsgrad), RMSprop (centered, momentum) and SGD (momentum,
  nesterov, dampening) against ``torch.optim`` with ``foreach=False``: fp32 trajectories over
  several steps and two param groups, and bf16/fp16 params where each step must equal
  torch's fp32 step from the same point, rounded once (Adam's and RMSprop's coupled weight
  decay in fp32 only: see ``_low_precision_options``). Then the options: ``max_grad_norm``
  (against ``torch.nn.utils.clip_grad_norm_`` and a torch step), ``skip_nonfinite`` (an
  inf or NaN grad leaves params and states bit for bit), ``master_weights`` (bf16/fp16
  params against torch on fp32 params), ``state_dtype=torch.bfloat16``,
  ``track_update_norm`` (against the float64 norm of p_after - p_before), ``telemetry`` (per
  group ||p||, ||p_after - p_before|| and the non-finite grads, against float64),
  ``torch.amp.GradScaler`` (skipped steps and unscaling, against torch's unfused path) and
  ``state_mutations`` (states replaced, ``.data`` swapped and the state cleared between
  steps, on unaligned and transposed params too, against torch given the same mutations).
* ``clip.*``: ``clip_grad_norm_``, ``get_total_norm`` and ``clip_grads_with_norm_`` for
  norm types 2, 1, inf and 3 in fp32/bf16/fp16, against ``torch.nn.utils``' own functions
  run on float64 copies of the grads; and grads of 1e30, whose squares overflow fp32.
* ``act.*``: relu, leaky_relu, gelu ('none' and 'tanh'), silu, sigmoid and tanh, forward
  and backward, in fp32/bf16/fp16, against float64 torch (with NaN, ±inf, ±0 and a sweep
  of [-20, 20] among the inputs). gelu's oracle is torch's formula written as
  x erfc(-x/sqrt2)/2 (and x sigmoid(2a) for 'tanh'): torch's own 1 + erf(x/sqrt2) cancels
  to 0 below x = -8 even in float64. sigmoid and tanh backward read our saved output, as
  torch's backward reads its own.
* ``init.*``: uniform_, normal_, trunc_normal_, xavier_*, kaiming_* and init_model fill
  NaN-poisoned tensors; every element must be written, within its bounds, and the sample
  mean and variance must lie within 5 standard errors of the values that torch.nn.init's
  formulas imply (``calculate_gain``, ``_calculate_fan_in_and_fan_out``). A bf16/fp16
  uniform fill is compared with U[a, b) as torch stores it in that dtype (``uniform_target``).

Inputs are random, from a new seed each run unless ``--seed`` is given (the seed is
printed), with awkward sizes (1, odd, non-powers of 2, more than one block).

Errors and the pass rule. ``ours`` and the reference ``ref`` are compared in float64,
element by element:

* an element passes when |ours - ref| <= atol + rtol |ref| (activations that are
  ill-conditioned add the change of ref when the input moves by one fp32 ulp, the error
  that fp32 intermediates alone cause);
* NaN and ±inf must sit exactly where the reference, rounded to the result's dtype, has
  them; activations' zero outputs must also have the reference's sign;
* ``max abs err`` is max |ours - ref| over finite elements; ``max rel err`` is
  max |ours - ref| / max(|ref|, atol / rtol): below |ref| = atol/rtol the absolute
  tolerance is what applies, so a passing element has a relative error of at most 2 rtol
  (more only where the ill-conditioning term applies);
* ``err/tol`` is the largest |ours - ref| / (atol + rtol |ref| ...), so a check passes when
  it is at most 1 and nothing else (dtype, NaN/inf pattern, bounds) went wrong;
* statistical checks report |sample - expected| of the mean and std, and ``err/tol`` is
  the larger deviation in standard errors divided by 5.

Tolerances (eps is the dtype's machine epsilon, so rtol = eps allows one ulp):

=========================================  ===========================================
optimizer params, fp32                     rtol 1e-5, atol 1e-6
optimizer params, bf16/fp16                rtol eps, atol one subnormal step, plus one fp32
                                           ulp of |p_before| + |p_after| (against torch's
                                           fp32 step rounded to the dtype)
optimizer states (fp32)                    rtol 1e-5, atol 1e-6 max|state| (over all params)
optimizer states (state_dtype=bf16)        rtol eps(bf16), atol 1e-6 max|state|
clip norms and clipped grads               fp32: rtol 1e-5; bf16/fp16: rtol eps
activations, fp32                          rtol 4 eps (8 eps: gelu/silu backward)
activations, bf16/fp16                     rtol eps; atol 1e-35 (or a subnormal step)
init statistics                            5 standard errors
skip_nonfinite, master = param, ...        exact
=========================================  ===========================================

A case that raises counts as a failure, with its message; the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MIN_TRITON = (3, 2)  # pyproject: triton>=3.2
MIN_COMPUTE_CAPABILITY = (8, 0)
STD_ERRORS = 5.0  # statistical checks: sample moments within this many standard errors
FP32_ULP = 2.0**-23
ACTIVATION_ABS_FLOOR = 1e-35  # fp32 intermediates below the normal range flush to zero on a GPU
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOW_PRECISION = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------
# results and comparison
# ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: a check of one case in one dtype."""

    case: str
    check: str
    dtype: str
    max_abs: float | None
    max_rel: float | None
    tolerance: str
    err_over_tol: float | None
    passed: bool
    note: str = ""


@dataclass
class Errors:
    """Worst errors over one or more comparisons, and what failed."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    err_over_tol: float = 0.0
    failures: list[str] = field(default_factory=list)

    def add(self, other: Errors) -> Errors:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.err_over_tol = max(self.err_over_tol, other.err_over_tol)
        self.failures += other.failures
        return self

    def fail(self, message: str) -> None:
        self.failures.append(message)

    @property
    def passed(self) -> bool:
        return not self.failures


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def subnormal_step(dtype: torch.dtype) -> float:
    """The spacing of the dtype's subnormals: the smallest absolute error a rounding can make."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def measure(ours: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, what: str = "",
            dtype: torch.dtype | None = None, extra: torch.Tensor | None = None,
            zero_sign: bool = False) -> Errors:
    """Compare ``ours`` with ``ref`` in float64 under the pass rule of the module docstring.

    ``dtype``: the dtype ``ours`` must have; the reference is rounded to it to place its
    NaN/inf. ``extra``: a per-element allowance added to the tolerance.
    """
    errs = Errors()
    where = f"{what}: " if what else ""
    if dtype is not None and ours.dtype != dtype:
        errs.fail(f"{where}dtype {ours.dtype}, expected {dtype}")
    if ours.shape != ref.shape:
        errs.fail(f"{where}shape {tuple(ours.shape)}, expected {tuple(ref.shape)}")
        return errs
    got = ours.detach().to("cpu", torch.float64).reshape(-1)
    exp = ref.detach().to("cpu", torch.float64).reshape(-1)
    if got.numel() == 0:
        return errs
    rounded = exp.to(dtype or ours.dtype).double()
    special = (got.isnan() != rounded.isnan()) | (rounded.isinf() & (got != rounded)) \
        | (torch.isfinite(rounded) & got.isinf())
    if zero_sign:
        special |= (got == 0) & (rounded == 0) & (torch.signbit(got) != torch.signbit(rounded))
    if special.any():
        i = int(special.nonzero()[0])
        errs.fail(f"{where}{int(special.sum())} NaN/inf/signed-zero mismatches, first at index {i}: "
                  f"got {got[i].item()!r}, expected {exp[i].item()!r}")
    finite = torch.isfinite(rounded) & torch.isfinite(got)
    diff = torch.where(finite, (got - exp).abs(), torch.zeros_like(got))
    tol = atol + rtol * exp.abs()
    if extra is not None:
        tol = tol + torch.nan_to_num(extra.detach().to("cpu", torch.float64).reshape(-1), nan=0.0, posinf=0.0)
    ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / tol)  # x / 0 = inf: an exact check failed
    floor = atol / rtol if rtol > 0 else 0.0
    scale = exp.abs().clamp_min(floor)
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)
    errs.max_abs = diff.max().item()
    errs.max_rel = rel[finite].max().item() if finite.any() else 0.0
    errs.err_over_tol = ratio.max().item()
    if errs.err_over_tol > 1:
        i = int(ratio.argmax())
        outside = int((ratio > 1).sum())
        errs.fail(f"{where}{outside} of {got.numel()} elements outside tolerance; worst at index {i}: "
                  f"got {got[i].item()!r}, expected {exp[i].item()!r}")
    return errs


def exact_change(before: list[torch.Tensor], after: list[torch.Tensor], what: str) -> Errors:
    """Bit-for-bit equality (NaN equal to NaN); max_abs is the largest change."""
    errs = Errors()
    for i, (b, a) in enumerate(zip(before, after)):
        b64, a64 = b.detach().to("cpu", torch.float64), a.detach().to("cpu", torch.float64)
        same = (b64 == a64) | (b64.isnan() & a64.isnan())
        if not bool(same.all()):
            changed = torch.where(same, torch.zeros_like(b64), (a64 - b64).abs().nan_to_num(nan=math.inf))
            errs.max_abs = max(errs.max_abs, changed.max().item())
            errs.err_over_tol = math.inf
            errs.fail(f"{what} {i}: {int((~same).sum())} elements changed")
    return errs


# ----------------------------------------------------------------------------------
# the case registry and its context
# ----------------------------------------------------------------------------------
@dataclass
class Context:
    """What a case needs: the device, the mode, and reproducible random inputs."""

    device: torch.device
    quick: bool
    seed: int
    case: str = ""

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Tensor sizes: 1, odd, not a power of 2, more than one block (and empty in full runs)."""
        if self.quick:
            return (1, 3, 4097)
        large = (1 << 20) + 3 if self.device.type == "cuda" else 12289  # the interpreter is slow
        return (0, 1, 3, 1000, 4097, large)

    @property
    def steps(self) -> int:
        return 3 if self.quick else 8

    def generator(self) -> torch.Generator:
        """A CPU generator for this case: the run's seed mixed with the case's name."""
        from .._backend import mixed_seed

        return torch.Generator().manual_seed(mixed_seed(self.seed, zlib.crc32(self.case.encode())))

    def randn(self, shape, gen: torch.Generator, *, scale: float = 1.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, scale^2) drawn on the CPU (the same numbers on every device), then moved."""
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(self.device, dtype)

    def row(self, check: str, dtype: torch.dtype | str, errs: Errors, tolerance: str) -> Row:
        dtype_name = DTYPE_NAMES.get(dtype, str(dtype))
        return Row(self.case, check, dtype_name, errs.max_abs, errs.max_rel, tolerance, errs.err_over_tol,
                   errs.passed, "; ".join(errs.failures[:3]))


CaseFn = Callable[[Context], Iterable[Row]]
CASES: dict[str, CaseFn] = {}


def register(name: str, fn: CaseFn) -> CaseFn:
    if name in CASES:
        raise ValueError(f"duplicate check {name!r}")
    CASES[name] = fn
    return fn


def case(name: str) -> Callable[[CaseFn], CaseFn]:
    return lambda fn: register(name, fn)


# ----------------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------------
LR = {"Adam": 1e-2, "AdamW": 1e-2, "RMSprop": 1e-3, "SGD": 1e-2}
OPTIMIZER_CONFIGS = [
    ("Adam", "Adam", {}),
    ("Adam-amsgrad", "Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("Adam-decoupled-maximize", "Adam", {"decoupled_weight_decay": True, "weight_decay": 0.3, "maximize": True,
                                          "betas": (0.8, 0.99), "eps": 1e-6}),
    ("Adam-maximize-betas", "Adam", {"maximize": True, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("Adam-decoupled-amsgrad", "Adam", {"decoupled_weight_decay": True, "weight_decay": 0.3, "amsgrad": True}),
    ("AdamW", "AdamW", {}),
    ("AdamW-amsgrad-maximize", "AdamW", {"amsgrad": True, "maximize": True, "weight_decay": 0.5}),
    ("RMSprop", "RMSprop", {}),
    ("RMSprop-centered", "RMSprop", {"centered": True, "weight_decay": 0.1}),
    ("RMSprop-momentum-maximize", "RMSprop", {"momentum": 0.9, "maximize": True, "alpha": 0.9}),
    ("RMSprop-centered-momentum", "RMSprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1,
                                              "alpha": 0.9, "eps": 1e-4}),
    ("SGD", "SGD", {}),
    ("SGD-momentum", "SGD", {"momentum": 0.9, "weight_decay": 0.1}),
    ("SGD-nesterov", "SGD", {"momentum": 0.9, "nesterov": True, "maximize": True}),
    ("SGD-dampening", "SGD", {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01}),
]
# the optimizers each option is checked with
OPTION_OPTIMIZERS = [("Adam", "Adam", {}), ("AdamW-amsgrad", "AdamW", {"amsgrad": True}),
                     ("RMSprop-momentum", "RMSprop", {"momentum": 0.9}),
                     ("SGD-nesterov", "SGD", {"momentum": 0.9, "nesterov": True})]
FP32_PARAM_RTOL, FP32_PARAM_ATOL = 1e-5, 1e-6
STATE_RTOL, STATE_ATOL_SCALE = 1e-5, 1e-6
FP32_PARAM_TOL = f"rtol {FP32_PARAM_RTOL:g}, atol {FP32_PARAM_ATOL:g}"
STATE_TOL = f"rtol {STATE_RTOL:g}, atol {STATE_ATOL_SCALE:g} max|s|"
STATE_TOL_EXACT = STATE_TOL + " + 2 |torch32 - torch64|"


def one_ulp_tolerance(dtype: torch.dtype) -> tuple[float, float, str]:
    """rtol, atol and its description for 'within one ulp of the rounded reference'."""
    return eps(dtype), subnormal_step(dtype), f"rtol {eps(dtype):.2g} (1 ulp)"


def _optimizers(name: str, ours_params, ref_params, opts: dict, *, groups: bool = False, **ours_options):
    """mechgpu's optimizer and torch's (foreach=False) twin, with the same groups and options."""
    import mechgpu.optim as mo

    def param_groups(params):
        if not groups:
            return params
        half = len(params) // 2
        return [{"params": params[:half]}, {"params": params[half:], "lr": LR[name] * 0.5}]

    ours = getattr(mo, name)(param_groups(ours_params), lr=LR[name], **opts, **ours_options)
    ref = getattr(torch.optim, name)(param_groups(ref_params), lr=LR[name], foreach=False, **opts)
    return ours, ref


def _leaves(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]


def state_errors(ours_opt, ours_params, ref_opt, ref_params, *, rtol: float = STATE_RTOL,
                  state_dtype: torch.dtype = torch.float32, exact_opt=None, exact_params=None) -> Errors:
    """Every optimizer state against torch's (torch's in fp32), with an atol of 1e-6 of the
    state's largest entry over all params (an entry that is a small difference of large terms,
    as a momentum buffer can be, carries rounding errors of the terms' size). With torch's
    float64 twin (``exact_opt`` over ``exact_params``), each element may also differ by twice
    torch's own fp32 error: where a trajectory is ill-conditioned, two correct fp32 runs land
    on either side of the exact value."""
    from mechgpu.optim._fused import MASTER_KEY

    errs = Errors()
    scale: dict[str, float] = {}
    for pr in ref_params:
        for key, value in ref_opt.state[pr].items():
            if key != "step" and torch.is_tensor(value) and value.numel():
                scale[key] = max(scale.get(key, 0.0), value.abs().max().item())
    for i, (po, pr) in enumerate(zip(ours_params, ref_params)):
        ours_state = {k: v for k, v in ours_opt.state[po].items() if k != MASTER_KEY}
        ref_state = ref_opt.state[pr]
        if set(ours_state) != set(ref_state):
            errs.fail(f"param {i}: state keys {sorted(ours_state)}, torch has {sorted(ref_state)}")
            continue
        for key, expected in ref_state.items():
            expected = torch.as_tensor(expected).float()
            if key == "step":
                errs.add(measure(ours_state[key].float().reshape(()), expected.reshape(()), rtol=0.0, atol=0.0,
                                 what=f"param {i} step"))
                continue
            atol = STATE_ATOL_SCALE * scale.get(key, 0.0)
            own_error = None
            if exact_opt is not None:
                exact = exact_opt.state[exact_params[i]][key]
                own_error = 2 * (expected.double() - exact.double()).abs()
            errs.add(measure(ours_state[key], expected, rtol=rtol, atol=atol, dtype=state_dtype, extra=own_error,
                             what=f"param {i} {key}"))
    return errs


def _fp32_param_errors(ours_p: list[torch.Tensor], ref_p: list[torch.Tensor]) -> Errors:
    """fp32 params against torch's, at FP32_PARAM_TOL."""
    errs = Errors()
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        errs.add(measure(a, b, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL, dtype=torch.float32, what=f"param {i}"))
    return errs


def _set_grads(ctx: Context, gen, param_lists: list[list[torch.Tensor]], scale: float = 1.0) -> None:
    """The same random grads for every list: drawn in the first list's dtype, then a copy in
    each param's dtype (so torch's fp32 twin of a bf16 param sees the same bf16 values)."""
    for tensors in zip(*param_lists):
        g = ctx.randn(tensors[0].shape, gen, scale=scale, dtype=tensors[0].dtype)
        for p in tensors:
            p.grad = g.to(p.dtype, copy=True)


def _low_precision_options(name: str, opts: dict) -> dict:
    """The options for the bf16/fp16 runs: Adam's and RMSprop's coupled weight decay is left to
    the fp32 runs. Their first step divides g + wd p by about |g + wd p| + eps, and on the coarse
    bf16/fp16 grids a grad often cancels wd p exactly (g = -0.168, p = 1.68): the step then turns
    on how fp32 rounds g + wd p (with an fma or not), not on the kernel being right."""
    coupled = name == "RMSprop" or (name == "Adam" and not opts.get("decoupled_weight_decay"))
    return {k: v for k, v in opts.items() if not (coupled and k == "weight_decay")}


def _optimizer_case(name: str, opts: dict) -> CaseFn:
    def check(ctx: Context) -> Iterator[Row]:
        gen = ctx.generator()
        # fp32: the trajectories over several steps, two param groups
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ref_p, exact_p = _leaves(ours_p), _leaves(ours_p, torch.float64)
        ours, ref = _optimizers(name, ours_p, ref_p, opts, groups=True)
        exact = _optimizers(name, ours_p, exact_p, opts, groups=True)[1]  # torch in float64
        for _ in range(ctx.steps):
            _set_grads(ctx, gen, [ours_p, ref_p, exact_p])
            ours.step()
            ref.step()
            exact.step()
        params = _fp32_param_errors(ours_p, ref_p)
        yield ctx.row(f"params, {ctx.steps} steps", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row("states", torch.float32, state_errors(ours, ours_p, ref, ref_p, exact_opt=exact,
                                                            exact_params=exact_p), STATE_TOL_EXACT)

        # bf16/fp16 params: each step is torch's fp32 step from the same point, rounded once
        for dtype in LOW_PRECISION:
            rtol, atol, tol = one_ulp_tolerance(dtype)
            ours_p = [ctx.randn(n, gen, dtype=dtype).requires_grad_() for n in ctx.sizes]
            ref_p = _leaves(ours_p, torch.float32)
            ours, ref = _optimizers(name, ours_p, ref_p, _low_precision_options(name, opts))
            params = Errors()
            for _ in range(ctx.steps):
                _set_grads(ctx, gen, [ours_p, ref_p])
                with torch.no_grad():
                    for r, p in zip(ref_p, ours_p):
                        r.copy_(p.float())
                before = [p.detach().float() for p in ours_p]
                ours.step()
                ref.step()
                for i, (a, b, start) in enumerate(zip(ours_p, ref_p, before)):
                    # a step that cancels the param to ~0 carries the fp32 rounding of its operands
                    operands = FP32_ULP * (start.abs() + b.detach().abs())
                    params.add(measure(a, b.detach().to(dtype), rtol=rtol, atol=atol, dtype=dtype, extra=operands,
                                       what=f"param {i}"))
            yield ctx.row("params vs torch fp32 step", dtype, params, f"rtol {rtol:.2g} + 2^-23 |p|")
            yield ctx.row("fp32 states", dtype, state_errors(ours, ours_p, ref, ref_p), STATE_TOL)

    return check


for _case_name, _torch_name, _opts in OPTIMIZER_CONFIGS:
    register(f"optim.{_case_name}", _optimizer_case(_torch_name, _opts))


@case("optim.max_grad_norm")
def _max_grad_norm(ctx: Context) -> Iterator[Row]:
    """Clipping inside the step against torch.nn.utils.clip_grad_norm_ and torch's step."""
    gen = ctx.generator()
    max_norm = 1.5
    for label, name, opts in OPTION_OPTIMIZERS:
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ref_p = _leaves(ours_p)
        ours, ref = _optimizers(name, ours_p, ref_p, opts, groups=True, max_grad_norm=max_norm)
        params, norms, untouched = Errors(), Errors(), Errors()
        for step in range(ctx.steps):
            scale = 1e-3 if step == 1 else 1.0  # a step whose norm is under max_norm: no clipping
            _set_grads(ctx, gen, [ours_p, ref_p], scale=scale)
            given = [p.grad.clone() for p in ours_p]
            ours.step()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref_p, max_norm, foreach=False)
            ref.step()
            norms.add(measure(ours.last_grad_norm.reshape(()), ref_norm.reshape(()), rtol=1e-5, atol=0.0,
                              what="last_grad_norm"))
            untouched.add(exact_change(given, [p.grad for p in ours_p], "grad"))
        params.add(_fp32_param_errors(ours_p, ref_p))
        yield ctx.row(f"{label} params", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row(f"{label} last_grad_norm", torch.float32, norms, "rtol 1e-05")
        yield ctx.row(f"{label} grads not rescaled", torch.float32, untouched, "exact")


def _unaligned_and_transposed(ctx: Context, gen) -> list[torch.Tensor]:
    """Leaf params off the fast path: at storage offset 1 (not 16-byte aligned) and a transposed weight."""
    base = ctx.randn(ctx.sizes[-1] + 1, gen)
    return [base[1:].detach().requires_grad_(), ctx.randn((17, 33), gen).t().detach().requires_grad_()]


# Mutations users make between steps, each applied alike to mechgpu's optimizer and torch's.
def _replace_states(opt, params) -> None:
    for key, value in list(opt.state[params[0]].items()):
        if torch.is_tensor(value):
            opt.state[params[0]][key] = value.clone()


def _swap_data(opt, params) -> None:
    params[-1].data = params[-1].data.clone()


def _clear_state(opt, params) -> None:
    opt.state.clear()


STATE_MUTATIONS = (("states replaced", _replace_states), (".data swapped", _swap_data),
                   ("state cleared", _clear_state))


@case("optim.state_mutations")
def _state_mutations(ctx: Context) -> Iterator[Row]:
    """Steps with STATE_MUTATIONS in between, on aligned, unaligned and transposed params, against
    torch.optim given the same mutations (under compute-sanitizer, a stale address would show here)."""
    gen = ctx.generator()
    for label, name, opts in OPTION_OPTIMIZERS:
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes] + _unaligned_and_transposed(ctx, gen)
        ref_p = _leaves(ours_p)
        ours, ref = _optimizers(name, ours_p, ref_p, opts, max_grad_norm=math.inf)
        for _, mutate in ((None, None),) + STATE_MUTATIONS:
            if mutate is not None:
                mutate(ours, ours_p)
                mutate(ref, ref_p)
            _set_grads(ctx, gen, [ours_p, ref_p])
            for p in ours_p:
                p.grad = torch.empty_like(p).copy_(p.grad)  # the param's strides (the transposed one's)
            ours.step()
            ref.step()
        params = _fp32_param_errors(ours_p, ref_p)
        yield ctx.row(f"{label} params, mutated", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row(f"{label} states", torch.float32, state_errors(ours, ours_p, ref, ref_p), STATE_TOL)


@case("optim.skip_nonfinite")
def _skip_nonfinite(ctx: Context) -> Iterator[Row]:
    """An inf or NaN grad leaves params and states as they were; the next finite step goes through."""
    gen = ctx.generator()
    for label, name, opts in OPTION_OPTIMIZERS:
        params = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ours, _ = _optimizers(name, params, _leaves(params), opts, max_grad_norm=1.0, skip_nonfinite=True)
        _set_grads(ctx, gen, [params])
        ours.step()  # states exist
        before = [p.detach().clone() for p in params]
        states_before = [v.clone() for p in params for v in ours.state[p].values()]
        errs = Errors()
        for bad in (math.inf, -math.inf, math.nan):
            _set_grads(ctx, gen, [params])
            params[-1].grad[params[-1].numel() // 2] = bad
            ours.step()
            if math.isfinite(ours.last_grad_norm.item()):
                errs.fail(f"grad {bad}: last_grad_norm {ours.last_grad_norm.item()} is finite")
            errs.add(exact_change(before, params, f"grad {bad}: param"))
            errs.add(exact_change(states_before, [v for p in params for v in ours.state[p].values()],
                                  f"grad {bad}: state"))
        _set_grads(ctx, gen, [params])
        ours.step()
        if all(torch.equal(p.detach(), b) for p, b in zip(params, before) if p.numel()):
            errs.fail("the finite step after the skipped ones did not move the params")
        yield ctx.row(f"{label} untouched", torch.float32, errs, "exact")


@case("optim.master_weights")
def _master_weights(ctx: Context) -> Iterator[Row]:
    """bf16/fp16 params with fp32 masters follow torch's fp32 trajectory; each param is its master rounded."""
    from mechgpu.optim._fused import MASTER_KEY

    gen = ctx.generator()
    for dtype in LOW_PRECISION:
        for label, name, opts in OPTION_OPTIMIZERS[::2]:
            ours_p = [ctx.randn(n, gen, dtype=dtype).requires_grad_() for n in ctx.sizes]
            ref_p = _leaves(ours_p, torch.float32)
            ours, ref = _optimizers(name, ours_p, ref_p, opts, master_weights=True)
            masters, rounded = Errors(), Errors()
            for _ in range(ctx.steps):
                _set_grads(ctx, gen, [ours_p, ref_p])
                ours.step()
                ref.step()
                rounded.add(exact_change([ours.state[p][MASTER_KEY].to(dtype) for p in ours_p], ours_p, "param"))
            for i, (p, r) in enumerate(zip(ours_p, ref_p)):
                masters.add(measure(ours.state[p][MASTER_KEY], r, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL,
                                    dtype=torch.float32, what=f"master {i}"))
            yield ctx.row(f"{label} master vs torch fp32", dtype, masters, FP32_PARAM_TOL)
            yield ctx.row(f"{label} param=round(master)", dtype, rounded, "exact")


@case("optim.state_dtype_bf16")
def _bf16_states(ctx: Context) -> Iterator[Row]:
    """state_dtype=bf16: from the same params and (bf16) states as torch, one step gives torch's
    fp32 params and its fp32 states rounded to bf16."""
    gen = ctx.generator()
    rtol = eps(torch.bfloat16)
    for label, name, opts in OPTION_OPTIMIZERS:
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ref_p = _leaves(ours_p)
        ours, ref = _optimizers(name, ours_p, ref_p, opts, state_dtype=torch.bfloat16)
        params, states = Errors(), Errors()
        for step in range(ctx.steps):
            _set_grads(ctx, gen, [ours_p, ref_p])
            if step:
                with torch.no_grad():
                    for po, pr in zip(ours_p, ref_p):
                        pr.copy_(po)
                        for key, value in ref.state[pr].items():
                            if key != "step":
                                value.copy_(ours.state[po][key])
            ours.step()
            ref.step()
            for i, (a, b) in enumerate(zip(ours_p, ref_p)):
                params.add(measure(a, b, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL, dtype=torch.float32,
                                   what=f"param {i}"))
            states.add(state_errors(ours, ours_p, ref, ref_p, rtol=rtol, state_dtype=torch.bfloat16))
        yield ctx.row(f"{label} params", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row(f"{label} bf16 states", torch.bfloat16, states, f"rtol {rtol:.2g}, atol 1e-06 max|s|")


@case("optim.track_update_norm")
def _update_norm(ctx: Context) -> Iterator[Row]:
    """last_update_norm against the float64 norm of p_after - p_before over every param."""
    gen = ctx.generator()
    for label, name, opts in OPTION_OPTIMIZERS:
        params = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ours, _ = _optimizers(name, params, _leaves(params), opts, groups=True, track_update_norm=True)
        errs = Errors()
        for _ in range(ctx.steps):
            _set_grads(ctx, gen, [params])
            before = [p.detach().double() for p in params]
            ours.step()
            expected = torch.linalg.vector_norm(torch.cat([(p.detach().double() - b).flatten()
                                                           for p, b in zip(params, before)]))
            errs.add(measure(ours.last_update_norm.double().reshape(()), expected, rtol=1e-5, atol=0.0,
                             what="last_update_norm"))
        yield ctx.row(f"{label} last_update_norm", torch.float32, errs, "rtol 1e-05")


def _stored_value(opt, p: torch.Tensor) -> torch.Tensor:
    """What a step carries forward, in float64: the fp32 master copy, else the param."""
    return opt.state.get(p, {}).get("master_param", p).detach().double().clone()


@case("optim.telemetry")
def _telemetry(ctx: Context) -> Iterator[Row]:
    """telemetry=True, per param group: ||p|| before the step and ||p_after - p_before|| (what the
    step stored: the param, or its fp32 master) against float64, and the non-finite grads counted
    (one NaN and one inf, in a step that then updates those params to NaN)."""
    gen = ctx.generator()
    for dtype, options in ((torch.float32, {}), (torch.bfloat16, {"master_weights": True})):
        for label, name, opts in OPTION_OPTIMIZERS:
            params = [ctx.randn(n, gen, dtype=dtype).requires_grad_() for n in ctx.sizes]
            ours, _ = _optimizers(name, params, _leaves(params), opts, groups=True, telemetry=True, **options)
            norms, counts = Errors(), Errors()
            for step in range(ctx.steps):
                _set_grads(ctx, gen, [params])
                stored = functools.partial(_stored_value, ours)
                before = [stored(p) for p in params]
                poisoned = step == ctx.steps - 1 and max(ctx.sizes) > 1
                if poisoned:
                    big = max(range(len(params)), key=lambda i: params[i].numel())
                    params[big].grad[0], params[big].grad[-1] = math.nan, math.inf
                ours.step()
                for group, figures in zip(ours.param_groups, ours.last_telemetry):
                    index = [i for i, p in enumerate(params) if any(p is q for q in group["params"])]
                    bad = sum(int((~torch.isfinite(params[i].grad)).sum()) for i in index)
                    counts.add(measure(figures["nonfinite_grads"].double().reshape(()),
                                       torch.tensor(float(bad), dtype=torch.float64), rtol=0.0, atol=0.0,
                                       what="nonfinite_grads"))
                    if step == 0 and options:
                        continue  # the masters are made by the first step
                    param_sq = sum((before[i].square().sum() for i in index), torch.zeros((), dtype=torch.float64))
                    norms.add(measure(figures["param_norm"].double().reshape(()), param_sq.sqrt().cpu(),
                                      rtol=1e-5, atol=0.0, what="param_norm"))
                    if not bad:
                        update_sq = sum(((stored(params[i]) - before[i]).square().sum() for i in index),
                                        torch.zeros((), dtype=torch.float64))
                        norms.add(measure(figures["update_norm"].double().reshape(()), update_sq.sqrt().cpu(),
                                          rtol=1e-5, atol=0.0, what="update_norm"))
            tag = f"{label}{' bf16 masters' if options else ''}"
            yield ctx.row(f"{tag} param/update norms", torch.float32, norms, "rtol 1e-05")
            yield ctx.row(f"{tag} non-finite grads", torch.float32, counts, "exact")


@case("optim.grad_scaler")
def _grad_scaler(ctx: Context) -> Iterator[Row]:
    """torch.amp.GradScaler hands the kernel grad_scale and found_inf: the same steps are skipped
    as in torch's unfused path (unscale_, then no step on inf), and the params agree."""
    gen = ctx.generator()
    steps = ctx.steps + 2
    for label, name, opts in OPTION_OPTIMIZERS[::3]:
        start = [ctx.randn(n, gen) for n in ctx.sizes]
        targets = [ctx.randn(n, gen) for n in ctx.sizes]
        # the grads are scale * (p - t): a first scale 2 to 4 times too large overflows them for
        # certain on the first step and very likely on the second (half the scale), not after
        largest = max((s - t).abs().max().item() for s, t in zip(start, targets) if s.numel())
        init_scale = 2.0 ** (math.floor(math.log2(torch.finfo(torch.float32).max / largest)) + 2)
        ours_p, ref_p = _leaves(start), _leaves(start)
        ours, ref = _optimizers(name, ours_p, ref_p, opts)
        skipped = {}
        errs = Errors()
        for who, opt, params in (("ours", ours, ours_p), ("torch", ref, ref_p)):
            scaler = torch.amp.GradScaler(ctx.device.type, init_scale=init_scale, growth_interval=2)
            skipped[who] = []
            for _ in range(steps):
                loss = sum(0.5 * ((p - t) ** 2).sum() for p, t in zip(params, targets))
                scaler.scale(loss).backward()
                scaler.step(opt)
                skipped[who].append(sum(v.item() for v in scaler._found_inf_per_device(opt).values()) > 0)
                scaler.update()
                opt.zero_grad()
        if skipped["ours"] != skipped["torch"]:
            errs.fail(f"skipped steps {skipped['ours']}, torch skipped {skipped['torch']}")
        if not any(skipped["ours"]) or all(skipped["ours"]):
            errs.fail(f"the scale should overflow on the first steps only; skipped {skipped['ours']}")
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            errs.add(measure(a, b, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL, dtype=torch.float32,
                             what=f"param {i}"))
        yield ctx.row(f"{label} params, {sum(skipped['ours'])} of {steps} skipped", torch.float32, errs,
                      FP32_PARAM_TOL)


# ----------------------------------------------------------------------------------
# clipping
# ----------------------------------------------------------------------------------
CLIP_NORM_TYPES = {"norm2": 2.0, "norm1": 1.0, "norm_inf": math.inf, "norm_-inf": -math.inf, "norm3": 3.0,
                   "norm3.5": 3.5, "norm0.5": 0.5, "norm-1": -1.0, "norm-2.5": -2.5}


def norm_tolerance(dtype: torch.dtype) -> tuple[float, float, str]:
    """A norm or clipped grad: fp32 to accumulation error, bf16/fp16 to one rounding."""
    if dtype == torch.float32:
        return 1e-5, subnormal_step(dtype), "rtol 1e-05"
    return one_ulp_tolerance(dtype)


def _params_with_grads(grads: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Zero params holding copies of ``grads`` (in ``dtype``, default the grads' own)."""
    params = []
    for g in grads:
        p = torch.zeros(g.shape, dtype=dtype or g.dtype, device=g.device, requires_grad=True)
        p.grad = g.to(dtype or g.dtype).clone()
        params.append(p)
    return params


def _clip_case(norm_type: float) -> CaseFn:
    def check(ctx: Context) -> Iterator[Row]:
        import mechgpu

        gen = ctx.generator()
        # torch rejects the norm of an empty tensor where the reduction has no identity (p = ±inf, p < 0)
        sizes = [n for n in ctx.sizes if n or (math.isfinite(norm_type) and norm_type > 0)]
        for dtype in ctx.dtypes:
            rtol, atol, tol = norm_tolerance(dtype)
            grads = [ctx.randn(n, gen, scale=3.0, dtype=dtype) for n in sizes]

            ref_p = _params_with_grads(grads, torch.float64)
            ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref_p], norm_type, foreach=False)
            max_norm = 0.5 * ref_norm.item()  # so that clipping happens
            torch.nn.utils.clip_grad_norm_(ref_p, max_norm, norm_type, foreach=False)
            ours_p = _params_with_grads(grads)
            norm = mechgpu.clip_grad_norm_(ours_p, max_norm, norm_type)
            yield ctx.row("clip_grad_norm_: norm", dtype, measure(norm, ref_norm, rtol=rtol, atol=atol, dtype=dtype),
                          tol)
            clipped = Errors()
            for i, (a, b) in enumerate(zip(ours_p, ref_p)):
                clipped.add(measure(a.grad, b.grad, rtol=rtol, atol=atol, dtype=dtype, what=f"grad {i}"))
            yield ctx.row("clip_grad_norm_: grads", dtype, clipped, tol)

            total = mechgpu.get_total_norm([g.clone() for g in grads], norm_type)
            yield ctx.row("get_total_norm", dtype, measure(total, ref_norm, rtol=rtol, atol=atol, dtype=dtype), tol)

            ours_p, ref_p = _params_with_grads(grads), _params_with_grads(grads, torch.float64)
            given = ref_norm.to(dtype)
            mechgpu.clip_grads_with_norm_(ours_p, max_norm, given)
            torch.nn.utils.clip_grads_with_norm_(ref_p, max_norm, given.double(), foreach=False)
            clipped = Errors()
            for i, (a, b) in enumerate(zip(ours_p, ref_p)):
                clipped.add(measure(a.grad, b.grad, rtol=rtol, atol=atol, dtype=dtype, what=f"grad {i}"))
            yield ctx.row("clip_grads_with_norm_: grads", dtype, clipped, tol)

    return check


for _case_name, _norm_type in CLIP_NORM_TYPES.items():
    register(f"clip.{_case_name}", _clip_case(_norm_type))


@case("clip.large_grads")
def _large_grads(ctx: Context) -> Iterator[Row]:
    """|g| ~ 1e30: g^2 overflows fp32, the norm must not."""
    import mechgpu

    gen = ctx.generator()
    grads = [ctx.randn(n, gen, scale=1e30) for n in ctx.sizes if n]  # the inf norm of an empty tensor is an error
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        expected = torch.nn.utils.get_total_norm([g.double() for g in grads], norm_type, foreach=False)
        got = mechgpu.get_total_norm(grads, norm_type)
        yield ctx.row(f"get_total_norm p={norm_type:g}", torch.float32,
                      measure(got, expected, rtol=1e-5, atol=0.0, dtype=torch.float32), "rtol 1e-05")


# ----------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------
SQRT_HALF = math.sqrt(0.5)
GELU_TANH_K0 = math.sqrt(8 / math.pi)  # 2 sqrt(2/pi): 2a = K0 (x + K1 x^3)
GELU_TANH_K1 = 0.044715
LEAKY_SLOPE = 0.01


def normal_cdf64(x):
    return 0.5 * torch.special.erfc(-x * SQRT_HALF)


def gelu_tanh_2a(x):
    return GELU_TANH_K0 * (x + GELU_TANH_K1 * x**3)


def gelu_tanh_grad64(g, x, y):
    s = torch.sigmoid(gelu_tanh_2a(x))
    return g * (s + x * s * torch.sigmoid(-gelu_tanh_2a(x)) * GELU_TANH_K0 * (1 + 3 * GELU_TANH_K1 * x * x))


@dataclass(frozen=True)
class Activation:
    """An activation, its float64 oracles and how exactly it can be computed in fp32."""

    name: str
    call: Callable  # (mechgpu.nn.functional, x) -> y
    forward64: Callable  # x64 -> y64
    backward64: Callable  # (g64, x64, y64) -> dx64; y is our forward's output
    fp32_backward_ulps: int = 4
    ill_conditioned_forward: bool = False  # fp32 intermediates carry one ulp of the input's rounding
    ill_conditioned_backward: bool = False


ATEN = torch.ops.aten
ACTIVATIONS = [
    Activation("relu", lambda mf, x: mf.relu(x), torch.relu,
               lambda g, x, y: ATEN.threshold_backward(g, x, 0)),
    Activation("leaky_relu", lambda mf, x: mf.leaky_relu(x, LEAKY_SLOPE),
               lambda x: torch.nn.functional.leaky_relu(x, LEAKY_SLOPE),
               lambda g, x, y: ATEN.leaky_relu_backward(g, x, LEAKY_SLOPE, False)),
    Activation("gelu", lambda mf, x: mf.gelu(x), lambda x: x * normal_cdf64(x),
               lambda g, x, y: g * (normal_cdf64(x) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)),
               fp32_backward_ulps=8, ill_conditioned_backward=True),
    Activation("gelu_tanh", lambda mf, x: mf.gelu(x, approximate="tanh"),
               lambda x: x * torch.sigmoid(gelu_tanh_2a(x)), gelu_tanh_grad64,
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
    return act.fp32_backward_ulps if direction == "backward" else 4


def _activation_case(act: Activation) -> CaseFn:
    def check(ctx: Context) -> Iterator[Row]:
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

    return check


for _act in ACTIVATIONS:
    register(f"act.{_act.name}", _activation_case(_act))


# ----------------------------------------------------------------------------------
# init: sample statistics against what torch.nn.init's formulas imply
# ----------------------------------------------------------------------------------
UNIFORM_KURTOSIS = 1.8
NORMAL_KURTOSIS = 3.0


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


def sample_errors(x: torch.Tensor, target: Target, what: str = "") -> Errors:
    """Every element written (no NaN poison left), inside the bounds (rounded to x's dtype), and
    the sample mean and variance within STD_ERRORS standard errors of the target's."""
    errs = Errors()
    where = f"{what}: " if what else ""
    values = x.detach().to("cpu", torch.float64).reshape(-1)
    n = values.numel()
    unwritten = int((~torch.isfinite(values)).sum())
    if unwritten:
        errs.fail(f"{where}{unwritten} of {n} elements not written")
        errs.err_over_tol = math.inf
        return errs
    if target.lo is not None:
        lo = torch.tensor(target.lo, dtype=x.dtype).item()
        hi = torch.tensor(target.hi, dtype=x.dtype).item()
        low, high = values.min().item(), values.max().item()
        if low < lo or high > hi or (target.hi_open and high >= hi):
            errs.fail(f"{where}values in [{low:.6g}, {high:.6g}], outside [{lo:.6g}, {hi:.6g}"
                      f"{')' if target.hi_open else ']'}")
    mean, var = values.mean().item(), values.var().item()
    mean_se = target.std / math.sqrt(n)
    var_se = target.std**2 * math.sqrt((target.kurtosis - 1) / n)
    z_mean, z_var = abs(mean - target.mean) / mean_se, abs(var - target.std**2) / var_se
    errs.max_abs = max(abs(mean - target.mean), abs(math.sqrt(var) - target.std))
    errs.max_rel = errs.max_abs / target.std
    errs.err_over_tol = max(z_mean, z_var) / STD_ERRORS
    if z_mean > STD_ERRORS:
        errs.fail(f"{where}mean {mean:.6g}, expected {target.mean:.6g} ({z_mean:.1f} standard errors, n={n})")
    if z_var > STD_ERRORS:
        errs.fail(f"{where}std {math.sqrt(var):.6g}, expected {target.std:.6g} "
                  f"(variance off by {z_var:.1f} standard errors, n={n})")
    return errs


def _init_shapes(ctx: Context) -> list[tuple[int, ...]]:
    """A non-power-of-2 Linear weight, and in full runs a Conv2d one."""
    return [(257, 129)] if ctx.quick else [(257, 129), (33, 17, 3, 3)]


def _init_case(fill: Callable, target: Callable) -> CaseFn:
    """``fill(mechgpu.init, tensor, generator, label)`` against the Targets of
    ``target(ctx, shape, dtype) -> [(label, Target)]``."""

    def check(ctx: Context) -> Iterator[Row]:
        import mechgpu.init as mi

        gen = ctx.generator()
        for dtype in ctx.dtypes:
            errs = Errors()
            for shape in _init_shapes(ctx):
                for label, expected in target(ctx, shape, dtype):
                    tensor = torch.full(shape, math.nan, dtype=dtype, device=ctx.device)
                    fill(mi, tensor, gen, label)
                    errs.add(sample_errors(tensor, expected, f"{'x'.join(map(str, shape))} {label}".strip()))
            yield ctx.row("mean, std, bounds", dtype, errs, f"{STD_ERRORS:g} s.e.")

    return check


def _xavier_std(shape: tuple[int, ...], gain: float) -> float:
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def _kaiming_std(shape: tuple[int, ...], a: float, mode: str, nonlinearity: str) -> float:
    fan = torch.nn.init._calculate_correct_fan(torch.empty(shape, device="meta"), mode)
    return torch.nn.init.calculate_gain(nonlinearity, a) / math.sqrt(fan)


TANH_GAIN = torch.nn.init.calculate_gain("tanh")
TRUNC_NORMAL_ARGS = {"": (0.3, 1.0, -1.2, 1.5), "tail": (0.0, 2.0, 2.0, 8.0)}
KAIMING_ARGS = {"": (0.0, "fan_in", "relu"), "leaky fan_out": (0.2, "fan_out", "leaky_relu")}

register("init.uniform_", _init_case(
    lambda mi, t, gen, _: mi.uniform_(t, -0.7, 1.3, generator=gen),
    lambda ctx, shape, dtype: [("", uniform_target(-0.7, 1.3, dtype))]))
register("init.normal_", _init_case(
    lambda mi, t, gen, _: mi.normal_(t, 0.5, 2.0, generator=gen),
    lambda ctx, shape, dtype: [("", Target(0.5, 2.0, NORMAL_KURTOSIS))]))
register("init.trunc_normal_", _init_case(
    lambda mi, t, gen, label: mi.trunc_normal_(t, *TRUNC_NORMAL_ARGS[label], generator=gen),
    lambda ctx, shape, dtype: [(label, truncated_normal_target(*args)) for label, args in TRUNC_NORMAL_ARGS.items()
                               if label == "" or not ctx.quick]))
register("init.xavier_uniform_", _init_case(
    lambda mi, t, gen, _: mi.xavier_uniform_(t, gain=TANH_GAIN, generator=gen),
    lambda ctx, shape, dtype: [("", uniform_target(-math.sqrt(3) * _xavier_std(shape, TANH_GAIN),
                                                   math.sqrt(3) * _xavier_std(shape, TANH_GAIN), dtype))]))
register("init.xavier_normal_", _init_case(
    lambda mi, t, gen, _: mi.xavier_normal_(t, gain=TANH_GAIN, generator=gen),
    lambda ctx, shape, dtype: [("", Target(0.0, _xavier_std(shape, TANH_GAIN), NORMAL_KURTOSIS))]))
register("init.kaiming_uniform_", _init_case(
    lambda mi, t, gen, label: mi.kaiming_uniform_(t, *KAIMING_ARGS[label], generator=gen),
    lambda ctx, shape, dtype: [(label, uniform_target(-math.sqrt(3) * _kaiming_std(shape, *args),
                                                      math.sqrt(3) * _kaiming_std(shape, *args), dtype))
                               for label, args in KAIMING_ARGS.items()]))
register("init.kaiming_normal_", _init_case(
    lambda mi, t, gen, label: mi.kaiming_normal_(t, *KAIMING_ARGS[label], generator=gen),
    lambda ctx, shape, dtype: [(label, Target(0.0, _kaiming_std(shape, *args), NORMAL_KURTOSIS))
                               for label, args in KAIMING_ARGS.items()]))


@case("init.init_model")
def _init_model(ctx: Context) -> Iterator[Row]:
    """init_model: He's rule before ReLU, Glorot's with tanh's gain before Tanh and gain 1 at the
    end (torch.nn.init's gains and fans), biases zeroed, everything written."""
    from torch import nn

    import mechgpu.init as mi

    gen = ctx.generator()
    sizes = (129, 257, 65, 10)
    stds = [torch.nn.init.calculate_gain("relu") / math.sqrt(sizes[0]),
            _xavier_std((sizes[2], sizes[1]), TANH_GAIN), _xavier_std((sizes[3], sizes[2]), 1.0)]
    for dtype in ctx.dtypes:
        weights, biases = Errors(), Errors()
        for distribution in ("normal", "uniform"):
            model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]), nn.Tanh(),
                                  nn.Linear(sizes[2], sizes[3])).to(ctx.device, dtype)
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
            mi.init_model(model, distribution=distribution, generator=gen)
            for layer, std in zip(model[::2], stds):
                bound = math.sqrt(3) * std
                target = Target(0.0, std, NORMAL_KURTOSIS)
                if distribution == "uniform":
                    target = uniform_target(-bound, bound, dtype)
                weights.add(sample_errors(layer.weight, target, f"{distribution} {tuple(layer.weight.shape)}"))
                biases.add(exact_change([torch.zeros_like(layer.bias)], [layer.bias], f"{distribution} bias"))
        yield ctx.row("weights: mean, std, bounds", dtype, weights, f"{STD_ERRORS:g} s.e.")
        yield ctx.row("biases zeroed", dtype, biases, "exact")


# ----------------------------------------------------------------------------------
# running the cases
# ----------------------------------------------------------------------------------
def families() -> list[str]:
    """The kernel families, in the order their cases run: optim, clip, act, init."""
    return list(dict.fromkeys(name.split(".")[0] for name in CASES))


def select_cases(only: Iterable[str] | None = None, *, exact: bool = False) -> list[str]:
    """The case names containing any of ``only``, ignoring case (equal to one, with ``exact``; all
    when empty); ValueError when none does."""
    only = list(only or [])
    names = [name for name in CASES
             if not only or any(part == name if exact else part.lower() in name.lower() for part in only)]
    if not names:
        raise ValueError(f"no check name contains {' or '.join(map(repr, only))}; "
                         "`mechgpu check --list` prints the names")
    return names


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def _describe(exc: BaseException) -> str:
    """The exception and the innermost frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}"


def run_checks(device: str | torch.device, quick: bool = False, only: Iterable[str] | None = None,
               seed: int | None = None, report: Callable[[Row], None] | None = None, *,
               exact: bool = False) -> list[Row]:
    """Run the selected cases (``select_cases``) on ``device`` and return their rows (``report``
    sees each as it comes).

    On a CPU the kernels need TRITON_INTERPRET=1 set before triton was imported; without it
    mechgpu would quietly run torch's own code, so that raises instead.
    """
    from .._backend import kernels_run_on

    device = torch.device(device)
    if not kernels_run_on(device):
        raise RuntimeError(f"mechgpu's kernels cannot run on {device}: on a CPU they need TRITON_INTERPRET=1 "
                           "set before triton is imported (`mechgpu check --device cpu` does that)")
    names = select_cases(only, exact=exact)
    seed = fresh_seed() if seed is None else seed
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow in the interpreter on inf inputs
        for name in names:
            ctx = Context(device, quick, seed, name)
            produced = []
            try:
                for row in CASES[name](ctx):
                    produced.append(row)
                    if report:
                        report(row)
            except Exception as exc:  # a crash is a failure of this case, not of the run
                row = Row(name, "raised an exception", "-", None, None, "-", None, False, _describe(exc))
                produced.append(row)
                if report:
                    report(row)
            rows += produced
    return rows


# ----------------------------------------------------------------------------------
# the environment header
# ----------------------------------------------------------------------------------
def triton_version_problem(version: str | None) -> str | None:
    """Why this triton cannot run mechgpu (None: missing), or None when it can."""
    if version is None:
        return ("mechgpu check: triton is not installed; mechgpu's kernels need triton>="
                f"{'.'.join(map(str, MIN_TRITON))} (pip install 'triton>={'.'.join(map(str, MIN_TRITON))}')")
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and tuple(map(int, match.groups())) < MIN_TRITON:
        return (f"mechgpu check: triton {version} is too old; mechgpu needs triton>="
                f"{'.'.join(map(str, MIN_TRITON))} (pip install -U 'triton>={'.'.join(map(str, MIN_TRITON))}')")
    return None


def installed_triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no nvidia-smi)"


def environment(device: str | torch.device) -> dict:
    """Device, driver, CUDA runtime and library versions, for the header and the JSON."""
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "triton": installed_triton_version(),
            "python": platform.python_version(), "cuda_runtime": torch.version.cuda or "none (CPU build of torch)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(device_name=torch.cuda.get_device_name(device), driver=_nvidia_driver(),
                    compute_capability=f"{major}.{minor}", interpreter=False)
    else:
        info.update(device_name=f"{_cpu_name()} ({os.cpu_count()} logical cores)", driver="n/a (CPU)",
                    compute_capability=None, interpreter=True)
    return info


def _header_lines(env: dict, seed: int, quick: bool) -> list[str]:
    lines = [f"device        {env['device']}: {env['device_name']}",
             f"driver        {env['driver']}",
             f"CUDA runtime  {env['cuda_runtime']}",
             f"torch         {env['torch']}",
             f"triton        {env['triton']}",
             f"python        {env['python']}"]
    if env["compute_capability"]:
        lines.append(f"compute cap.  {env['compute_capability']}")
    if env["interpreter"]:
        lines.append("note          the kernels run in Triton's interpreter on the CPU: slow, for correctness only")
    lines.append(f"mode          {'quick' if quick else 'full'}")
    lines.append(f"seed          {seed} (repeat this run with --seed {seed})")
    return lines


# ----------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------
def _number(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}" if math.isfinite(x) else str(x)


class TablePrinter:
    """Prints rows as they arrive, in fixed columns."""

    COLUMNS = (("check", 36), ("dtype", 5), ("max abs err", 11), ("max rel err", 11), ("tolerance", 30),
               ("err/tol", 8), ("result", 6))

    def __init__(self, case_width: int, out=None) -> None:
        self.case_width = max(case_width, len("case"))
        self.out = out or sys.stdout

    def _line(self, cells: list[str]) -> str:
        widths = [self.case_width] + [w for _, w in self.COLUMNS]
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    def header(self) -> None:
        print(self._line(["case"] + [name for name, _ in self.COLUMNS]), file=self.out)
        print(self._line(["-" * self.case_width] + ["-" * w for _, w in self.COLUMNS]), file=self.out)

    def row(self, row: Row) -> None:
        cells = [row.case, row.check, row.dtype, _number(row.max_abs), _number(row.max_rel), row.tolerance,
                 _number(row.err_over_tol), "ok" if row.passed else "FAIL"]
        print(self._line(cells), file=self.out, flush=True)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, env: dict, seed: int, quick: bool, rows: list[Row], seconds: float) -> None:
    """The header, the summary and every row; non-finite errors are written as strings."""
    failed = sum(not r.passed for r in rows)
    doc = {"environment": env, "seed": seed, "quick": quick, "checks": len(rows), "failed": failed,
           "seconds": round(seconds, 2), "rows": [asdict(r) for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_json_safe(doc), indent=1) + "\n")


# ----------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mechgpu check``'s options (imports nothing: triton must not be loaded yet)."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and steps (CI: well under a minute on a CPU in the interpreter)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu (kernels in triton's interpreter)")
    parser.add_argument("--only", action="append", default=None, metavar="SUBSTR",
                        help="run the cases whose name contains SUBSTR, ignoring case (may be given several times; "
                             "--list prints the names)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the environment and every row as JSON to PATH")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")


def run(args: argparse.Namespace, select_device: Callable[[str | None], str]) -> int:
    """The ``mechgpu check`` command: 0 when every check passes, 1 on a failure, 2 when it cannot run."""
    if args.list:
        for name in CASES:
            print(name)
        return 0
    try:
        names = select_cases(args.only)
    except ValueError as exc:
        print(f"mechgpu check: {exc}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mechgpu check: --device cuda was asked for, but torch sees no CUDA device "
              f"(torch {torch.__version__}, CUDA runtime {torch.version.cuda or 'none: a CPU build'})", file=sys.stderr)
        return 2
    device = select_device(args.device)
    problem = triton_version_problem(installed_triton_version())
    if problem:
        print(problem, file=sys.stderr)
        return 2

    env = environment(device)
    seed = fresh_seed() if args.seed is None else args.seed
    print("mechgpu check: every kernel against PyTorch's own implementation")
    for line in _header_lines(env, seed, args.quick):
        print(line)
    if device == "cuda":
        capability = tuple(map(int, env["compute_capability"].split(".")))
        if capability < MIN_COMPUTE_CAPABILITY:
            print(f"warning: compute capability {env['compute_capability']} is below "
                  f"{'.'.join(map(str, MIN_COMPUTE_CAPABILITY))}; mechgpu's kernels are built for sm_80 and "
                  "newer (bf16 needs it), so some checks may fail here")
    print()

    table = TablePrinter(max(len(n) for n in names))
    table.header()
    start = time.perf_counter()
    try:
        rows = run_checks(device, quick=args.quick, only=args.only, seed=seed, report=table.row)
    except RuntimeError as exc:
        print(f"mechgpu check: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    failed = [r for r in rows if not r.passed]
    if failed:
        print("\nfailures:")
        for r in failed:
            print(f"  {r.case} / {r.check} / {r.dtype}: {r.note}")
    print(f"\n{len(rows)} checks, {len(failed)} failed ({seconds:.1f} s)")
    if args.json:
        write_json(args.json, env, seed, args.quick, rows, seconds)
        print(f"wrote {args.json}")
    return 1 if failed else 0
