"""run.py, the bootstrap behind the README's two commands: it installs with no package registry
(as on a lent GPU machine, which has torch and triton but reaches no index), from the locked
test environment; and Python started in the checkout root, as run.py and users start it, imports
Hugging Face's ``kernels`` package, never our ``kernels/`` folder, under that name."""

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# run.py is imported from its file: the checkout root never goes on this process's sys.path
_spec = importlib.util.spec_from_file_location("run", ROOT / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

NO_REGISTRY = dict(os.environ, PIP_NO_INDEX="1")  # pip may not look at any index


def _pip_dry_run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*command[:4], "--dry-run", *command[4:]], env=NO_REGISTRY, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_install_command_builds_without_a_registry():
    command = run.install_command(sys.executable)
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and "--no-build-isolation" in command
    out = _pip_dry_run(command)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_isolated_build_would_need_the_registry():
    """What run.py did before: the isolated build asks the index for setuptools, and fails without one."""
    command = [arg for arg in run.install_command(sys.executable) if arg != "--no-build-isolation"]
    assert _pip_dry_run(command).returncode != 0


def test_run_py_main_job_is_the_tour(monkeypatch):
    """``python3 run.py`` with no arguments runs ``mechgpu tour`` in its environment."""
    ran = []
    monkeypatch.setattr(run, "setup", lambda: "venv-python")
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert run.main([]) == 0
    assert ran == [["venv-python", "-m", "mechgpu", "tour"]]


def test_installs_take_the_lock():
    """Every pip install run.py makes is constrained by tests/constraints.txt, which pins no torch
    and no triton (users bring their own) and pins everything else at one version."""
    assert run.pip_install(sys.executable)[-2:] == ["-c", run.LOCK]
    pins = [line for line in Path(run.LOCK).read_text().splitlines() if line and not line.startswith("#")]
    names = [line.split("==")[0] for line in pins]
    assert all(line.count("==") == 1 for line in pins) and len(set(names)) == len(names), pins
    assert not {"torch", "triton", "mechgpu"} & set(names)
    assert {"transformers", "kernels", "pytest", "pytest-xdist", "numpy"} <= set(names)


@pytest.mark.skipif(not os.path.exists(os.path.join(sys.prefix, ".mechgpu-installed")),
                    reason="this environment was not made by run.py, the one that installs from the lock")
def test_the_environment_is_the_lock():
    """What mechgpu[test] reaches in this environment is exactly what tests/constraints.txt pins:
    nothing missing from the lock, nothing at another version."""
    pins = [line for line in Path(run.LOCK).read_text().splitlines() if line and not line.startswith("#")]
    assert run.locked_requirements() == pins


# Python started in the root puts the root on sys.path ('' for -c, the cwd for -m): each command
# must still import Hugging Face's kernels under the name "kernels" (transformers >= 5.25 does).
FROM_THE_ROOT = {
    "python -c": ["-c", "import transformers.activations, kernels, mechgpu.kernels.optim; "
                        "print(kernels.__file__); print(kernels.CUDAProperties.__name__)"],
    "python -m pytest": ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                         "tests/test_integrations.py::test_act2fn_covers_the_transformers_classes"],
    "python -m mechgpu tour": ["-m", "mechgpu", "tour", "--no-progress", "--steps", "1", "--dim", "16", "--depth", "1",
                               "--context", "8", "--micro-batch", "2"],
}


@pytest.mark.parametrize("command", FROM_THE_ROOT)
def test_python_in_the_root_imports_hugging_faces_kernels(command):
    try:
        distribution("kernels")
    except PackageNotFoundError:
        if os.environ.get("CI"):
            raise  # the locked test environment has it (through transformers)
        pytest.skip("Hugging Face's kernels package is not installed here")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    out = subprocess.run([sys.executable, *FROM_THE_ROOT[command]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    if command == "python -c":
        where, name = out.stdout.split()
        assert Path(where).resolve() != ROOT / "kernels" / "__init__.py" and name == "CUDAProperties", out.stdout


def test_our_folder_never_answers_to_kernels(tmp_path):
    """Where no other kernels package is installed, the bare name is not ours either."""
    script = ("import sys, importlib.machinery as m\n"
              "saved = sys.path[:]\n"
              "sys.path[:] = [''] + [p for p in saved if m.PathFinder.find_spec('kernels', [p]) is None]\n"
              "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('absent', e.name)\n"
              "else:\n    print('present', kernels.__file__)\n"
              "sys.path[:] = saved\n"
              "import mechgpu.kernels\nprint(mechgpu.kernels.__name__, 'kernels' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["absent", "kernels", "mechgpu.kernels", "False"], out.stdout + out.stderr
