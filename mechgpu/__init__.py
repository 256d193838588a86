"""mechgpu: fused Triton kernels for the mechanics of training, as drop-in PyTorch pieces.

Submodules load on first use, so ``import mechgpu`` does not import triton; the CLI relies
on that to set TRITON_INTERPRET=1 on a machine without a GPU before triton is imported.
``__version__`` is the installed distribution's version (pyproject.toml is its one source).
"""

import importlib

_SUBMODULES = ("optim", "clip", "nn", "init", "diagnostics", "train", "traffic", "tools", "kernels")
_FUNCTIONS = {"clip_grad_norm_": "clip", "clip_grads_with_norm_": "clip", "get_total_norm": "clip"}
__all__ = [*_SUBMODULES, *_FUNCTIONS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f".{_FUNCTIONS[name]}", __name__), name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(__name__)
        except PackageNotFoundError:  # a source tree on sys.path, never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "__version__"})
