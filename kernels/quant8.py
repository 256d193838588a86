"""8-bit optimizer states: block-wise scaled 8-bit floats, encoded and decoded in registers.

A state tensor of n elements is kept as n uint8 *codes* (the param's shape) and one fp32
*absmax* per block of ``QUANT_BLOCK`` consecutive elements (ceil(n / QUANT_BLOCK) of them):
the block-wise scheme of Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"
(bitsandbytes' ``optimizer_update_8bit_blockwise``; torchao's ``low_bit_optim`` keeps the same
codes + scale pair). A block's largest magnitude maps to the largest code, so one outlier
costs precision only within its own block.

The code book is an 8-bit float, not bitsandbytes' dynamic tree map:

* signed states (Adam's exp_avg, momentum buffers, RMSprop's grad_avg): **e4m3**, a sign,
  4 exponent bits (bias 15) and 3 mantissa bits, subnormals, no inf/NaN; the largest code is
  1.875, so x = value(code) * absmax / 1.875;
* non-negative states (Adam's exp_avg_sq and max_exp_avg_sq, RMSprop's square_avg, Adagrad's
  sum): **u4m4**, no sign bit (the bit e4m3 would waste on them, as torchao's fp8 state notes)
  and 4 mantissa bits, storing **sqrt** of the state, which the update reads anyway: the
  16 binades of the exponent cover 2^-32 of the state's range below its block maximum, and
  the relative error of the denominator sqrt(v) is that of one u4m4 rounding (<= 2^-5).
  A positive value never encodes as 0 (at least the smallest subnormal): a denominator
  rounded to 0 would turn m / (sqrt(v) + eps) into m / eps.

Why a float and not the dynamic map (``bench/quant8_scheme.py`` measures both in float64 on
real Adam moments and in training): a dynamic-map encode is a binary search, 8 dependent table
gathers per element, while this encode is ~10 integer instructions on the fp32 bits (round the
mantissa to nearest-even, rebias the exponent) and the decode 3. It is written with bit
operations, not triton's fp8 casts: e4m3 (``fp8e4nv``) is a hardware cast only from sm_89 and
triton refuses it on sm_80, and the bit version runs the same in the interpreter, on sm_80 and
on sm_90a, bit for bit. Measured (one teacher-student MLP, AdamW, 600 steps): the error of the
Adam direction m / (sqrt(v) + eps) is 1.4% with the dynamic map and 2.9% with this scheme, and
the training ends within noise of fp32 with both (6-11% *below* fp32's loss on one seed, the
dynamic map and e4m3 alike). More mantissa bits lower the direction error (e3m4 for m and u3m5
for sqrt(v): 1.4%, as the dynamic map; one change of ``SIGNED_FORMAT``/``UNSIGNED_FORMAT``) but
narrow the range: a value under 2^-10 of its block's maximum (5e-4) would become 0, where e4m3
keeps values down to 2^-17 / 1.875 (4e-6). We keep the range, which protects small elements
beside a large one in the same block (the zero-point failure Dettmers et al. and Li et al. 2023,
"Memory Efficient Optimizers with 4-bit States", describe), until a run shows the precision matters.

Block size: ``QUANT_BLOCK = 128``, half of bitsandbytes' and torchao's 256. The update kernel
gives each thread 4 consecutive elements (``_launch.mixed_width_warps``: every stream, fp32,
16-bit and these uint8 codes, then shares one register layout), so 128 elements are exactly
one warp's: a block's max is a warp shuffle reduction and its absmax one value per warp,
never shared memory. The price is 4 / 128 B of absmax per state element (1.03 B in all)
instead of 4 / 256; the error is a little lower than with 256.

Non-finite values: a NaN or inf in a block makes its absmax inf and the whole block decode
to NaN or inf (bitsandbytes loses the block the same way); a step that ``skip_nonfinite`` or
GradScaler skips writes nothing, so its states stay finite.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: elements per absmax (see the module docstring)
QUANT_BLOCK = 128
#: (exponent bits, mantissa bits) of each code book: the signed one gives the sign its 8th bit.
#: The exponent bias is 2^e - 1, so the largest value is 2 - 2^-m, which a block's absmax maps to.
SIGNED_FORMAT = (4, 3)
UNSIGNED_FORMAT = (4, 4)


def largest_value(fmt: tuple[int, int]) -> float:
    return 2.0 - 2.0 ** -fmt[1]


def exponent_bias(fmt: tuple[int, int]) -> int:
    return 2 ** fmt[0] - 1


_QB = tl.constexpr(QUANT_BLOCK)
_S_MANTISSA, _S_BIAS, _S_MAX = (tl.constexpr(v) for v in (SIGNED_FORMAT[1], exponent_bias(SIGNED_FORMAT),
                                                          largest_value(SIGNED_FORMAT)))
_U_MANTISSA, _U_BIAS, _U_MAX = (tl.constexpr(v) for v in (UNSIGNED_FORMAT[1], exponent_bias(UNSIGNED_FORMAT),
                                                          largest_value(UNSIGNED_FORMAT)))


def absmax_count(numel: int) -> int:
    """The absmax values a state of ``numel`` elements keeps: one per block of QUANT_BLOCK."""
    return -(-numel // QUANT_BLOCK)


@triton.jit
def _encode_magnitude(y, MANTISSA: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr):
    """y >= 0 (at most the code book's largest value) -> the bits of the nearest code's magnitude
    (subnormals; ties to even), as int32."""
    bits = y.to(tl.int32, bitcast=True)
    shift: tl.constexpr = 23 - MANTISSA
    odd = (bits >> shift) & 1
    normal = ((bits + (2 ** (shift - 1) - 1) + odd) >> shift) - (127 - BIAS) * 2 ** MANTISSA
    # below the smallest normal: multiples of 2^(1 - bias - MANTISSA), rounded to nearest even
    # by adding and subtracting 2^23 in fp32
    scaled = y * (2.0 ** (BIAS - 1 + MANTISSA))
    subnormal = ((scaled + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(y < 2.0 ** (1 - BIAS), subnormal, normal)
    return tl.minimum(code, MAX_CODE)


@triton.jit
def _decode_magnitude(code, MANTISSA: tl.constexpr, BIAS: tl.constexpr):
    """The fp32 value of a code's magnitude bits (int32), as ``_encode_magnitude`` made them."""
    normal = ((code + (127 - BIAS) * 2 ** MANTISSA) << (23 - MANTISSA)).to(tl.float32, bitcast=True)
    subnormal = code.to(tl.float32) * (2.0 ** (1 - BIAS - MANTISSA))
    return tl.where(code < 2 ** MANTISSA, subnormal, normal)


@triton.jit
def _block_max(values):
    """Each element's QUANT_BLOCK-sized block's max, for every element of the block: a reduction
    within the warp that holds the block (see the module docstring: shuffles, no shared memory),
    then a broadcast in registers."""
    BLOCK: tl.constexpr = values.shape[0]
    blocks = tl.reshape(values, (BLOCK // _QB, _QB))
    return tl.reshape(tl.broadcast_to(tl.max(blocks, axis=1)[:, None], (BLOCK // _QB, _QB)), (BLOCK,))


@triton.jit
def _absmax_lanes(offs, mask):
    """The lanes that write a block's absmax: the first element of each block (elementwise, so that
    no [blocks]-shaped tensor needs a layout of its own)."""
    lead = (offs % _QB) == 0
    if mask is not None:
        lead = lead & mask
    return lead


@triton.jit
def load_state8(codes_ptr, absmax_ptr, offs, mask, UNSIGNED: tl.constexpr):
    """A quantized state's fp32 values at ``offs`` (for an unsigned state, the square of the
    stored sqrt). Reads 1 B per element and 4 B per block: every lane of a block loads its absmax,
    one address, which the memory system serves once (in the values' own register layout, where a
    load of a [blocks] vector would need a conversion through shared memory)."""
    absmax = tl.load(absmax_ptr + offs // _QB, mask=mask)
    code = tl.load(codes_ptr + offs, mask=mask).to(tl.int32)
    if UNSIGNED:
        root = _decode_magnitude(code, _U_MANTISSA, _U_BIAS) * (absmax * (1.0 / _U_MAX))
        return root * root
    else:
        value = _decode_magnitude(code & 127, _S_MANTISSA, _S_BIAS) * (absmax * (1.0 / _S_MAX))
        return tl.where(code >= 128, -value, value)


@triton.jit
def store_state8(codes_ptr, absmax_ptr, x, offs, mask, UNSIGNED: tl.constexpr):
    """Quantize fp32 ``x`` block by block and store its codes and absmax (an unsigned state
    stores sqrt(x)). Writes 1 B per element and 4 B per block."""
    if UNSIGNED:
        x = tl.sqrt_rn(x)
    magnitude = tl.abs(x)
    magnitude = tl.where(magnitude != magnitude, float("inf"), magnitude)  # NaN: the block's absmax is inf
    if mask is not None:
        magnitude = tl.where(mask, magnitude, 0.0)
    absmax = _block_max(magnitude)
    if UNSIGNED:
        top = _U_MAX
    else:
        top = _S_MAX
    # A block of zeros (zero states and grads, or lanes past the tensor's end, which the mask zeroed)
    # has absmax 0 and y = 0: its divisor is made 1, so that no lane divides by 0, whatever the
    # division's semantics (the interpreter's numpy, PTX's div.full or div.rn). A where() choosing 0
    # after top / absmax would still compute top / 0 in those lanes (numpy warns of it).
    y = magnitude * (top / tl.where(absmax > 0.0, absmax, 1.0))
    if UNSIGNED:
        code = _encode_magnitude(y, _U_MANTISSA, _U_BIAS, 255)
        code = tl.where((code == 0) & (y > 0.0), 1, code)  # a positive value never becomes 0
    else:
        code = _encode_magnitude(y, _S_MANTISSA, _S_BIAS, 127) | tl.where(x < 0.0, 128, 0)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    # Only a block's first lane stores (the mask), so the other lanes' addresses are never used: the
    # hint that they run on, 4 by 4, gives the store the layout of the values, not one of its own
    # with a conversion through shared memory; the mask keeps it to scalar stores.
    index = tl.multiple_of(tl.max_contiguous(offs // _QB, 4), 4)
    tl.store(absmax_ptr + index, absmax, mask=_absmax_lanes(offs, mask))
