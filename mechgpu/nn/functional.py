"""Drop-in fused activations for ``torch.nn.functional``: one Triton kernel each way.

``sigmoid``, ``tanh``, ``relu``, ``leaky_relu``, ``gelu`` and ``silu`` take torch's
arguments and return what torch returns, to a few ulps (see ``kernels/activation.py``).
Each is a ``torch.library`` custom op with an autograd formula and a fake
implementation, so models that use them compile with ``torch.compile(fullgraph=True)``.

How they differ from torch:

* **Less saved for backward.** relu and leaky_relu save a bit mask (1 bit per element,
  packed in int32 words) instead of their output or input: 1/32 of torch's saved bytes
  in fp32, 1/16 in bf16/fp16. sigmoid and tanh save their output, gelu and silu their
  input, as torch does.
* **Accuracy.** The math is fp32 for every dtype. gelu keeps full relative accuracy in
  its negative tail (torch's 1 + erf and 1 + tanh cancel there, even in float64).
* **Layout.** Results are contiguous; a non-contiguous input is copied first. In-place
  variants still update the given tensor (a non-contiguous one through a copy).
* **In place.** ``relu``/``leaky_relu``/``silu`` with ``inplace=True`` return the same
  tensor and bump its version, and raise torch's errors (a leaf that requires grad,
  say). In-place leaky_relu with a negative slope works in backward, where torch raises.
  In-place silu saves a copy of its input for backward, as torch does.
* **Dtypes and devices.** float32, bfloat16 and float16 run the kernels; other dtypes
  call torch's own op. CPU tensors run the kernels under ``TRITON_INTERPRET=1``, and
  otherwise fall back to torch's own op with a one-time warning.
* Double backward (``create_graph=True`` through these ops) is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import kernels_run_on, warn_fallback_once
from ..kernels import activation as kernels

__all__ = ["sigmoid", "tanh", "relu", "leaky_relu", "gelu", "silu"]

def _warn_cpu_fallback(name: str) -> None:
    warn_fallback_once(
        "nn",
        f"mechgpu.nn.functional.{name}: the input is on the CPU and TRITON_INTERPRET=1 is not set, "
        f"so this call runs torch's own {name} instead of mechgpu's Triton kernel. Move the model "
        "to CUDA, or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
        "(slowly).",
        stacklevel=4,
    )


def _use_kernels(input: Tensor, name: str) -> bool:
    """True when mechgpu's kernels handle this tensor; False means: call torch's op."""
    if input.dtype not in kernels.SUPPORTED_DTYPES:
        return False
    if not kernels_run_on(input.device):
        _warn_cpu_fallback(name)
        return False
    return True


def _needs_grad(input: Tensor) -> bool:
    return torch.is_grad_enabled() and input.requires_grad


def _check_in_place(input: Tensor) -> None:
    """torch's in-place errors under autograd, raised before anything is written."""
    if input.is_leaf and input.requires_grad:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    if not torch.compiler.is_compiling() and input._is_view() and input._base.is_leaf \
            and input._base.requires_grad:
        raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")


def _empty_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _empty_mask(x: Tensor, save_mask: bool) -> Tensor:
    words = kernels.mask_words(x.numel()) if save_mask else 0
    return x.new_empty((words,), dtype=torch.int32)


def _write_in_place(x: Tensor, kind: str, slope: float = 0.0, save_mask: bool = False) -> Tensor | None:
    """act(x) written into x; returns the mask (or None)."""
    if x.is_contiguous():
        return kernels.forward(x, kind, slope=slope, save_mask=save_mask, out=x)[1]
    y, mask = kernels.forward(x, kind, slope=slope, save_mask=save_mask)
    x.copy_(y)
    return mask


# ----------------------------------------------------------------------------------
# custom ops: forward kernels (with autograd formulas) and backward kernels
# ----------------------------------------------------------------------------------
@torch.library.custom_op("mechgpu::sigmoid", mutates_args=())
def _sigmoid(x: Tensor) -> Tensor:
    return kernels.forward(x, "sigmoid")[0]


@torch.library.custom_op("mechgpu::sigmoid_backward", mutates_args=())
def _sigmoid_backward(grad: Tensor, output: Tensor) -> Tensor:
    return kernels.backward(grad, output, "sigmoid")


