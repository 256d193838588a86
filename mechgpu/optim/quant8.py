"""8-bit optimizer states on the host: the code books in float64, quantize and dequantize with torch.

The scheme (block-wise scaled e4m3 for signed states, u4m4 of the square root for non-negative
ones, ``QUANT_BLOCK`` elements per fp32 absmax) is defined and justified in
``mechgpu.kernels.quant8``, whose kernels encode and decode it in registers. This module writes
the same scheme as plain math: each code book is the table of its 8-bit values, built from its
exponent and mantissa bits, and a value is quantized to the nearest entry in float64. It serves
``load_state_dict`` (a torch fp32 state quantized), ``dequantized_state_dict`` (back to torch's
layout), state repair when ``state_dtype`` changes, and the tests as the float64 reference.

A quantized state is two entries of ``optimizer.state[p]``: ``key`` holds the uint8 codes in
the param's shape and ``key + "_absmax"`` the fp32 block maxima (of the state, or of its square
root for a non-negative state), ``absmax_count(numel)`` of them.
"""

from __future__ import annotations

import functools

import torch

from .._backend import is_dense
from ..kernels.optim_spec import NONNEGATIVE_KEYS
from ..kernels.quant8 import QUANT_BLOCK, SIGNED_FORMAT, UNSIGNED_FORMAT, absmax_count, exponent_bias, largest_value

#: the state_dtype option's value for 8-bit states
STATE_8BIT = "8bit"
#: the suffix of the entry holding a quantized state's block maxima
ABSMAX_SUFFIX = "_absmax"
#: tensors under this many elements keep fp32 states (bitsandbytes' ``min_8bit_size``)
MIN_8BIT_NUMEL = 4096

__all__ = ["ABSMAX_SUFFIX", "MIN_8BIT_NUMEL", "QUANT_BLOCK", "STATE_8BIT", "absmax_count", "code_values",
           "dequantize", "dequantized_state_dict", "quantize"]


@functools.cache
def code_values(unsigned: bool) -> torch.Tensor:
    """float64 [256]: the value of each code, scaled so that the largest is 1 (entry c is code c)."""
    fmt = UNSIGNED_FORMAT if unsigned else SIGNED_FORMAT
    mantissa, bias = fmt[1], exponent_bias(fmt)
    codes = torch.arange(256 if unsigned else 128, dtype=torch.float64)
    exponent, fraction = torch.div(codes, 2 ** mantissa, rounding_mode="floor"), codes % 2 ** mantissa
    magnitude = torch.where(exponent == 0, fraction * 2.0 ** (1 - bias - mantissa),
                            (1 + fraction / 2 ** mantissa) * 2.0 ** (exponent - bias))
    magnitude = magnitude / largest_value(fmt)
    return magnitude if unsigned else torch.cat([magnitude, -magnitude])


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-D view in memory order: the order the kernels' blocks follow."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    flat = flat.double()
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % QUANT_BLOCK)).view(-1, QUANT_BLOCK)


#: elements converted at a time on the host, so that the float64 temporaries stay small
_CHUNK = QUANT_BLOCK * 8192


