#!/usr/bin/env python3
"""Set up a local environment and run mechgpu's main job or its tests. Needs only python3.

    python3 run.py            # the main job (`mechgpu tour`)
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


# The build backend this checkout needs (pyproject.toml's build-system): setuptools 64 brought
# editable wheels (PEP 660); before 70.1 they also need the wheel package.
BUILD_BACKEND_CHECK = (
    "import importlib.util, setuptools, sys; v = tuple(int(x) for x in setuptools.__version__.split('.')[:2]); "
    "sys.exit(0 if v >= (70, 1) or (v >= (64, 0) and importlib.util.find_spec('wheel')) else 1)")


def pip_install(python: str) -> list[str]:
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]


def install_command(python: str) -> list[str]:
    """pip's editable install of this checkout with its test extras. Where the environment already
    has the build backend, pip builds without isolation: an isolated build downloads setuptools
    first, which fails on a machine without a package registry (a lent GPU machine, say), while
    dependencies that are already installed need no download either way."""
    cmd = pip_install(python)
    if subprocess.run([python, "-c", BUILD_BACKEND_CHECK], capture_output=True).returncode == 0:
        cmd.append("--no-build-isolation")
    return cmd + ["-e", f"{ROOT}[test]"]


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
    if not has_module(python, "torch"):
        has_nvidia = shutil.which("nvidia-smi") is not None
        sh(*pip_install(python), "torch" if has_nvidia else CPU_TORCH)
    sh(*install_command(python))
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
        cmd = [python, "-m", "mechgpu", "tour"]
    else:
        print(__doc__)
        return 2
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
