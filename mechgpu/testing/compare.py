"""Comparison for the case database: rows, errors, the pass rule and the tolerances.

``ours`` and the reference ``ref`` are compared in float64, element by element:

* an element passes when |ours - ref| <= atol + rtol |ref| (plus a per-element allowance where a
  case passes one: the ill-conditioning of an activation, fp32 rounding of a step's operands);
* NaN and ±inf must sit exactly where the reference, rounded to the result's dtype, has them;
  activations' zero outputs must also have the reference's sign;
* ``max abs err`` is max |ours - ref| over finite elements; ``max rel err`` is
  max |ours - ref| / max(|ref|, atol / rtol): below |ref| = atol/rtol the absolute tolerance is
  what applies, so a passing element has a relative error of at most 2 rtol (more only where an
  allowance applies);
* ``err/tol`` is the largest |ours - ref| / (atol + rtol |ref| + allowance), so a check passes when
  it is at most 1 and nothing else (dtype, NaN/inf pattern, bounds) went wrong;
* statistical checks report |sample - expected| of the mean and std, and ``err/tol`` is the larger
  deviation in standard errors divided by ``STD_ERRORS``.

The tolerances (eps is the dtype's machine epsilon, so rtol = eps allows one ulp):

=========================================  ===========================================
optimizer params, fp32                     rtol 1e-5, atol 1e-6
optimizer params, bf16/fp16                rtol eps, atol one subnormal step, plus one fp32
                                           ulp of |p_before| + |p_after| (against torch's
                                           fp32 step rounded to the dtype)
optimizer states (fp32)                    rtol 1e-5, atol 1e-6 max|state| (over all params);
                                           in the trajectories plus 2 |torch fp32 - torch fp64|
optimizer states (state_dtype=bf16)        rtol eps(bf16), atol 1e-6 max|state|
optimizer states (state_dtype="8bit")      against the float64 reference of the scheme
                                           (``oracles.quant8_reference_step``): each code at
                                           most 1 code from the reference's (a rounding tie
                                           that fp32 and float64 break apart), at most 0.1%
                                           of the codes off; absmax rtol 1e-5
norms (clip, last_grad_norm, telemetry)    fp32: rtol 1e-5; bf16/fp16: rtol eps
activations, fp32                          rtol 4 eps (8 eps: gelu/silu backward)
activations, bf16/fp16                     rtol eps
activations, every dtype                   atol 1e-35, or the dtype's subnormal step where
                                           larger (bf16, fp16)
init statistics                            5 standard errors
skip_nonfinite, master = param, ...        exact
=========================================  ===========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .oracles import Target

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOW_PRECISION = (torch.bfloat16, torch.float16)
FP32_ULP = 2.0**-23

FP32_PARAM_RTOL, FP32_PARAM_ATOL = 1e-5, 1e-6
FP32_PARAM_TOL = f"rtol {FP32_PARAM_RTOL:g}, atol {FP32_PARAM_ATOL:g}"
STATE_RTOL, STATE_ATOL_SCALE = 1e-5, 1e-6  # atol: STATE_ATOL_SCALE times the state's largest entry
STATE_TOL = f"rtol {STATE_RTOL:g}, atol {STATE_ATOL_SCALE:g} max|s|"
STATE_TOL_EXACT = STATE_TOL + " + 2 |torch32 - torch64|"
#: 8-bit states against the float64 reference of the scheme: the most codes a code may sit from the
#: reference's (a tie that fp32 and float64 round apart), and the most of the codes that may
QUANT8_CODE_DISTANCE, QUANT8_TIE_FRACTION = 1, 1e-3
QUANT8_TOL = f"<= {QUANT8_CODE_DISTANCE} code, <= {QUANT8_TIE_FRACTION:.1%} of codes"
NORM_RTOL = 1e-5  # an fp32 norm: accumulation error
NORM_TOL = f"rtol {NORM_RTOL:.0e}"
ACTIVATION_FP32_ULPS = 4  # an activation's default fp32 rtol, in ulps
ACTIVATION_ABS_FLOOR = 1e-35  # fp32 intermediates below the normal range flush to zero on a GPU
STD_ERRORS = 5.0  # statistical checks: sample moments within this many standard errors
STATS_TOL = f"{STD_ERRORS:g} s.e."


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


def one_ulp_tolerance(dtype: torch.dtype) -> tuple[float, float, str]:
    """rtol, atol and its description for 'within one ulp of the rounded reference'."""
    return eps(dtype), subnormal_step(dtype), f"rtol {eps(dtype):.2g} (1 ulp)"


def norm_tolerance(dtype: torch.dtype) -> tuple[float, float, str]:
    """A norm or clipped grad: fp32 to accumulation error, bf16/fp16 to one rounding."""
    if dtype == torch.float32:
        return NORM_RTOL, subnormal_step(dtype), NORM_TOL
    return one_ulp_tolerance(dtype)


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


def code_errors(pairs: list[tuple[torch.Tensor, torch.Tensor, bool, str]]) -> Errors:
    """8-bit state codes against the reference's, over every (ours, reference, unsigned, what) in
    ``pairs`` together: max_abs is the largest distance in codes (along the value axis: a signed
    code's sign bit makes it negative), max_rel the fraction of codes off the reference's, and the
    check fails past QUANT8_CODE_DISTANCE or QUANT8_TIE_FRACTION (err/tol: the larger ratio)."""
    def rank(codes: torch.Tensor, unsigned: bool) -> torch.Tensor:
        c = codes.detach().cpu().long()
        return c if unsigned else torch.where(c >= 128, -(c - 128), c)

    errs = Errors()
    off = compared = 0
    for ours, ref, unsigned, what in pairs:
        if ours.dtype != torch.uint8 or ours.shape != ref.shape:
            errs.fail(f"{what}: {ours.dtype} {tuple(ours.shape)}, expected uint8 codes {tuple(ref.shape)}")
            continue
        distance = (rank(ours, unsigned) - rank(ref, unsigned)).abs()
        if distance.numel():
            worst = int(distance.max())
            errs.max_abs = max(errs.max_abs, float(worst))
            if worst > QUANT8_CODE_DISTANCE:
                i = int(distance.reshape(-1).argmax())
                errs.fail(f"{what}: a code {worst} codes from the reference's, at index {i}")
        off += int((distance != 0).sum())
        compared += distance.numel()
    if compared:
        errs.max_rel = off / compared
        errs.err_over_tol = max(errs.max_abs / QUANT8_CODE_DISTANCE, errs.max_rel / QUANT8_TIE_FRACTION)
        if off > QUANT8_TIE_FRACTION * compared:
            errs.fail(f"{off} of {compared} codes off the reference's, over {QUANT8_TIE_FRACTION:.1%}")
    return errs