@torch.library.custom_op("mechgpu::tanh", mutates_args=())
def _tanh(x: Tensor) -> Tensor:
    return kernels.forward(x, "tanh")[0]


@torch.library.custom_op("mechgpu::tanh_backward", mutates_args=())
def _tanh_backward(grad: Tensor, output: Tensor) -> Tensor:
    return kernels.backward(grad, output, "tanh")


@torch.library.custom_op("mechgpu::gelu", mutates_args=())
def _gelu(x: Tensor, approximate: str) -> Tensor:
    return kernels.forward(x, _gelu_kind(approximate))[0]


@torch.library.custom_op("mechgpu::gelu_backward", mutates_args=())
def _gelu_backward(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    return kernels.backward(grad, x, _gelu_kind(approximate))


@torch.library.custom_op("mechgpu::silu", mutates_args=())
def _silu(x: Tensor) -> Tensor:
    return kernels.forward(x, "silu")[0]


@torch.library.custom_op("mechgpu::silu_backward", mutates_args=())
def _silu_backward(grad: Tensor, x: Tensor) -> Tensor:
    return kernels.backward(grad, x, "silu")


@torch.library.custom_op("mechgpu::silu_", mutates_args=("x",))
def _silu_(x: Tensor) -> None:
    _write_in_place(x, "silu")


@torch.library.custom_op("mechgpu::relu", mutates_args=())
def _relu(x: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    y, mask = kernels.forward(x, "relu", save_mask=save_mask)
    return y, mask if save_mask else _empty_mask(x, False)


@torch.library.custom_op("mechgpu::relu_", mutates_args=("x",))
def _relu_(x: Tensor, save_mask: bool) -> Tensor:
    mask = _write_in_place(x, "relu", save_mask=save_mask)
    return mask if save_mask else _empty_mask(x, False)


@torch.library.custom_op("mechgpu::relu_backward", mutates_args=())
def _relu_backward(grad: Tensor, mask: Tensor) -> Tensor:
    return kernels.backward(grad, mask, "relu")


@torch.library.custom_op("mechgpu::leaky_relu", mutates_args=())
def _leaky_relu(x: Tensor, negative_slope: float, save_mask: bool) -> tuple[Tensor, Tensor]:
    y, mask = kernels.forward(x, "leaky_relu", slope=negative_slope, save_mask=save_mask)
    return y, mask if save_mask else _empty_mask(x, False)


@torch.library.custom_op("mechgpu::leaky_relu_", mutates_args=("x",))
def _leaky_relu_(x: Tensor, negative_slope: float, save_mask: bool) -> Tensor:
    mask = _write_in_place(x, "leaky_relu", slope=negative_slope, save_mask=save_mask)
    return mask if save_mask else _empty_mask(x, False)


@torch.library.custom_op("mechgpu::leaky_relu_backward", mutates_args=())
def _leaky_relu_backward(grad: Tensor, mask: Tensor, negative_slope: float) -> Tensor:
    return kernels.backward(grad, mask, "leaky_relu", slope=negative_slope)


# fake implementations: shapes and dtypes only, for torch.compile and meta tensors
@_sigmoid.register_fake
@_tanh.register_fake
@_silu.register_fake
def _(x):
    return _empty_like(x)


@_gelu.register_fake
def _(x, approximate):
    return _empty_like(x)


@_silu_.register_fake
def _(x):
    return None


@_sigmoid_backward.register_fake
@_tanh_backward.register_fake
@_gelu_backward.register_fake
@_silu_backward.register_fake
@_relu_backward.register_fake
@_leaky_relu_backward.register_fake
def _(grad, *saved):
    return _empty_like(grad)


@_relu.register_fake
def _(x, save_mask):
    return _empty_like(x), _empty_mask(x, save_mask)


@_leaky_relu.register_fake
def _(x, negative_slope, save_mask):
    return _empty_like(x), _empty_mask(x, save_mask)


@_relu_.register_fake
def _(x, save_mask):
    return _empty_mask(x, save_mask)


@_leaky_relu_.register_fake
def _(x, negative_slope, save_mask):
    return _empty_mask(x, save_mask)


# autograd: what each forward saves, and the backward op that reads it
def _save_output(ctx, inputs, output):
    ctx.save_for_backward(output)


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.extra = inputs[1:]


def _save_mask(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.extra = inputs[1:-1]  # leaky_relu's slope


_sigmoid.register_autograd(lambda ctx, grad: _sigmoid_backward(grad, *ctx.saved_tensors),
                           setup_context=_save_output)
_tanh.register_autograd(lambda ctx, grad: _tanh_backward(grad, *ctx.saved_tensors),
                        setup_context=_save_output)
_gelu.register_autograd(lambda ctx, grad: (_gelu_backward(grad, *ctx.saved_tensors, *ctx.extra), None),
                        setup_context=_save_input)
_silu.register_autograd(lambda ctx, grad: _silu_backward(grad, *ctx.saved_tensors),
                        setup_context=_save_input)
_relu.register_autograd(lambda ctx, grad, _: (_relu_backward(grad, *ctx.saved_tensors), None),
                        setup_context=_save_mask)
_leaky_relu.register_autograd(
    lambda ctx, grad, _: (_leaky_relu_backward(grad, *ctx.saved_tensors, *ctx.extra), None, None),
    setup_context=_save_mask)


class _MaskActivationInPlace(torch.autograd.Function):
    """relu_/leaky_relu_ under autograd: the input is overwritten, the bit mask is saved."""

    @staticmethod
    def forward(ctx, x: Tensor, negative_slope: float | None) -> Tensor:
        if negative_slope is None:
            mask = _relu_(x, True)
        else:
            mask = _leaky_relu_(x, negative_slope, True)
        ctx.mark_dirty(x)
        ctx.save_for_backward(mask)
        ctx.negative_slope = negative_slope
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        if ctx.negative_slope is None:
            return _relu_backward(grad, mask), None
        return _leaky_relu_backward(grad, mask, ctx.negative_slope), None


class _SiluInPlace(torch.autograd.Function):
    """silu_ under autograd: the backward needs the input, so a copy is saved (as torch does)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x.clone())
        _silu_(x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _silu_backward(grad, x)


def _gelu_kind(approximate: str) -> str:
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise RuntimeError("approximate argument must be either none or tanh.")


# ----------------------------------------------------------------------------------
# the public functions: torch.nn.functional's signatures
# ----------------------------------------------------------------------------------
def sigmoid(input: Tensor) -> Tensor:
    """torch.sigmoid; the backward reads the saved output."""
    if not _use_kernels(input, "sigmoid"):
        return torch.sigmoid(input)
    return _sigmoid(input)


def tanh(input: Tensor) -> Tensor:
    """torch.tanh; the backward reads the saved output."""
    if not _use_kernels(input, "tanh"):
        return torch.tanh(input)
    return _tanh(input)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """torch.nn.functional.relu; saves a 1-bit-per-element mask for backward."""
    if not _use_kernels(input, "relu"):
        return F.relu(input, inplace)
    if inplace:
        if _needs_grad(input):
            _check_in_place(input)
            return _MaskActivationInPlace.apply(input, None)
        _relu_(input, False)
        return input
    return _relu(input, _needs_grad(input))[0]


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """torch.nn.functional.leaky_relu; saves a 1-bit-per-element mask for backward.

    Unlike torch, ``inplace=True`` with a negative slope supports backward.
    """
    if not _use_kernels(input, "leaky_relu"):
        return F.leaky_relu(input, negative_slope, inplace)
    negative_slope = float(negative_slope)
    if inplace:
        if _needs_grad(input):
            _check_in_place(input)
            return _MaskActivationInPlace.apply(input, negative_slope)
        _leaky_relu_(input, negative_slope, False)
        return input
    return _leaky_relu(input, negative_slope, _needs_grad(input))[0]


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu, ``approximate`` 'none' (erf) or 'tanh'; saves the input.

    Both forms keep full relative accuracy for large negative inputs.
    """
    _gelu_kind(approximate)  # torch's error for anything else, before any fallback
    if not _use_kernels(input, "gelu"):
        return F.gelu(input, approximate=approximate)
    return _gelu(input, approximate)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """torch.nn.functional.silu; saves the input (in place: a copy of it, as torch does)."""
    if not _use_kernels(input, "silu"):
        return F.silu(input, inplace)
    if inplace:
        if _needs_grad(input):
            _check_in_place(input)
            return _SiluInPlace.apply(input)
        _silu_(input)
        return input
    return _silu(input)
