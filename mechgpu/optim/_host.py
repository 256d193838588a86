"""The compiled confirmation of the optimizers' step (``_host.cpp``): built once, loaded when built.

A step confirms every address its launches dereference (``_fused._GroupCache``). In Python that
is a few C calls per tensor through the interpreter, about 3 µs per param with its grad and
states; ``_host.cpp`` reads the same facts from the live tensors in one call, about 0.1 µs per
tensor. It is an optimisation only: the Python path confirms the same facts and takes every
step until the extension is loaded, and every group the extension cannot describe (tensor
subclasses, more than 8 dims, a state dict that is not a plain dict).

The extension is built with the C++ compiler triton also needs (``$CXX``, else ``c++``), against
the installed torch's headers (about 10-20 s), into torch's extension folder
(``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``), under a name made from the
source, torch's version and the Python ABI: a fresh machine builds it once, and every later
process loads it in milliseconds. Nothing needs a network. ``MECHGPU_HOST_EXTENSION`` chooses:

* ``auto`` (default): load it if built; else start building it in the background on the first
  step (one compiler process per machine, claimed by a marker file; the steps meanwhile take the
  Python path) and load it once done;
* ``build``: build it on the first step, waiting for the compiler, and raise if that fails;
* ``off``: the Python path only.

``python -m mechgpu.optim._host`` builds it in the foreground and says where (an install or CI
step can run it ahead of time).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_host.cpp")
MODES = ("auto", "build", "off")
POLL_S = 1.0  # while a background build runs, how often a step looks for its result
STALE_S = 600.0  # a build marker this old belongs to a builder that died


def mode() -> str:
    value = os.environ.get("MECHGPU_HOST_EXTENSION", "auto")
    if value not in MODES:
        raise ValueError(f"MECHGPU_HOST_EXTENSION={value!r}: use one of {', '.join(MODES)}")
    return value


def name() -> str:
    """The extension's module name: a digest of its source, torch's version and the Python ABI."""
    digest = hashlib.sha1(SOURCE.read_bytes())
    for part in (torch.__version__, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "",
                 str(torch._C._GLIBCXX_USE_CXX11_ABI)):
        digest.update(part.encode())
    return f"mechgpu_host_{digest.hexdigest()[:16]}"


def build_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "mechgpu"


def library() -> Path:
    return build_dir() / f"{name()}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def failed() -> Path:
    """Where a background build that failed left the compiler's output."""
    return library().with_name(f"{library().name}.failed")


def compile_command(out: Path) -> list[str]:
    """The compiler's command line that builds ``out`` from ``_host.cpp``."""
    from torch.utils.cpp_extension import include_paths, library_paths

    (lib,) = library_paths()[:1]
    return [os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DMECHGPU_HOST_NAME={name()}",
            *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
            str(SOURCE), "-o", str(out), f"-L{lib}", f"-Wl,-rpath,{lib}",
            "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def load():
    """The built extension, loaded (ImportError where it is not built)."""
    return _load(library())


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(name(), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build():
    """Compile the extension now (in the foreground) and load it; RuntimeError with the
    compiler's output if that fails."""
    target = library()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run(compile_command(tmp), capture_output=True, text=True)
    except OSError as exc:  # no compiler
        raise RuntimeError(f"mechgpu: cannot build the host extension: {exc}") from exc
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"mechgpu: building the host extension failed:\n{done.stdout}{done.stderr}")
    os.replace(tmp, target)  # atomic: another process sees no file or the whole one
    failed().unlink(missing_ok=True)
    return _load(target)


class _Loader:
    """The extension, loaded on the first ``get()`` that finds it; built as ``mode()`` says."""

    def __init__(self) -> None:
        self.module = None
        self.failed: str | None = None  # why this process gave up on it
        self._started = False  # this process (or the one it was forked from) started the build
        self._next_poll = 0.0

    def get(self):
        """The loaded module, or None while the Python path must confirm."""
        if self.module is not None or self.failed is not None:
            return self.module
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_S
        try:
            chosen = mode()
            if chosen == "off":
                self.failed = "MECHGPU_HOST_EXTENSION=off"
                return None
            target = library()
            if target.exists():
                self.module = _load(target)
            elif chosen == "build":
                self.module = build()
            elif failed().exists():
                self.failed = f"the background build failed; see {failed()} (remove it to retry)"
            else:
                self._background(target)
        except (OSError, ImportError) as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
        return self.module

    def _background(self, target: Path) -> None:
        """Start the one build on this machine, unless another process has (a ``.building`` marker
        claims it: forked or spawned children, test workers and other programs only look for its
        file). The build installs its own result and drops the marker, so it finishes even if
        this process does not."""
        if self._started:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        marker = target.with_name(f"{target.name}.building")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if time.time() - marker.stat().st_mtime > STALE_S:  # its builder died: the next look retries
                marker.unlink(missing_ok=True)
            return
        self._started = True
        subprocess.Popen([sys.executable, "-m", "mechgpu.optim._host", "--marker", str(marker)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)


loader = _Loader()


if __name__ == "__main__":
    marker = sys.argv[2] if sys.argv[1:2] == ["--marker"] else None  # a background build: drop its claim
    try:
        build()
    except RuntimeError as exc:
        if marker is None:
            raise
        failed().write_text(str(exc))  # no process on this machine retries until it is removed
    finally:
        if marker is not None:
            Path(marker).unlink(missing_ok=True)
    print(f"built {library()}")
