"""Where mechgpu's kernels can run, and the one-time notice when torch's own code runs instead."""

from __future__ import annotations

import warnings

import torch

from .kernels.rounding import round_like

#: True when triton runs kernels in its interpreter (TRITON_INTERPRET=1 when triton was
#: imported), which is what lets them take CPU tensors.
INTERPRETED = type(round_like).__name__ == "InterpretedFunction"

_warned: set[str] = set()


def kernels_run_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def warn_fallback_once(area: str, message: str, stacklevel: int = 3) -> None:
    """Warn once per process and area ("optim", "nn", "init") that torch's own code ran."""
    if area not in _warned and not torch.compiler.is_compiling():
        _warned.add(area)
        warnings.warn(message + " This warning is shown once.", stacklevel=stacklevel + 1)


PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t) -> bool:
    """A torch.distributed DTensor (FSDP2 params and grads)."""
    return type(t) not in PLAIN_TENSORS and hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def has_data(t: torch.Tensor) -> bool:
    """A dense tensor with memory behind it (not on meta, not sparse or nested): one a checkpoint
    can load from."""
    t = local(t)
    return t.layout is torch.strided and not t.is_nested and t.device.type != "meta"


def is_dense(t: torch.Tensor) -> bool:
    """True when the elements fill a contiguous span of memory in some order (no gaps, no overlap)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def mixed_seed(seed: int, stream: int) -> int:
    """A generator seed for ``stream`` (an epoch, a case) of a run seeded with ``seed``: distinct
    for distinct pairs (a prime stride), within torch's seed range."""
    return (seed * 1_000_003 + stream) % 2**63