def _quantize_flat(flat: torch.Tensor, unsigned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(flat)
    if unsigned:
        blocks = blocks.clamp_min(0).sqrt()
    magnitude = blocks.abs().nan_to_num(nan=float("inf"))
    absmax = magnitude.amax(1, keepdim=True)
    y = torch.where(absmax > 0, magnitude / absmax, 0.0).nan_to_num(0.0)
    table = (code_values(True) if unsigned else code_values(False)[:128]).to(flat.device)  # ascending
    index = torch.searchsorted(table, y.contiguous()).clamp(1, len(table) - 1)
    code = torch.where(y - table[index - 1] <= table[index] - y, index - 1, index)
    if unsigned:
        code = torch.where((code == 0) & (y > 0), 1, code)
    else:
        code = code + 128 * (blocks < 0)
    return code.reshape(-1)[:flat.numel()].to(torch.uint8), absmax.reshape(-1).float()


def quantize(x: torch.Tensor | float, unsigned: bool, like: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes with x's shape and strides, fp32 absmax [absmax_count(x.numel())]) of a state, in
    float64: each element to the nearest code of x / absmax (an unsigned state: of sqrt(x)), the
    blocks taken in memory order as the kernels take them; a positive value of an unsigned state
    never becomes 0. A block with a NaN or inf gets an inf absmax. ``x`` may be a number, the
    value of every element of a tensor shaped ``like``."""
    if not isinstance(x, torch.Tensor):  # a fill: every block is the same block
        codes = torch.empty_like(like, dtype=torch.uint8, memory_format=torch.preserve_format)
        absmax = torch.empty(absmax_count(like.numel()), dtype=torch.float32, device=like.device)
        code, block_max = _quantize_flat(torch.full((QUANT_BLOCK,), float(x), dtype=torch.float64), unsigned)
        return codes.fill_(int(code[0])), absmax.fill_(float(block_max[0]))
    x = x.detach()
    if not is_dense(x):
        x = x.contiguous()
    flat = _storage_order(x)
    codes = torch.empty_like(x, dtype=torch.uint8, memory_format=torch.preserve_format)
    absmax = torch.empty(absmax_count(x.numel()), dtype=torch.float32, device=x.device)
    flat_codes = _storage_order(codes)
    for start in range(0, x.numel(), _CHUNK):
        chunk_codes, chunk_absmax = _quantize_flat(flat[start:start + _CHUNK], unsigned)
        flat_codes[start:start + _CHUNK] = chunk_codes
        absmax[start // QUANT_BLOCK:start // QUANT_BLOCK + len(chunk_absmax)] = chunk_absmax
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, unsigned: bool,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The state that ``codes`` and ``absmax`` hold, in ``dtype`` with the codes' shape and strides
    (float64 math)."""
    if not is_dense(codes):
        codes = codes.contiguous()
    table = code_values(unsigned).to(codes.device)
    flat_codes, absmax = _storage_order(codes), absmax.to(codes.device)
    out = torch.empty_like(codes, dtype=dtype, memory_format=torch.preserve_format)
    flat_out = _storage_order(out)
    for start in range(0, codes.numel(), _CHUNK):
        chunk = flat_codes[start:start + _CHUNK]
        scale = absmax[start // QUANT_BLOCK:start // QUANT_BLOCK + absmax_count(chunk.numel())]
        values = (_blocks(table[chunk.long()]) * scale.double().view(-1, 1)).reshape(-1)[:chunk.numel()]
        flat_out[start:start + _CHUNK] = values.square() if unsigned else values
    return out


def dequantized_state_dict(state_dict: dict) -> dict:
    """``state_dict`` in torch's layout: each 8-bit state (uint8 codes ``key`` and fp32 ``key +
    "_absmax"``) replaced by its fp32 values, so that ``torch.optim``'s optimizer (or mechgpu's with
    fp32 or bf16 states) can load it. Other entries are shared, not copied; the argument is not
    changed. The inverse needs no function: ``load_state_dict`` of an optimizer with
    ``state_dtype="8bit"`` quantizes fp32 states at its next step."""
    state = {}
    for param_id, entry in state_dict["state"].items():
        entry = dict(entry)
        for key in [k for k in entry if not k.endswith(ABSMAX_SUFFIX)]:
            codes, absmax = entry[key], entry.get(key + ABSMAX_SUFFIX)
            if torch.is_tensor(codes) and codes.dtype == torch.uint8 and torch.is_tensor(absmax):
                entry[key] = dequantize(codes, absmax, key in NONNEGATIVE_KEYS)
                del entry[key + ABSMAX_SUFFIX]
        state[param_id] = entry
    return {**state_dict, "state": state}
