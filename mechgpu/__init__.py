"""mechgpu: fused Triton kernels for the mechanics of training, as drop-in PyTorch pieces.

Submodules load on first use, so ``import mechgpu`` does not import triton; the CLI relies
on that to set TRITON_INTERPRET=1 on a machine without a GPU before triton is imported.
"""

import importlib

__all__ = ["optim"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mechgpu' has no attribute {name!r}")
