"""Drop-in fused activations for ``torch.nn.functional``: one Triton kernel each way.

``sigmoid``, ``tanh``, ``relu``, ``leaky_relu``, ``gelu`` and ``silu`` take torch's
arguments and return what torch returns, to a few ulps (see ``kernels/activation.py``).
Each is a ``torch.library`` custom op with autograd, vmap and fake implementations, so
models that use them compile with ``torch.compile(fullgraph=True)``.

The PyTorch tools, as with torch's own activations:

* **torch.func**: grad, vjp, jacrev, vmap, jvp, jacfwd, hessian and their nestings. vmap runs
  one kernel launch over the whole batch.
* **Higher derivatives**: backward is differentiable (``create_graph=True``, gradient
  penalties, Hessian-vector products), and forward-mode AD works. The backward's own
  derivative reuses the backward kernel in the upstream gradient, and torch ops in fp32 in
  the saved tensor.
* **torch.jit.script, torch.jit.trace and torch.export** record torch's own activation:
  their graphs run later, in another process, grad mode or device, or outside Python, so
  they hold portable torch ops that need no mechgpu to load (and are the same whatever
  TRITON_INTERPRET is). torch.compile is the way to keep mechgpu's kernels in a graph.

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
* **Double backward through relu/leaky_relu alone.** Their input gradient reads only the
  mask, so it depends on the input only through the upstream gradient. Where nothing else
  links it to the input (``x -> relu -> sum``), differentiating it again raises "does not
  require grad" (pass ``allow_unused=True``); torch returns zeros there.
* **torch.compile around a torch.func transform** (``torch.compile(torch.func.grad(f))``)
  fails while tracing: PyTorch's custom ops lack torch.func support inside torch.compile
  (pytorch/pytorch#168393). Compile the model, or apply the transform outside torch.compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

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
    """True when mechgpu's kernels handle this call; False means: call torch's op.

    torch.jit.trace and torch.export record torch's op: their graphs run later, in another
    grad mode, on another device or outside Python, where mechgpu's choices for this call
    (its kernels or torch's fallback, whether to save relu's mask) would not hold.
    """
    if input.dtype not in kernels.SUPPORTED_DTYPES or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    if not kernels_run_on(input.device):
        _warn_cpu_fallback(name)
        return False
    return True


def _needs_grad(input: Tensor) -> bool:
    return torch.is_grad_enabled() and input.requires_grad


def _transformed(*tensors: Tensor) -> bool:
    """True under torch.func's transforms and for forward-mode dual tensors. Ops then run through
    their autograd.Function (torch.func takes only that form, and the ops' registered autograd
    has no forward mode), and in-place calls go out of place and copy back, which these
    transforms differentiate and batch."""
    return not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active()  # what autograd.Function.apply itself asks
        or any(forward_ad.unpack_dual(t).tangent is not None for t in tensors))


def _save_mask(input: Tensor) -> bool:
    """Whether relu's mask is saved: for backward, and under a transform (a vmapped tensor does
    not say whether a grad transform outside the vmap needs it)."""
    return _needs_grad(input) or _transformed(input)


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


# vmap rules: the ops are elementwise, so one launch covers the whole batch
def _batch_first(t: Tensor, dim: int | None, batch_size: int) -> Tensor:
    return t.expand(batch_size, *t.shape) if dim is None else t.movedim(dim, 0)


def _pad_to_words(t: Tensor) -> Tensor:
    """(batch, ...) -> (batch, n) with n the sample size rounded up to whole mask words (zeros
    appended), so that the one mask the kernel writes splits into one mask per sample."""
    flat = t.reshape(len(t), -1)
    return F.pad(flat, (0, -flat.shape[1] % kernels.BITS_PER_WORD))


def _vmap_elementwise(op):
    def rule(info, in_dims, *args):
        args = [_batch_first(a, d, info.batch_size) if isinstance(a, Tensor) else a for a, d in zip(args, in_dims)]
        return op(*args), 0
    return rule


def _vmap_mask_forward(op):
    def rule(info, in_dims, x, *scalars):
        x = x.movedim(in_dims[0], 0)
        y, mask = op(_pad_to_words(x), *scalars)
        masks = mask.view(len(x), -1) if mask.numel() else mask.new_empty(len(x), 0)
        return (y[:, :x.shape[1:].numel()].reshape(x.shape), masks), (0, 0)
    return rule


def _vmap_mask_backward(op):
    def rule(info, in_dims, grad, mask, *scalars):
        grad = _batch_first(grad, in_dims[0], info.batch_size)
        masks = _batch_first(mask, in_dims[1], info.batch_size).reshape(-1).contiguous()  # the launcher reads it flat
        dx = op(_pad_to_words(grad), masks, *scalars)
        return dx[:, :grad.shape[1:].numel()].reshape(grad.shape), 0
    return rule


for _op in (_sigmoid, _tanh, _gelu, _silu, _sigmoid_backward, _tanh_backward, _gelu_backward, _silu_backward):
    _op.register_vmap(_vmap_elementwise(_op))
for _op in (_relu, _leaky_relu):
    _op.register_vmap(_vmap_mask_forward(_op))
for _op in (_relu_backward, _leaky_relu_backward):
    _op.register_vmap(_vmap_mask_backward(_op))


# ----------------------------------------------------------------------------------
# autograd. Each op (forward and backward) has one setup_context, backward and jvp, used
# twice: as the op's registered autograd (plain autograd, torch.compile) and as an
# autograd.Function in the setup_context form, for torch.func, which takes only that
# (pytorch/pytorch#168393), and forward-mode AD; the Function's vmap rule is generated
# from the ops' vmap rules above. The backward ops are differentiable in turn: double
# backward, Hessians.
# ----------------------------------------------------------------------------------
_GELU_TANH_K = 2 * math.sqrt(2 / math.pi)  # gelu('tanh') = x sigmoid(z), z = K (x + C x^3)
_GELU_TANH_C = 0.044715


def _curvature(kind: str, saved: Tensor) -> Tensor:
    """d act'/ds at the saved tensor s (y for sigmoid and tanh, x for the others), in fp32:
    what the double backward multiplies into the gradient that flows to s."""
    s = saved.float()
    if kind == "sigmoid":
        return 1 - 2 * s
    if kind == "tanh":
        return -2 * s
    if kind == "gelu":
        return torch.exp(-0.5 * s * s) * (2 - s * s) / math.sqrt(2 * math.pi)
    # x sigmoid(z): act'' = sigmoid(z) sigmoid(-z) (2 z' + x (1 - 2 sigmoid(z)) z'^2 + x z'')
    if kind == "silu":
        z, dz, x_ddz = s, 1.0, 0.0
    else:
        z = _GELU_TANH_K * (s + _GELU_TANH_C * s * s * s)
        dz = _GELU_TANH_K * (1 + 3 * _GELU_TANH_C * s * s)
        x_ddz = 6 * _GELU_TANH_K * _GELU_TANH_C * s * s
    p, q = torch.sigmoid(z), torch.sigmoid(-z)  # sigmoid(z) and 1 - sigmoid(z), without cancellation
    return p * q * (2 * dz + s * (q - p) * dz * dz + x_ddz)


def _with_function(op, setup_context, backward, jvp) -> Callable[..., Tensor]:
    """``op`` with autograd: ``setup_context``, ``backward`` and ``jvp`` become the op's
    registered autograd and an autograd.Function; a call goes through the Function only where
    ``_transformed`` says so, since the Function costs a few microseconds more."""
    op.register_autograd(backward, setup_context=setup_context)
    overload = op._opoverload  # torch.compile traces an OpOverload inside a Function, not a CustomOpDef

    def forward(*args):
        return overload(*args)

    function = type(f"{op._name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp), "generate_vmap_rule": True})

    def call(*args):
        transformed = _transformed(*(a for a in args if isinstance(a, Tensor)))
        return function.apply(*args) if transformed else overload(*args)

    return call


def _backward_with_autograd(op, kind: Callable[..., str] | None) -> Callable[..., Tensor]:
    """``op(grad, saved, *scalars) = grad act'(saved)`` as a differentiable function: its
    derivative in grad is the op again, in saved ``grad act''(saved)`` (``kind(*scalars)`` names
    the activation for ``_curvature``; None for a bit mask, which has no derivative)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.save_for_forward(*inputs[:2])
        ctx.scalars = inputs[2:]

    def through_saved(ctx, t):  # t d op/d saved
        grad, saved = ctx.saved_tensors
        return (t.float() * grad.float() * _curvature(kind(*ctx.scalars), saved)).to(saved.dtype)

    def backward(ctx, grad_dx):
        d_grad = differentiable(grad_dx, ctx.saved_tensors[1], *ctx.scalars) if ctx.needs_input_grad[0] else None
        d_saved = through_saved(ctx, grad_dx) if ctx.needs_input_grad[1] else None
        return d_grad, d_saved, *(None for _ in ctx.scalars)

    def jvp(ctx, grad_t, saved_t, *_):
        parts = [] if grad_t is None else [differentiable(grad_t, ctx.saved_tensors[1], *ctx.scalars)]
        return sum(parts + ([] if saved_t is None else [through_saved(ctx, saved_t)]))

    differentiable = _with_function(op, setup_context, backward, jvp)
    return differentiable


