"""A process in which triton compiles kernels for sm_90 and launches none: no GPU needed.

Imported first in a fresh interpreter without TRITON_INTERPRET. It makes a stand-in
driver active, which answers what ``JITFunction.run`` asks before it compiles (device 0,
stream 0, target sm_90), and turns every launch into triton's own ``warmup=True`` run:
the specialisation key is computed, the kernel compiled and cached in
``device_caches`` exactly as on a GPU, and nothing is launched. mechgpu's optimizers are
told that their kernels run on CPU tensors, so a real ``step()`` goes through its real
launchers. The params never change; only what triton compiles and caches is real.
"""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile-only runs need triton's compiler, not its interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver before it compiles."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


triton.runtime.driver.set_active(CompileOnlyDriver())
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    return _run(self, *args, grid=grid, warmup=True, **kwargs)


JITFunction.run = _compile_only

import mechgpu.optim._fused as _fused  # noqa: E402

_fused.kernels_run_on = lambda device: True
