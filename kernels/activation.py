"""Fused activations: sigmoid, tanh, relu, leaky_relu, gelu ('none' and 'tanh') and silu.

One generic forward kernel and one generic backward kernel walk a flat, contiguous
tensor in BLOCK-sized slices (a 1-D grid, int64 offsets, a mask only on the last
slice). The activation is a constexpr ``KIND`` that picks one small ``@triton.jit``
device function per formula, so each formula is written once and the kernels hold only
the memory traffic. Loads are upcast to fp32, the math runs in fp32, and results are
stored in the tensor's dtype (fp32, bf16 or fp16).

What the backward reads (the forward saves it):

* sigmoid and tanh: the output y (their derivatives are y(1 - y) and (1 - y)(1 + y));
* relu and leaky_relu: a bit mask, one bit per element packed into int32 words (bit
  ``i % 32`` of word ``i // 32``), written by the forward next to y;
* gelu and silu: the input x.

Numerics. No libdevice calls, and in fp32 no hardware approximations that reach the
result: with ``PRECISE`` (the launcher sets it for fp32 tensors) the math is correctly
rounded IEEE operations (add, mul, fma, ``div_rn``) and exact bit manipulation, so the
CPU interpreter computes what the GPU computes (up to the compiler fusing a multiply
and an add into an fma), and results stay within a few ulps of the exact value. The one
exception, gelu's reciprocal, is approximate on the GPU and its error is removed by an
exact residual step. ``exp`` is Cody-Waite range reduction plus a degree-6 polynomial;
tanh uses an odd polynomial below |x| = 0.55 (no 2 sigmoid(2x) - 1 cancellation near 0);
gelu('none') computes Phi(-|x|) = exp(-x^2/2) erfcx(|x|/sqrt2)/2, so its negative tail
has no 1 + erf(x) cancellation; gelu('tanh') uses (1 + tanh a)/2 = sigmoid(2a) for the
same reason. bf16 and fp16 results keep 8 or 11 bits, so ``PRECISE=False`` uses the
fast ``ex2.approx`` and approximate division instead. Every exponential is clamped, so
nothing overflows; NaN and ±inf give what torch's formulas give in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard
from .rounding import round_like

# The activation kinds (the KIND constexpr). relu and leaky_relu save a bit mask.
SIGMOID, TANH, RELU, LEAKY_RELU, GELU, GELU_TANH, SILU = range(7)
KINDS = {"sigmoid": SIGMOID, "tanh": TANH, "relu": RELU, "leaky_relu": LEAKY_RELU,
         "gelu": GELU, "gelu_tanh": GELU_TANH, "silu": SILU}
MASK_KINDS = ("relu", "leaky_relu")
OUTPUT_KINDS = ("sigmoid", "tanh")  # the backward reads the forward's output
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BITS_PER_WORD = 32

_SIGMOID = tl.constexpr(SIGMOID)
_TANH = tl.constexpr(TANH)
_RELU = tl.constexpr(RELU)
_LEAKY_RELU = tl.constexpr(LEAKY_RELU)
_GELU = tl.constexpr(GELU)
_GELU_TANH = tl.constexpr(GELU_TANH)
_SILU = tl.constexpr(SILU)

# exp: x = k ln2 + r with |r| <= ln2/2; ln2 = LN2_HI + LN2_LO, LN2_HI with 16 significant bits
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2_HI = tl.constexpr(0.693145751953125)
_LN2_LO = tl.constexpr(1.4286068203094173e-06)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: adding it rounds to an integer
_ROUND_MAGIC_BITS = tl.constexpr(0x4B400000)
_EXP_LO = tl.constexpr(-104.0)  # e^-104 rounds to 0 in fp32
_EXP_HI = tl.constexpr(89.0)  # e^89 overflows to inf in fp32
# e^r = 1 + r + r^2 (E2 + E3 r + ... + E6 r^4), relative error 3e-9 on |r| <= 0.3466
_E6 = tl.constexpr(0.0013814610429108143)
_E5 = tl.constexpr(0.008368710987269878)
_E4 = tl.constexpr(0.04166838899254799)
_E3 = tl.constexpr(0.1666652113199234)
_E2 = tl.constexpr(0.4999999403953552)
# tanh x = x (1 + x^2 (T1 + T2 x^2 + ... + T5 x^8)), relative error 1e-9 on |x| <= 0.55
_TANH_SMALL = tl.constexpr(0.55)
_T5 = tl.constexpr(-0.006274237297475338)
_T4 = tl.constexpr(0.021071678027510643)
_T3 = tl.constexpr(-0.05385230854153633)
_T2 = tl.constexpr(0.13332585990428925)
_T1 = tl.constexpr(-0.33333316445350647)
# erfc(a / sqrt2) exp(a^2 / 2) = (1 + P(q)) / (1 + a), q = (a - 4) / (a + 4), P of degree 10
# in q (relative error 2e-9 on 0 <= a <= 20; P is small, so its rounding errors are too)
_P10 = tl.constexpr(-0.00014701108739245683)
_P9 = tl.constexpr(-0.00013082506484352052)
_P8 = tl.constexpr(0.0013801478780806065)
_P7 = tl.constexpr(-0.0006034271791577339)
_P6 = tl.constexpr(-0.010004372335970402)
_P5 = tl.constexpr(0.03588031604886055)
_P4 = tl.constexpr(-0.06439542025327682)
_P3 = tl.constexpr(0.0571998693048954)
_P2 = tl.constexpr(0.02799924649298191)
_P1 = tl.constexpr(-0.19340692460536957)
_P0 = tl.constexpr(-0.055893585085868835)
_GELU_CLAMP = tl.constexpr(20.0)  # exp(-x^2/2) and erfc(|x|/sqrt 2) are 0 in fp32 beyond
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# gelu('tanh'): z = 2 sqrt(2/pi) (x + 0.044715 x^3) = K0 x (1 + K1 x^2)
_K0 = tl.constexpr(1.5957691216057308)
_K1 = tl.constexpr(0.044715)
_K1X3 = tl.constexpr(0.134145)  # 3 * 0.044715


# ----------------------------------------------------------------------------------
# fp32 building blocks
# ----------------------------------------------------------------------------------
@triton.jit
def _div(a, b, PRECISE: tl.constexpr):
    """a / b: correctly rounded with PRECISE, else the fast approximate division."""
    if PRECISE:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _exp_reduced(r, k):
    """2^k e^r for |r| <= ln2/2 and integer k in [-150, 129], to < 1 ulp.

    The power of two is applied as two normal factors, so results in the subnormal
    range round once and results past the fp32 range become inf.
    """
    p = tl.fma(_E6, r, _E5)
    p = tl.fma(p, r, _E4)
    p = tl.fma(p, r, _E3)
    p = tl.fma(p, r, _E2)
    p = tl.fma(p, r, 1.0)
    p = tl.fma(p, r, 1.0)
    half = k >> 1
    scale1 = ((half + 127) << 23).to(tl.float32, bitcast=True)
    scale2 = ((k - half + 127) << 23).to(tl.float32, bitcast=True)
    return (p * scale1) * scale2


@triton.jit
def _exp_reduce(x):
    """(r, k) with x = k ln2 + r, |r| <= ln2/2; x is clamped to [-104, 89] first.

    NaN stays NaN in r; k is computed from the bits of a rounded sum, so it is
    always a valid integer (no float-to-int conversion of NaN).
    """
    x = tl.minimum(tl.maximum(x, _EXP_LO, propagate_nan=tl.PropagateNan.ALL), _EXP_HI,
                   propagate_nan=tl.PropagateNan.ALL)
    shifted = tl.fma(x, _LOG2E, _ROUND_MAGIC)  # rint(x / ln2) + 1.5 * 2^23
    k = shifted.to(tl.int32, bitcast=True) - _ROUND_MAGIC_BITS
    kf = shifted - _ROUND_MAGIC
    r = tl.fma(kf, -_LN2_HI, x)
    r = tl.fma(kf, -_LN2_LO, r)
    return r, k


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    """e^x; exp(+inf) = inf, exp(-inf) = 0, exp(NaN) = NaN."""
    if PRECISE:
        r, k = _exp_reduce(x)
        return _exp_reduced(r, k)
    else:
        return tl.exp2(x * _LOG2E)


@triton.jit
def _exp_sum(hi, lo, PRECISE: tl.constexpr):
    """e^(hi + lo) for a small correction lo (|lo| <= ulp(hi)), e.g. hi + lo = -x^2/2 exactly."""
    if PRECISE:
        r, k = _exp_reduce(hi)
        return _exp_reduced(r + lo, k)
    else:
        return tl.exp2(hi * _LOG2E)


@triton.jit
def _one_minus_sigmoid(s, e, z):
    """1 - s for s = 1 / (1 + e), e = exp(-z): e s where s > 1/2 (no cancellation), else 1 - s."""
    return tl.where(z < 0.0, 1.0 - s, e * s)


# ----------------------------------------------------------------------------------
# the formulas: one device function per direction and activation
# ----------------------------------------------------------------------------------
@triton.jit
def sigmoid_fwd(x, PRECISE: tl.constexpr):
    """y = 1 / (1 + e^-x)."""
    return _div(1.0, 1.0 + _exp(-x, PRECISE), PRECISE)


@triton.jit
def sigmoid_bwd(g, y):
    """dx = g y (1 - y), from the saved output y (torch's sigmoid_backward)."""
    return g * ((1.0 - y) * y)


@triton.jit
def tanh_fwd(x, PRECISE: tl.constexpr):
    """y = tanh x: an odd polynomial for |x| < 0.55, else sign(x) (1 - 2 / (e^2|x| + 1))."""
    a = tl.abs(x)
    x2 = x * x
    p = tl.fma(_T5, x2, _T4)
    p = tl.fma(p, x2, _T3)
    p = tl.fma(p, x2, _T2)
    p = tl.fma(p, x2, _T1)
    small = x * tl.fma(p, x2, 1.0)  # x * (...) keeps the sign of -0
    big = 1.0 - _div(2.0, _exp(2.0 * a, PRECISE) + 1.0, PRECISE)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(a < _TANH_SMALL, small, big)


@triton.jit
def tanh_bwd(g, y):
    """dx = g (1 - y^2) = g (1 - y)(1 + y), from the saved output y (exact near |y| = 1)."""
    return g * ((1.0 - y) * (1.0 + y))


@triton.jit
def relu_fwd(x):
    """y = x < 0 ? 0 : x (NaN and -0 pass through, as in torch)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def relu_mask(x):
    """The bit the backward needs: torch passes the gradient where relu(x) > 0 or is NaN."""
    return (x > 0.0) | (x != x)


@triton.jit
def relu_bwd(g, bit):
    """dx = bit ? g : 0 (torch's threshold_backward on the output)."""
    return tl.where(bit, g, 0.0)


@triton.jit
def leaky_relu_fwd(x, slope):
    """y = x > 0 ? x : slope x."""
    return tl.where(x > 0.0, x, x * slope)


@triton.jit
def leaky_relu_mask(x):
    """The bit the backward needs: x > 0 (false for NaN, as in torch)."""
    return x > 0.0


@triton.jit
def leaky_relu_bwd(g, bit, slope):
    """dx = bit ? g : slope g."""
    return tl.where(bit, g, g * slope)


@triton.jit
def _gelu_phi(x, PRECISE: tl.constexpr):
    """(Phi(x), exp(-x^2/2)): the normal CDF and the unscaled normal density.

    With a = |x|, Phi(-a) = erfc(a/sqrt2)/2 = exp(-a^2/2) R(a)/2, R(a) = (1 + P(q)) / (1 + a).
    a^2 is split exactly into hi + lo, so exp(-a^2/2) is accurate even at a = 13, and with
    PRECISE the approximate division by 1 + a is corrected by its exact residual. Phi(x) is then
    Phi(-a) for x < 0 and 1 - Phi(-a) otherwise: no 1 + erf(x) cancellation anywhere.
    """
    a = tl.abs(x)
    a = tl.where(a > _GELU_CLAMP, _GELU_CLAMP, a)  # NaN stays NaN
    sq = a * a
    sq_lo = tl.fma(a, a, -sq)
    density = _exp_sum(-0.5 * sq, -0.5 * sq_lo, PRECISE)
    # one approximate reciprocal serves both divisions: q's error is damped by the small
    # P, and the residual step below makes 1 / (1 + a) exact to second order
    rd = 1.0 / ((a + 1.0) * (a + 4.0))
    q = ((a - 4.0) * (a + 1.0)) * rd
    p = tl.fma(_P10, q, _P9)
    p = tl.fma(p, q, _P8)
    p = tl.fma(p, q, _P7)
    p = tl.fma(p, q, _P6)
    p = tl.fma(p, q, _P5)
    p = tl.fma(p, q, _P4)
    p = tl.fma(p, q, _P3)
    p = tl.fma(p, q, _P2)
    p = tl.fma(p, q, _P1)
    p = tl.fma(p, q, _P0)
    r = (a + 4.0) * rd
    ratio = tl.fma(p, r, r)  # (1 + p) / (1 + a)
    if PRECISE:
        residual = (p - ratio) + tl.fma(ratio, -a, 1.0)  # (1 + p) - ratio (1 + a)
        ratio = tl.fma(residual, r, ratio)
    tail = (density * ratio) * 0.5  # Phi(-a)
    phi = tl.where(x < 0.0, tail, 1.0 - tail)
    return phi, density


@triton.jit
def gelu_fwd(x, PRECISE: tl.constexpr):
    """y = x Phi(x) (torch's approximate='none')."""
    phi, _ = _gelu_phi(x, PRECISE)
    return x * phi


@triton.jit
def gelu_bwd(g, x, PRECISE: tl.constexpr):
    """dx = g (Phi(x) + x exp(-x^2/2) / sqrt(2 pi))."""
    phi, density = _gelu_phi(x, PRECISE)
    return g * tl.fma(x, density * _INV_SQRT_2PI, phi)


@triton.jit
def _gelu_tanh_z(x):
    """z = 2 sqrt(2/pi) (x + 0.044715 x^3), so that (1 + tanh(z/2)) / 2 = sigmoid(z)."""
    return (_K0 * x) * tl.fma(_K1, x * x, 1.0)


@triton.jit
def gelu_tanh_fwd(x, PRECISE: tl.constexpr):
    """y = x sigmoid(z) = x / (1 + e^-z): torch's 0.5 x (1 + tanh(z/2)) without its cancellation."""
    z = _gelu_tanh_z(x)  # (negating the call's result directly trips triton's interpreter)
    return _div(x, 1.0 + _exp(-z, PRECISE), PRECISE)


@triton.jit
def gelu_tanh_bwd(g, x, PRECISE: tl.constexpr):
    """dx = g (s + s x (1 - s) K0 (1 + 3 K1 x^2)), s = sigmoid(z): torch's formula in s.

    |x| is clamped to 20 inside the polynomial factor only (where 1 - s is already 0),
    so x^2 never overflows; ±inf still give NaN as in torch.
    """
    z = _gelu_tanh_z(x)
    e = _exp(-z, PRECISE)
    s = _div(1.0, 1.0 + e, PRECISE)
    xc = tl.minimum(tl.maximum(x, -_GELU_CLAMP), _GELU_CLAMP)
    slope = _K0 * tl.fma(_K1X3, xc * xc, 1.0)
    return g * tl.fma((s * x) * _one_minus_sigmoid(s, e, z), slope, s)  # s x first: 0 at x = -3e38


@triton.jit
def silu_fwd(x, PRECISE: tl.constexpr):
    """y = x / (1 + e^-x)."""
    return _div(x, 1.0 + _exp(-x, PRECISE), PRECISE)


@triton.jit
def silu_bwd(g, x, PRECISE: tl.constexpr):
    """dx = g (s + s x (1 - s)), s = sigmoid(x) (torch's silu_backward)."""
    e = _exp(-x, PRECISE)
    s = _div(1.0, 1.0 + e, PRECISE)
    return g * tl.fma(s * x, _one_minus_sigmoid(s, e, x), s)


@triton.jit
def _forward(x, slope, KIND: tl.constexpr, PRECISE: tl.constexpr):
    if KIND == _SIGMOID:
        y = sigmoid_fwd(x, PRECISE)
    elif KIND == _TANH:
        y = tanh_fwd(x, PRECISE)
    elif KIND == _RELU:
        y = relu_fwd(x)
    elif KIND == _LEAKY_RELU:
        y = leaky_relu_fwd(x, slope)
    elif KIND == _GELU:
        y = gelu_fwd(x, PRECISE)
    elif KIND == _GELU_TANH:
        y = gelu_tanh_fwd(x, PRECISE)
    elif KIND == _SILU:
        y = silu_fwd(x, PRECISE)
    else:
        tl.static_assert(False, "activation forward: unknown KIND")
    return y


@triton.jit
def _backward(g, saved, slope, KIND: tl.constexpr, PRECISE: tl.constexpr):
    """dx from the upstream gradient and what the forward saved (y, x or the mask bit)."""
    if KIND == _SIGMOID:
        dx = sigmoid_bwd(g, saved)
    elif KIND == _TANH:
        dx = tanh_bwd(g, saved)
    elif KIND == _RELU:
        dx = relu_bwd(g, saved)
    elif KIND == _LEAKY_RELU:
        dx = leaky_relu_bwd(g, saved, slope)
    elif KIND == _GELU:
        dx = gelu_bwd(g, saved, PRECISE)
    elif KIND == _GELU_TANH:
        dx = gelu_tanh_bwd(g, saved, PRECISE)
    elif KIND == _SILU:
        dx = silu_bwd(g, saved, PRECISE)
    else:
        tl.static_assert(False, "activation backward: unknown KIND")
    return dx


# ----------------------------------------------------------------------------------
# memory: bit masks and blocks
# ----------------------------------------------------------------------------------
@triton.jit
def _pack_bits(bit, BLOCK: tl.constexpr):
    """BLOCK booleans -> BLOCK/32 int32 words, element i in bit i % 32 of word i // 32."""
    bits = tl.reshape(bit.to(tl.uint32), (BLOCK // 32, 32))
    words = tl.sum(bits << tl.arange(0, 32).to(tl.uint32)[None, :], axis=1)
    return words.to(tl.int32, bitcast=True)


@triton.jit
def _unpack_bits(words, BLOCK: tl.constexpr):
    """The inverse of _pack_bits."""
    bits = (words[:, None] >> tl.arange(0, 32)[None, :]) & 1
    return tl.reshape(bits, (BLOCK,)) != 0


@triton.jit
def _fwd_block(x_ptr, y_ptr, mask_ptr, remaining, slope, KIND: tl.constexpr, SAVE_MASK: tl.constexpr,
               PRECISE: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    words = tl.arange(0, BLOCK // 32)
    if FULL:
        x = tl.load(x_ptr + offs).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs, mask=offs < remaining, other=0.0).to(tl.float32)
    y = round_like(_forward(x, slope, KIND, PRECISE), y_ptr)
    if FULL:
        tl.store(y_ptr + offs, y)
    else:
        tl.store(y_ptr + offs, y, mask=offs < remaining)
    if SAVE_MASK:
        if KIND == _RELU:
            packed = _pack_bits(relu_mask(x), BLOCK)
        else:
            packed = _pack_bits(leaky_relu_mask(x), BLOCK)
        if FULL:
            tl.store(mask_ptr + words, packed)
        else:
            tl.store(mask_ptr + words, packed, mask=words * 32 < remaining)


@triton.jit
def activation_fwd_kernel(x_ptr, y_ptr, mask_ptr, n, slope,
                          KIND: tl.constexpr, SAVE_MASK: tl.constexpr, PRECISE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """y = act(x) over n contiguous elements; with SAVE_MASK also the relu/leaky_relu bit mask.

    x_ptr, y_ptr: n elements of one dtype (y_ptr may equal x_ptr: in place).
    mask_ptr: ceil(n / 32) int32 words, written only with SAVE_MASK.
    slope: leaky_relu's negative slope (a runtime scalar; ignored by other kinds).
    Program p handles elements [p BLOCK, (p + 1) BLOCK), in int64; full blocks are unmasked.
    Bytes per element: ``mechgpu.traffic.activation_bytes`` (read x, write y, + 1/8 B of mask).
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    x_ptr += start
    y_ptr += start
    mask_ptr += pid.to(tl.int64) * (BLOCK // 32)
    if start + BLOCK <= n:
        _fwd_block(x_ptr, y_ptr, mask_ptr, BLOCK, slope, KIND, SAVE_MASK, PRECISE, BLOCK, True)
    else:
        _fwd_block(x_ptr, y_ptr, mask_ptr, n - start, slope, KIND, SAVE_MASK, PRECISE, BLOCK, False)


@triton.jit
def _bwd_block(g_ptr, saved_ptr, dx_ptr, remaining, slope, KIND: tl.constexpr, PRECISE: tl.constexpr,
               BLOCK: tl.constexpr, FULL: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if FULL:
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=offs < remaining, other=0.0).to(tl.float32)
    if KIND == _RELU or KIND == _LEAKY_RELU:
        words = tl.arange(0, BLOCK // 32)
        if FULL:
            packed = tl.load(saved_ptr + words)
        else:
            packed = tl.load(saved_ptr + words, mask=words * 32 < remaining, other=0)
        saved = _unpack_bits(packed, BLOCK)
    else:
        if FULL:
            saved = tl.load(saved_ptr + offs).to(tl.float32)
        else:
            saved = tl.load(saved_ptr + offs, mask=offs < remaining, other=0.0).to(tl.float32)
    dx = round_like(_backward(g, saved, slope, KIND, PRECISE), dx_ptr)
    if FULL:
        tl.store(dx_ptr + offs, dx)
    else:
        tl.store(dx_ptr + offs, dx, mask=offs < remaining)


@triton.jit
def activation_bwd_kernel(g_ptr, saved_ptr, dx_ptr, n, slope,
                          KIND: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    """dx = g * act'(.) over n contiguous elements, from what the forward saved.

    g_ptr, dx_ptr: n elements of the activation's dtype (dx_ptr may equal g_ptr).
    saved_ptr: y (sigmoid, tanh) or x (gelu, silu) in that dtype, or ceil(n / 32)
    int32 mask words (relu, leaky_relu).
    Bytes per element: ``mechgpu.traffic.activation_bytes`` (read g and y, x or the mask, write dx).
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    g_ptr += start
    dx_ptr += start
    if KIND == _RELU or KIND == _LEAKY_RELU:
        saved_ptr += pid.to(tl.int64) * (BLOCK // 32)
    else:
        saved_ptr += start
    if start + BLOCK <= n:
        _bwd_block(g_ptr, saved_ptr, dx_ptr, BLOCK, slope, KIND, PRECISE, BLOCK, True)
    else:
        _bwd_block(g_ptr, saved_ptr, dx_ptr, n - start, slope, KIND, PRECISE, BLOCK, False)


# ----------------------------------------------------------------------------------
# launchers: plain Python, torch tensors in
# ----------------------------------------------------------------------------------
def mask_words(numel: int) -> int:
    """int32 words of a bit mask over ``numel`` elements."""
    return -(-numel // BITS_PER_WORD)


def _check(x: torch.Tensor, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown activation {kind!r}; expected one of {sorted(KINDS)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"mechgpu activation kernels take float32, bfloat16 or float16 tensors, not {x.dtype}")



def forward(x: torch.Tensor, kind: str, *, slope: float = 0.0, save_mask: bool = False,
            out: torch.Tensor | None = None,
            mask_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(act(x), mask)``; the mask (int32 words) only for relu/leaky_relu with ``save_mask``.

    A non-contiguous ``x`` is copied to a contiguous one first; ``out`` (contiguous, x's
    shape and dtype) receives the result and may be ``x`` itself for an in-place update.
    """
    from ._launch import elementwise_block, elementwise_warps

    _check(x, kind)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if y.shape != x.shape or y.dtype != x.dtype or not y.is_contiguous():
        raise ValueError("out must be a contiguous tensor of the input's shape and dtype")
    save_mask = save_mask and kind in MASK_KINDS
    n = x.numel()
    mask = None
    if save_mask:
        mask = torch.empty(mask_words(n), dtype=torch.int32, device=x.device) if mask_out is None else mask_out
        if mask.shape != (mask_words(n),) or mask.dtype != torch.int32:
            raise ValueError(f"mask_out must be int32 of shape ({mask_words(n)},)")
    if n == 0:
        return y, mask
    block = elementwise_block(n)
    with device_guard(x.device):
        activation_fwd_kernel[(triton.cdiv(n, block),)](
            x, y, mask if save_mask else y, n, float(slope),
            KIND=KINDS[kind], SAVE_MASK=save_mask, PRECISE=x.dtype == torch.float32,
            BLOCK=block, num_warps=elementwise_warps(block),
        )
    return y, mask


def backward(grad: torch.Tensor, saved: torch.Tensor, kind: str, *, slope: float = 0.0,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The input gradient from the upstream ``grad`` and what ``forward`` saved.

    ``saved`` is y (sigmoid, tanh), x (gelu, gelu_tanh, silu) or the int32 mask
    (relu, leaky_relu). The result has grad's shape and dtype and is contiguous.
    """
    from ._launch import elementwise_block, elementwise_warps

    _check(grad, kind)
    grad = grad.contiguous()
    n = grad.numel()
    if kind in MASK_KINDS:
        if saved.dtype != torch.int32 or saved.numel() != mask_words(n):
            raise ValueError(f"{kind} backward needs the int32 mask of {mask_words(n)} words")
        saved = saved.contiguous()  # the kernel reads the words flat (an expanded mask has stride 0)
    else:
        if saved.shape != grad.shape:
            raise ValueError(f"saved tensor has shape {tuple(saved.shape)}, grad {tuple(grad.shape)}")
        saved = saved.to(grad.dtype).contiguous()
    dx = torch.empty_like(grad, memory_format=torch.contiguous_format) if out is None else out
    if dx.shape != grad.shape or dx.dtype != grad.dtype or not dx.is_contiguous():
        raise ValueError("out must be a contiguous tensor of grad's shape and dtype")
    if n == 0:
        return dx
    block = elementwise_block(n)
    with device_guard(grad.device):
        activation_bwd_kernel[(triton.cdiv(n, block),)](
            grad, saved, dx, n, float(slope),
            KIND=KINDS[kind], PRECISE=grad.dtype == torch.float32,
            BLOCK=block, num_warps=elementwise_warps(block),
        )
    return dx


def aot_variants() -> list:
    """The specialisations the compile test and bench/kernel_report.py compile."""
    from ._launch import ELEMENTWISE_BLOCKS, elementwise_warps
    from .aot import variant

    variants = []
    for block in ELEMENTWISE_BLOCKS:
        warps = elementwise_warps(block)
        for dtype_name, dtype in (("fp32", "fp32"), ("bf16", "bf16")):
            for kind, code in KINDS.items():
                if block != ELEMENTWISE_BLOCKS[0] and kind != "gelu":
                    continue  # the smaller block: only the heaviest kind
                tag = f"{kind}[{dtype_name}{'' if block == ELEMENTWISE_BLOCKS[0] else f',block={block}'}"
                save_mask = kind in MASK_KINDS
                sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
                       "mask_ptr": "*i32" if save_mask else f"*{dtype}", "n": "i32", "slope": "fp32"}
                cx = {"KIND": code, "SAVE_MASK": save_mask, "PRECISE": dtype == "fp32", "BLOCK": block}
                variants.append(variant(f"act_fwd_{tag}]", activation_fwd_kernel, sig, cx, True, warps))
                sig = {"g_ptr": f"*{dtype}", "saved_ptr": "*i32" if save_mask else f"*{dtype}",
                       "dx_ptr": f"*{dtype}", "n": "i32", "slope": "fp32"}
                cx = {"KIND": code, "PRECISE": dtype == "fp32", "BLOCK": block}
                variants.append(variant(f"act_bwd_{tag}]", activation_bwd_kernel, sig, cx, True, warps))
    # past 2^31 elements the launcher passes n as int64
    block = ELEMENTWISE_BLOCKS[0]
    sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "mask_ptr": "*i32", "n": "i64", "slope": "fp32"}
    cx = {"KIND": RELU, "SAVE_MASK": True, "PRECISE": False, "BLOCK": block}
    variants.append(variant("act_fwd_relu[bf16,n=i64]", activation_fwd_kernel, sig, cx, True,
                            elementwise_warps(block)))
    sig = {"g_ptr": "*bf16", "saved_ptr": "*i32", "dx_ptr": "*bf16", "n": "i64", "slope": "fp32"}
    cx = {"KIND": RELU, "PRECISE": False, "BLOCK": block}
    variants.append(variant("act_bwd_relu[bf16,n=i64]", activation_bwd_kernel, sig, cx, True,
                            elementwise_warps(block)))
    return variants
