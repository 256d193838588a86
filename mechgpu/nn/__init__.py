"""Drop-in fused activation modules for ``torch.nn``.

``Sigmoid``, ``Tanh``, ``ReLU``, ``LeakyReLU``, ``GELU`` and ``SiLU`` subclass their
``torch.nn`` twins: constructors, attributes, ``repr`` and ``isinstance`` checks are
torch's, and only ``forward`` calls mechgpu's kernels (see ``mechgpu.nn.functional``
for how the results differ from torch's). ``swap_activations(model)`` puts them into an
existing model in place of torch's, and of Hugging Face transformers' and timm's equivalents.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import torch

from . import functional

__all__ = ["Sigmoid", "Tanh", "ReLU", "LeakyReLU", "GELU", "SiLU", "swap_activations", "functional"]


class Sigmoid(torch.nn.Sigmoid):
    """torch.nn.Sigmoid with a fused Triton forward and backward (saves the output)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.sigmoid(input)


class Tanh(torch.nn.Tanh):
    """torch.nn.Tanh with a fused Triton forward and backward (saves the output)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.tanh(input)


class ReLU(torch.nn.ReLU):
    """torch.nn.ReLU with fused Triton kernels; saves 1 bit per element for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.relu(input, inplace=self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    """torch.nn.LeakyReLU with fused Triton kernels; saves 1 bit per element for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.leaky_relu(input, self.negative_slope, self.inplace)


class GELU(torch.nn.GELU):
    """torch.nn.GELU with a fused Triton forward and backward (saves the input)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.gelu(input, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    """torch.nn.SiLU with a fused Triton forward and backward (saves the input)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.silu(input, inplace=self.inplace)


# how to build our module from the one it replaces; None: no exact match in this configuration
_Build = Callable[[torch.nn.Module], "torch.nn.Module | None"]


def _carry(cls: type[torch.nn.Module], *args: str) -> _Build:
    """Ours, with the replaced module's values of these constructor arguments."""
    return lambda old: cls(**{arg: getattr(old, arg) for arg in args})


def _fixed(cls: type[torch.nn.Module], **kwargs) -> _Build:
    """Ours, with these constructor arguments."""
    return lambda old: cls(**kwargs)


def _unless_in_place(cls: type[torch.nn.Module]) -> _Build:
    """Ours, for a module with an ``inplace`` flag that ours lacks: only when the flag is off."""
    return lambda old: None if old.inplace else cls()


# torch's classes -> ours
_REPLACEMENTS: dict[type, _Build] = {
    torch.nn.Sigmoid: _carry(Sigmoid),
    torch.nn.Tanh: _carry(Tanh),
    torch.nn.ReLU: _carry(ReLU, "inplace"),
    torch.nn.LeakyReLU: _carry(LeakyReLU, "negative_slope", "inplace"),
    torch.nn.GELU: _carry(GELU, "approximate"),
    torch.nn.SiLU: _carry(SiLU, "inplace"),
}

# Other libraries' activation modules that compute the same function as one of ours:
# (module, class names, build). Looked up in sys.modules when swap_activations runs (a model
# made of them has imported them), so nothing here imports them, and a missing name is skipped.
# In fp32 each matches the original within our tolerances (tests/test_integrations.py).
_LIBRARY_REPLACEMENTS: tuple[tuple[str, tuple[str, ...], _Build], ...] = (
    # erf GELU: F.gelu, or its erf formula (use_gelu_python=True)
    ("transformers.activations", ("GELUActivation",), _fixed(GELU, approximate="none")),
    # tanh GELU: F.gelu(approximate="tanh"), or the formula written out; FastGELU's constant
    # 0.7978845608 is sqrt(2/pi) to 4e-12
    ("transformers.activations", ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation",
                                  "AccurateGELUActivation"), _fixed(GELU, approximate="tanh")),
    ("transformers.activations", ("SiLUActivation",), _fixed(SiLU)),
    # timm's GELU/GELUTanh take a dummy inplace argument; its Sigmoid/Tanh write in place when asked
    ("timm.layers.activations", ("GELU",), _fixed(GELU, approximate="none")),
    ("timm.layers.activations", ("GELUTanh",), _fixed(GELU, approximate="tanh")),
    ("timm.layers.activations", ("Swish",), _carry(SiLU, "inplace")),
    ("timm.layers.activations", ("Sigmoid",), _unless_in_place(Sigmoid)),
    ("timm.layers.activations", ("Tanh",), _unless_in_place(Tanh)),
)


def _replacement_table() -> dict[type, _Build]:
    """torch's classes and those of the libraries already imported -> how to build ours."""
    table = dict(_REPLACEMENTS)
    for module_name, class_names, build in _LIBRARY_REPLACEMENTS:
        module = sys.modules.get(module_name)
        for class_name in class_names:
            cls = getattr(module, class_name, None)
            if isinstance(cls, type):
                table[cls] = build
    return table


def twin(module: torch.nn.Module) -> torch.nn.Module | None:
    """The mechgpu module ``swap_activations`` would put in place of ``module``, or None."""
    build = _replacement_table().get(type(module))
    return None if build is None else build(module)


# what counts as an activation module when reporting the ones left alone
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations", "timm.layers.activations")
_NOT_ACTIVATIONS = frozenset({"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d"})
_ACTIVATION_NAME = re.compile("activation|relu|gelu|silu|swish|sigmoid|tanh|mish", re.IGNORECASE)


def _is_activation(cls: type) -> bool:
    """Defined among torch's, transformers' or timm's activations, or named like one; not ours."""
    if issubclass(cls, (Sigmoid, Tanh, ReLU, LeakyReLU, GELU, SiLU)) or cls.__name__ in _NOT_ACTIVATIONS:
        return False
    return cls.__module__.startswith(_ACTIVATION_MODULES) or bool(_ACTIVATION_NAME.search(cls.__name__))


class SwapReport(dict):
    """What ``swap_activations`` did: ``{qualified name: module replaced}``, and in ``left_alone``
    ``{qualified name: class name}`` of the activation modules it kept."""

    def __init__(self, replaced: dict[str, torch.nn.Module], left_alone: dict[str, str]) -> None:
        super().__init__(replaced)
        self.left_alone = left_alone

    def __repr__(self) -> str:
        return f"SwapReport(replaced={dict.__repr__(self)}, left_alone={self.left_alone!r})"


def swap_activations(model: torch.nn.Module) -> SwapReport:
    """Replace every activation module inside ``model`` that has an exact mechgpu twin, in place.

    Replaced (exact types, not subclasses), keeping their arguments and training flag:

    * torch's ``Sigmoid``, ``Tanh``, ``ReLU``, ``LeakyReLU``, ``GELU`` and ``SiLU``;
    * Hugging Face transformers' ``GELUActivation`` (erf GELU), ``GELUTanh``/``PytorchGELUTanh``,
      ``NewGELUActivation``, ``FastGELUActivation``, ``AccurateGELUActivation`` (tanh GELU) and
      ``SiLUActivation``: every ``ACT2FN`` entry that computes one of ours;
    * timm's ``GELU``, ``GELUTanh``, ``Swish``, and ``Sigmoid``/``Tanh`` unless ``inplace=True``.

    The functions are the same, and so are the fp32 results within mechgpu's tolerances. In
    bf16/fp16, the GELUs that transformers writes out as formulas (``NewGELUActivation`` and
    the like) round after each of their operations; ours rounds once, as ``torch.nn.GELU``.

    Returns a ``SwapReport``: ``{qualified name: replaced module}`` (so
    ``model.get_submodule(name)`` gives the new one), and in ``.left_alone`` ``{qualified name:
    class name}`` of the activation modules it kept, having no exact twin (QuickGELU, Mish, ReLU6,
    a subclass, timm's in-place Sigmoid, ...). Activation modules are those defined among torch's,
    transformers' or timm's activations, and any other whose class name contains activation,
    relu, gelu, silu, swish, sigmoid, tanh or mish; mechgpu's own are neither replaced nor listed.
    A module registered under several names is replaced by one shared module, and listed under
    each name. The model itself is never replaced: wrap a bare activation in a container first.
    """
    table = _replacement_table()
    build = table.get(type(model))
    if build is not None and (ours := build(model)) is not None:
        raise ValueError(f"swap_activations replaces modules inside a model; got a bare {type(model).__name__}, "
                         f"use mechgpu.nn.{type(ours).__name__} directly")
    replaced: dict[str, torch.nn.Module] = {}
    left_alone: dict[str, str] = {}
    new_for: dict[int, torch.nn.Module | None] = {}
    found = [(parent, child_name, child, f"{parent_name}.{child_name}" if parent_name else child_name)
             for parent_name, parent in model.named_modules(remove_duplicate=False)
             for child_name, child in parent._modules.items()  # named_children() skips repeats
             if child is not None]
    for parent, child_name, child, name in found:
        build = table.get(type(child))
        if build is not None and id(child) not in new_for:
            new = build(child)
            new_for[id(child)] = None if new is None else new.train(child.training)
        new = new_for.get(id(child))
        if new is not None:
            setattr(parent, child_name, new)
            replaced[name] = child
        elif _is_activation(type(child)):
            left_alone[name] = type(child).__name__
    return SwapReport(replaced, left_alone)
