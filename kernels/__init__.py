"""mechgpu.kernels: every @triton.jit kernel of mechgpu and the thin launchers that take torch tensors.

Installed as ``mechgpu.kernels`` (the source lives in the top-level ``kernels/`` folder).
This package knows nothing of ``mechgpu``; data flows one way.
"""

# Why the block below: any process whose sys.path holds the checkout root (`python -m ...` or
# `python -c ...` run there, pytest from the root, a notebook opened there) finds this folder as the
# top-level module "kernels", which is also Hugging Face's `kernels` package, a dependency of
# transformers (>= 5.25 imports it at `import transformers.activations`). So this folder answers
# only to "mechgpu.kernels": imported under its bare folder name it steps aside, and the import
# resolves exactly as it would without the checkout on sys.path (Hugging Face's package if
# installed, else ModuleNotFoundError). A folder without __init__.py would also lose to a regular
# package, but setuptools' editable installs cannot map a namespace package to mechgpu.kernels.
if __name__ != "mechgpu.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _elsewhere = [p for p in _sys.path if not (isinstance(p, str) and _os.path.realpath(p or ".") == _root)]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns sys.modules[__name__]
    _spec.loader.exec_module(_module)
