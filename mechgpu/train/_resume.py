"""What a Trainer checkpoint holds beside the model and optimizer, checked before it is loaded:
RNG states (torch, CUDA, numpy, Python, each DataLoader's epoch generator), and the atomic write."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._backend import has_data

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "step", "epoch", "position", "history")


def check_model_state(expected: Mapping[str, Any], got: Any) -> None:
    """Raise ValueError unless ``got`` has exactly the keys of ``expected`` and the same tensor
    shapes (global shapes for DTensors)."""
    if not isinstance(got, Mapping):
        raise ValueError(f"Trainer.load: the checkpoint's model state is a {type(got).__name__}, not a dict")
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        raise ValueError(f"Trainer.load: the checkpoint's model does not match this model: "
                         f"missing keys {missing}, unexpected keys {unexpected}")
    for key, mine in expected.items():
        theirs = got[key]
        if isinstance(mine, torch.Tensor) != isinstance(theirs, torch.Tensor):
            raise ValueError(f"Trainer.load: model entry {key!r} is a {type(theirs).__name__} in the checkpoint "
                             f"but a {type(mine).__name__} in this model")
        if isinstance(mine, torch.Tensor) and mine.shape != theirs.shape:
            raise ValueError(f"Trainer.load: model tensor {key!r} has shape {tuple(theirs.shape)} in the "
                             f"checkpoint but {tuple(mine.shape)} in this model")
        if isinstance(theirs, torch.Tensor) and not has_data(theirs):
            raise ValueError(f"Trainer.load: model tensor {key!r} is a {theirs.layout} tensor on {theirs.device} "
                             "in the checkpoint, with no data to load")


def numpy_rng_to_tensors(state: tuple) -> dict[str, Any]:
    """numpy's legacy RNG state ``(name, uint32 keys, pos, has_gauss, cached_gaussian)`` with the
    keys as an int64 tensor, so that no numpy type goes into the pickle."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def checked_rng(rng: Any) -> dict[str, Any]:
    """The checkpoint's RNG states ready to set, each first tried on a throwaway generator, so
    that a bad one raises ValueError before anything is changed."""
    if not isinstance(rng, Mapping) or not {"torch", "python"} <= rng.keys():
        raise ValueError("Trainer.load: the checkpoint's 'rng' must be a dict with 'torch' and 'python' states")
    out = dict(rng)
    numpy_state = rng.get("numpy")
    if isinstance(numpy_state, Mapping):  # this version's form; earlier ones stored numpy's own tuple
        try:
            numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                           numpy_state["has_gauss"], numpy_state["cached_gaussian"])
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"Trainer.load: the checkpoint's numpy RNG state is malformed ({e!r})") from e
    if numpy_state is not None:
        out["numpy"] = numpy_state
    checks = [("torch", lambda s: torch.Generator().set_state(s)), ("python", lambda s: random.Random().setstate(s)),
              ("numpy", lambda s: np.random.RandomState().set_state(s))]
    for name, check in checks:
        if name in out:
            try:
                check(out[name])
            except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as e:
                raise ValueError(f"Trainer.load: the checkpoint's {name} RNG state cannot be restored ({e})") from e
    return out


def checked_epoch_rng(epoch_rng: Any) -> dict[str, Any] | None:
    """The checkpoint's epoch-start RNG states, each tried on a throwaway generator first."""
    if epoch_rng is None:
        return None
    try:
        torch.Generator().set_state(epoch_rng["torch"])
        for state in epoch_rng["generators"]:
            torch.Generator().set_state(state)
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"Trainer.load: the checkpoint's epoch_rng cannot be restored ({e})") from e
    return {"torch": epoch_rng["torch"], "generators": list(epoch_rng["generators"])}


def data_generators(data: Any) -> list[torch.Generator]:
    """The torch.Generators a DataLoader draws its order and seeds from (its own, its sampler's,
    its batch sampler's sampler's), each once, on the CPU."""
    found: list[torch.Generator] = []
    for owner in (data, getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and gen.device.type == "cpu" and all(gen is not g for g in found):
            found.append(gen)
    return found


def resumable(data: Any) -> str | None:
    """None if iterating ``data`` afresh from the saved RNG states gives the same order again
    (a DataLoader over a map-style dataset, a sequence, or data with ``set_epoch``), else why not."""
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            return "the training data is a DataLoader over an IterableDataset, whose position cannot be captured"
        return None
    if isinstance(data, Sequence) or hasattr(data, "set_epoch"):
        return None
    return f"the training data is a {type(data).__name__}, whose position cannot be captured"


def numpy_rng_globals() -> list:
    """The globals that unpickle the uint32 ndarray of an old checkpoint's numpy RNG state, and no
    more: ``_reconstruct`` under its numpy 1.x and 2.x module names, ``ndarray``, ``dtype`` and
    the uint32 dtype's class (the only dtype whose state may be set)."""
    try:
        from numpy._core.multiarray import _reconstruct as reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct as reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename in it survives a crash; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is not None and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t
