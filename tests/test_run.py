"""run.py, the bootstrap behind the README's two commands, installs with no package registry
(as on a lent GPU machine, which has torch and triton but reaches no index)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import run  # noqa: E402

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
