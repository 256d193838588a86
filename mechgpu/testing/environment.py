"""The environment ``mechgpu check`` reports and requires: triton's version, the device, its driver,
the CUDA runtime and library versions."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

MIN_TRITON = (3, 2)  # pyproject: triton>=3.2
MIN_COMPUTE_CAPABILITY = (8, 0)


def triton_version_problem(version: str | None) -> str | None:
    """Why this triton cannot run mechgpu (None: missing), or None when it can."""
    if version is None:
        return ("mechgpu check: triton is not installed; mechgpu's kernels need triton>="
                f"{'.'.join(map(str, MIN_TRITON))} (pip install 'triton>={'.'.join(map(str, MIN_TRITON))}')")
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and tuple(map(int, match.groups())) < MIN_TRITON:
        return (f"mechgpu check: triton {version} is too old; mechgpu needs triton>="
                f"{'.'.join(map(str, MIN_TRITON))} (pip install -U 'triton>={'.'.join(map(str, MIN_TRITON))}')")
    return None


def cuda_problem(requested: str | None) -> str | None:
    """Why ``--device cuda`` cannot run here (torch sees no CUDA device), or None."""
    if requested != "cuda" or torch.cuda.is_available():
        return None
    return ("--device cuda was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA runtime {torch.version.cuda or 'none: a CPU build'})")


def installed_triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no nvidia-smi)"


def environment(device: str | torch.device) -> dict:
    """Device, driver, CUDA runtime and library versions, for the header and the JSON."""
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "triton": installed_triton_version(),
            "python": platform.python_version(), "cuda_runtime": torch.version.cuda or "none (CPU build of torch)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(device_name=torch.cuda.get_device_name(device), driver=_nvidia_driver(),
                    compute_capability=f"{major}.{minor}", interpreter=False)
    else:
        info.update(device_name=f"{_cpu_name()} ({os.cpu_count()} logical cores)", driver="n/a (CPU)",
                    compute_capability=None, interpreter=True)
    return info


def header_lines(env: dict, seed: int, quick: bool) -> list[str]:
    lines = [f"device        {env['device']}: {env['device_name']}",
             f"driver        {env['driver']}",
             f"CUDA runtime  {env['cuda_runtime']}",
             f"torch         {env['torch']}",
             f"triton        {env['triton']}",
             f"python        {env['python']}"]
    if env["compute_capability"]:
        lines.append(f"compute cap.  {env['compute_capability']}")
    if env["interpreter"]:
        lines.append("note          the kernels run in Triton's interpreter on the CPU: slow, for correctness only")
    lines.append(f"mode          {'quick' if quick else 'full'}")
    lines.append(f"seed          {seed} (repeat this run with --seed {seed})")
    return lines
