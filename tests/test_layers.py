"""The layers of STYLE.md's "shape we want", read from the source: the library (mechgpu/ less its
tools, cli and testing) never imports the tools, and kernels/ (installed as mechgpu.kernels)
never imports mechgpu. Every import counts, relative ones and those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the modules of mechgpu/ that are not the library: they may import anything
NOT_LIBRARY = ("mechgpu.tools", "mechgpu.cli", "mechgpu.__main__", "mechgpu.testing")


def _modules(folder: str, package: str) -> dict[str, Path]:
    """Every .py file under ``folder`` by its dotted module name within ``package``."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        out[".".join((package, *parts)).removesuffix(".__init__")] = path
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported(module: str, path: Path) -> set[str]:
    """The absolute names every import statement of ``path`` (the module ``module``) reaches: for
    ``from a import b`` both ``a`` and ``a.b``, as ``b`` may be a submodule."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def test_the_library_never_imports_the_tools():
    library = {m: p for m, p in _modules("mechgpu", "mechgpu").items() if not _under(m, NOT_LIBRARY)}
    library.update(_modules("kernels", "mechgpu.kernels"))
    wrong = {m: sorted(n for n in imported(m, p) if _under(n, NOT_LIBRARY)) for m, p in library.items()}
    wrong = {m: names for m, names in wrong.items() if names}
    assert not wrong, f"library modules import the tools: {wrong}"


def test_kernels_never_import_mechgpu():
    wrong = {m: sorted(n for n in imported(m, p) if _under(n, ("mechgpu",)) and not _under(n, ("mechgpu.kernels",)))
             for m, p in _modules("kernels", "mechgpu.kernels").items()}
    wrong = {m: names for m, names in wrong.items() if names}
    assert not wrong, f"kernels/ imports mechgpu beyond mechgpu.kernels: {wrong}"


def test_imports_are_resolved(tmp_path):
    """The resolver itself: relative imports at each level, ``from a import b``, and imports inside functions."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    init = tmp_path / "pkg" / "sub" / "__init__.py"
    init.write_text("from . import x\nfrom ..tools import y\n")
    leaf = tmp_path / "pkg" / "sub" / "leaf.py"
    leaf.write_text("import os.path\ndef f():\n    from .. import cli\n    from .mod import *\n")
    assert imported("pkg.sub", init) == {"pkg.sub", "pkg.sub.x", "pkg.tools", "pkg.tools.y"}
    assert imported("pkg.sub.leaf", leaf) == {"os.path", "pkg", "pkg.cli", "pkg.sub.mod"}
