"""A process in which triton compiles kernels for sm_90 and launches none: no GPU needed.

Imported first in a fresh interpreter without TRITON_INTERPRET. It makes a stand-in
driver active, which answers what ``JITFunction.run`` asks before it compiles (device 0,
stream 0, target sm_90), and turns every launch into triton's own ``warmup=True`` run:
the specialisation key is computed, the kernel compiled and cached in
``device_caches`` exactly as on a GPU, and nothing is launched. A compiled kernel's own
launcher (``CompiledKernel.run``, which ``kernels._launch.launch`` calls once it has bound a
kernel) is a no-op: the driver call is all that is left out. mechgpu's optimizers and
``mechgpu.clip`` are told that their kernels run on CPU tensors, so a real ``step()`` goes through its real
launchers. The params never change; only what triton compiles and caches is real.
"""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile-only runs need triton's compiler, not its interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
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

def _launch_nothing(*args) -> None:
    return None


def _no_module(self) -> None:
    """What ``CompiledKernel._init_handles`` does on a GPU (load the binary, make its launcher),
    with a launcher that launches nothing."""
    if self._run is None:
        self._run, self.function = _launch_nothing, 0


CompiledKernel._init_handles = _no_module

import mechgpu.clip as _clip  # noqa: E402  (its kernels decorated now, before anything sets TRITON_INTERPRET)
import mechgpu.optim._fused as _fused  # noqa: E402

_fused.kernels_run_on = _clip.kernels_run_on = lambda device: True
