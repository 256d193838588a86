"""Triton's interpreter (TRITON_INTERPRET=1), without its repeated language patches.

When a launch starts, the interpreter patches ``triton.language`` (every builtin, ``range``,
the tensor dunders, the reductions) so that the kernel's Python runs on numpy, and restores
it when the launch ends. It then patches again at every call of a ``@triton.jit`` device
function, although the language is already patched: ``inspect.getmembers`` over the whole
module, some 15 ms a call. Our kernels call small device functions per block (the update
rule, a load, a rounding), so on CPU that re-patching was about 40% of a training step.

``skip_repeated_lang_patches`` makes a device function's patch a no-op when every language
module its globals see was patched by the running launch. Anything else (a device function
that sees a module the launch did not patch) is patched as triton patches it. Results are
unchanged: the patches skipped would set what is already set.
"""

from __future__ import annotations

import inspect

import triton.language as tl

#: ids of the language modules the running launch patched; None outside a launch
_patched: set[int] | None = None


class _NoChanges:
    def restore(self) -> None:
        pass


#: per function, the ids of the language modules its globals see (a module's imports of
#: triton.language do not change once it has loaded; scanning its globals at every call cost 6%)
_LANGUAGE_MODULES: dict = {}


def _language_modules(fn) -> set[int]:
    """The language modules ``fn``'s globals see, as triton's ``_patch_lang`` finds them."""
    found = _LANGUAGE_MODULES.get(fn)
    if found is None:
        found = _LANGUAGE_MODULES[fn] = frozenset(
            id(value) for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core))
    return found


def skip_repeated_lang_patches() -> bool:
    """Install the skip into triton's interpreter; False where its internals are not the ones
    this was written for (then nothing changes)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "skips_repeats", False) or not hasattr(interpreter, "GridExecutor"):
        return original is not None and getattr(original, "skips_repeats", False)

    def patch_lang(fn):
        global _patched
        langs = _language_modules(fn)
        if _patched is not None and langs <= _patched:
            return _NoChanges()  # a device function inside a launch: already patched
        scope = original(fn)
        if _patched is None:  # a launch: patched until its scope is restored
            _patched = set(langs)
            restore = scope.restore

            def restore_and_forget() -> None:
                global _patched
                _patched = None
                restore()

            scope.restore = restore_and_forget
        else:  # a device function that sees another module: triton patches it, and keeps it patched
            _patched = _patched | langs
        return scope

    patch_lang.skips_repeats = True
    interpreter._patch_lang = patch_lang
    return True