def _with_autograd(op, saves: str, backward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The forward ``op`` as a differentiable function whose backward (and, the Jacobian being
    diagonal, forward-mode derivative) is ``backward(grad, saved, *scalars)``. ``saves``:
    "output", "input" (the op's other arguments are the scalars) or "mask" (output 1; the
    scalars sit between x and save_mask)."""

    def setup_context(ctx, inputs, output):
        if saves == "output":
            saved, ctx.scalars = output, ()
        elif saves == "input":
            saved, ctx.scalars = inputs[0], inputs[1:]
        else:
            ctx.mark_non_differentiable(output[1])
            saved, ctx.scalars = output[1], inputs[1:-1]
        ctx.save_for_backward(saved)
        ctx.save_for_forward(saved)

    def input_grad(ctx, grad, *_):
        return backward(grad, *ctx.saved_tensors, *ctx.scalars), *(None for _ in ctx.needs_input_grad[1:])

    def jvp(ctx, x_t, *_):
        y_t = backward(x_t, *ctx.saved_tensors, *ctx.scalars)
        return (y_t, None) if saves == "mask" else y_t

    return _with_function(op, setup_context, input_grad, jvp)


_autograd_sigmoid_backward = _backward_with_autograd(_sigmoid_backward, lambda: "sigmoid")
_autograd_tanh_backward = _backward_with_autograd(_tanh_backward, lambda: "tanh")
_autograd_gelu_backward = _backward_with_autograd(_gelu_backward, lambda approximate: _gelu_kind(approximate))
_autograd_silu_backward = _backward_with_autograd(_silu_backward, lambda: "silu")
_autograd_relu_backward = _backward_with_autograd(_relu_backward, None)
_autograd_leaky_relu_backward = _backward_with_autograd(_leaky_relu_backward, None)

_autograd_sigmoid = _with_autograd(_sigmoid, "output", _autograd_sigmoid_backward)
_autograd_tanh = _with_autograd(_tanh, "output", _autograd_tanh_backward)
_autograd_gelu = _with_autograd(_gelu, "input", _autograd_gelu_backward)
_autograd_silu = _with_autograd(_silu, "input", _autograd_silu_backward)
_autograd_relu = _with_autograd(_relu, "mask", _autograd_relu_backward)
_autograd_leaky_relu = _with_autograd(_leaky_relu, "mask", _autograd_leaky_relu_backward)


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
            return _autograd_relu_backward(grad, mask), None
        return _autograd_leaky_relu_backward(grad, mask, ctx.negative_slope), None


class _SiluInPlace(torch.autograd.Function):
    """silu_ under autograd: the backward needs the input, so a copy of it is saved (as torch
    does), made by the caller so that it keeps its history for double backward."""

    @staticmethod
    def forward(ctx, x: Tensor, x_copy: Tensor) -> Tensor:
        ctx.save_for_backward(x_copy)
        _silu_(x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return _autograd_silu_backward(grad, x), None


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
    if torch.jit.is_scripting():  # TorchScript compiles torch's op
        return torch.sigmoid(input)
    if not _use_kernels(input, "sigmoid"):
        return torch.sigmoid(input)
    return _autograd_sigmoid(input)


def tanh(input: Tensor) -> Tensor:
    """torch.tanh; the backward reads the saved output."""
    if torch.jit.is_scripting():  # TorchScript compiles torch's op
        return torch.tanh(input)
    if not _use_kernels(input, "tanh"):
        return torch.tanh(input)
    return _autograd_tanh(input)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """torch.nn.functional.relu; saves a 1-bit-per-element mask for backward."""
    if torch.jit.is_scripting():  # TorchScript compiles torch's op
        return F.relu(input, inplace)
    if not _use_kernels(input, "relu"):
        return F.relu(input, inplace)
    if inplace:
        if _transformed(input):
            return input.copy_(relu(input))
        if _needs_grad(input):
            _check_in_place(input)
            return _MaskActivationInPlace.apply(input, None)
        _relu_(input, False)
        return input
    return _autograd_relu(input, _save_mask(input))[0]


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """torch.nn.functional.leaky_relu; saves a 1-bit-per-element mask for backward.

    Unlike torch, ``inplace=True`` with a negative slope supports backward.
    """
    if torch.jit.is_scripting():  # TorchScript compiles torch's op
        return F.leaky_relu(input, negative_slope, inplace)
    if not _use_kernels(input, "leaky_relu"):
        return F.leaky_relu(input, negative_slope, inplace)
    negative_slope = float(negative_slope)
    if inplace:
        if _transformed(input):
            return input.copy_(leaky_relu(input, negative_slope))
        if _needs_grad(input):
            _check_in_place(input)
            return _MaskActivationInPlace.apply(input, negative_slope)
        _leaky_relu_(input, negative_slope, False)
        return input
    return _autograd_leaky_relu(input, negative_slope, _save_mask(input))[0]


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu, ``approximate`` 'none' (erf) or 'tanh'; saves the input.

    Both forms keep full relative accuracy for large negative inputs.
    """
    if torch.jit.is_scripting():  # TorchScript compiles torch's op
        return F.gelu(input, approximate=approximate)
    _gelu_kind(approximate)  # torch's error for anything else, before any fallback
    if not _use_kernels(input, "gelu"):
        return F.gelu(input, approximate=approximate)
    return _autograd_gelu(input, approximate)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """torch.nn.functional.silu; saves the input (in place: a copy of it, as torch does)."""
    if torch.jit.is_scripting():  # TorchScript compiles torch's op
        return F.silu(input, inplace)
    if not _use_kernels(input, "silu"):
        return F.silu(input, inplace)
    if inplace:
        if _transformed(input):
            return input.copy_(silu(input.clone()))  # silu saves its input, which copy_ overwrites
        if _needs_grad(input):
            _check_in_place(input)
            return _SiluInPlace.apply(input, input.clone())
        _silu_(input)
        return input
    return _autograd_silu(input)
