#!/usr/bin/env python3
"""Set up a local environment and run mechgpu's main job or its tests. Needs only python3.

    python3 run.py            # the main job (`mechgpu train`)
    python3 run.py test       # the full test suite (extra args go to pytest)
    python3 run.py mechgpu …  # any mechgpu CLI command inside the environment

The environment is ``.venv`` next to this file. It sees the interpreter's own packages, so
a torch that is already installed (a CUDA build on a GPU machine, say) is used as it is.
Torch is installed only when missing: ``torch==2.13.0`` (the CPU build) on a machine
without an NVIDIA driver, never the multi-GB CUDA build there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
CPU_TORCH = "torch==2.13.0"


def venv_python() -> str:
    return os.path.join(VENV, "Scripts" if os.name == "nt" else "bin", "python")


def sh(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def has_module(python: str, name: str) -> bool:
    return subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0


def setup() -> str:
    python = venv_python()
    if not os.path.exists(python):
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(VENV)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        stamp = hashlib.sha256(f.read()).hexdigest()
    stamp_file = os.path.join(VENV, ".mechgpu-installed")
    if os.path.exists(stamp_file) and open(stamp_file).read() == stamp and has_module(python, "torch"):
        return python
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if not has_module(python, "torch"):
        has_nvidia = shutil.which("nvidia-smi") is not None
        sh(*pip, "torch" if has_nvidia else CPU_TORCH)
    sh(*pip, "-e", f"{ROOT}[test]")
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return python


def main(argv: list[str]) -> int:
    python = setup()
    env = dict(os.environ)
    if argv[:1] == ["test"]:
        cmd = [python, "-m", "pytest", *argv[1:]]
    elif argv[:1] == ["mechgpu"]:
        cmd = [python, "-m", "mechgpu", *argv[1:]]
    elif not argv:
        cmd = [python, "-m", "mechgpu", "train"]
    else:
        print(__doc__)
        return 2
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
