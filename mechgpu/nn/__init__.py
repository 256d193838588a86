"""Drop-in fused activation modules for ``torch.nn``.

``Sigmoid``, ``Tanh``, ``ReLU``, ``LeakyReLU``, ``GELU`` and ``SiLU`` subclass their
``torch.nn`` twins: constructors, attributes, ``repr`` and ``isinstance`` checks are
torch's, and only ``forward`` calls mechgpu's kernels (see ``mechgpu.nn.functional``
for how the results differ from torch's). ``swap_activations(model)`` puts them into an
existing model in place of torch's.
"""

from __future__ import annotations

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


# torch's class -> ours, and the constructor arguments to carry over
_REPLACEMENTS: dict[type, tuple[type, tuple[str, ...]]] = {
    torch.nn.Sigmoid: (Sigmoid, ()),
    torch.nn.Tanh: (Tanh, ()),
    torch.nn.ReLU: (ReLU, ("inplace",)),
    torch.nn.LeakyReLU: (LeakyReLU, ("negative_slope", "inplace")),
    torch.nn.GELU: (GELU, ("approximate",)),
    torch.nn.SiLU: (SiLU, ("inplace",)),
}


def swap_activations(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Replace every torch activation module inside ``model`` with mechgpu's, in place.

    Modules whose type is exactly ``torch.nn.Sigmoid``, ``Tanh``, ``ReLU``, ``LeakyReLU``,
    ``GELU`` or ``SiLU`` are replaced by ours with the same arguments and training flag;
    subclasses of them (and mechgpu's own) are left alone. A module registered under
    several names is replaced by one shared module. Returns ``{qualified name: replaced
    module}``, so ``model.get_submodule(name)`` gives the new one. The model itself is
    never replaced: wrap a bare activation in a container first.
    """
    if type(model) in _REPLACEMENTS:
        raise ValueError(f"swap_activations replaces modules inside a model; got a bare {type(model).__name__}, "
                         f"use mechgpu.nn.{_REPLACEMENTS[type(model)][0].__name__} directly")
    found = [(parent, child_name, child, f"{parent_name}.{child_name}" if parent_name else child_name)
             for parent_name, parent in model.named_modules(remove_duplicate=False)
             for child_name, child in parent._modules.items()  # named_children() skips repeats
             if type(child) in _REPLACEMENTS]
    replaced: dict[str, torch.nn.Module] = {}
    new_for: dict[int, torch.nn.Module] = {}
    for parent, child_name, child, name in found:
        if id(child) not in new_for:
            cls, args = _REPLACEMENTS[type(child)]
            new = cls(**{arg: getattr(child, arg) for arg in args})
            new_for[id(child)] = new.train(child.training)
        setattr(parent, child_name, new_for[id(child)])
        replaced[name] = child
    return replaced
