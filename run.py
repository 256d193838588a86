#!/usr/bin/env python3
"""Set up a local environment and run mechgpu's main job or its tests. Needs only python3.

    python3 run.py            # the main job (`mechgpu tour`)
    python3 run.py test       # the full test suite (extra args go to pytest)
    python3 run.py mechgpu …  # any mechgpu CLI command inside the environment
    python3 run.py lock       # re-resolve the test environment and rewrite tests/constraints.txt

The environment is ``.venv`` next to this file. It sees the interpreter's own packages, so
a torch that is already installed (a CUDA build on a GPU machine, say) is used as it is.
Torch and triton are installed only when missing: ``torch==2.13.0`` (the CPU build) on a
machine without an NVIDIA driver, never the multi-GB CUDA build there, and ``triton==3.9.0``.
Everything else comes at the versions locked in ``tests/constraints.txt`` (a pip constraints
file), so the test environment changes only by a commit that rewrites that file.
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
TRITON = "triton==3.9.0"
# The locked test environment: every distribution that mechgpu[test] (and torch, triton) needs,
# at one version each, torch and triton themselves excepted (users bring their own).
LOCK = os.path.join(ROOT, "tests", "constraints.txt")
UNLOCKED = {"torch", "triton", "mechgpu"}
TEST_WORKERS = 2  # pytest-xdist workers of `run.py test`


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
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", LOCK]


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
    stamp = hashlib.sha256()
    for name in (os.path.join(ROOT, "pyproject.toml"), LOCK):
        with open(name, "rb") as f:
            stamp.update(f.read())
    stamp = stamp.hexdigest()
    stamp_file = os.path.join(VENV, ".mechgpu-installed")
    if os.path.exists(stamp_file) and open(stamp_file).read() == stamp and has_module(python, "torch"):
        return python
    torch = "torch" if shutil.which("nvidia-smi") is not None else CPU_TORCH
    missing = [spec for module, spec in (("torch", torch), ("triton", TRITON)) if not has_module(python, module)]
    if missing:
        sh(*pip_install(python), *missing)
    sh(*install_command(python))
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return python


def locked_requirements() -> list[str]:
    """``name==version`` for every installed distribution that mechgpu[test] reaches through its
    requirements (markers evaluated for this interpreter), torch, triton and mechgpu excepted."""
    import re
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins, seen = {}, set()
    todo = [("mechgpu", frozenset({"test"}))]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional requirement whose marker held but that nothing installed
        if canonical(name) not in UNLOCKED:
            pins[canonical(name)] = f"{canonical(name)}=={dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append((canonical(req.name), frozenset(req.extras)))
    return sorted(pins.values())


def lock() -> int:
    """Resolve mechgpu[test] afresh in a new environment (torch and triton at run.py's pins) and
    write the versions it got to tests/constraints.txt. Needs a package registry."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        venv.EnvBuilder(with_pip=True).create(tmp)
        python = os.path.join(tmp, "Scripts" if os.name == "nt" else "bin", "python")
        fresh = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        sh(*fresh, CPU_TORCH, TRITON)
        sh(*fresh, "-e", f"{ROOT}[test]")
        pins = subprocess.run([python, os.path.abspath(__file__), "--print-lock"], check=True, capture_output=True,
                              text=True).stdout
    with open(LOCK, "w") as f:
        f.write(pins)
    print(f"wrote {LOCK}: {sum(not line.startswith('#') for line in pins.splitlines())} pins")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--print-lock"]:  # run by `lock` inside the fresh environment
        print("# The locked test environment (pip constraints), written by `python3 run.py lock`; torch and\n"
              "# triton are not in it (run.py installs its pins of them only where they are missing).")
        print("\n".join(locked_requirements()))
        return 0
    if argv == ["lock"]:
        return lock()
    python = setup()
    env = dict(os.environ)
    if argv[:1] == ["test"]:
        # two workers for CI's two cores; loadgroup keeps each xdist_group (one fixture's tests) on one worker
        cmd = [python, "-m", "pytest", "-n", str(TEST_WORKERS), "--dist", "loadgroup", *argv[1:]]
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
