"""mechgpu: fused Triton kernels for the mechanics of training, as drop-in PyTorch pieces.

Submodules load on first use, so ``import mechgpu`` does not import triton; the CLI relies
on that to set TRITON_INTERPRET=1 on a machine without a GPU before triton is imported.
"""

import importlib

_SUBMODULES = ["optim", "clip", "nn", "init", "diagnostics"]
_FUNCTIONS = {"clip_grad_norm_": "clip", "clip_grads_with_norm_": "clip", "get_total_norm": "clip"}
__all__ = _SUBMODULES + list(_FUNCTIONS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f".{_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module 'mechgpu' has no attribute {name!r}")
