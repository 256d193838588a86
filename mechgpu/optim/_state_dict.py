"""Checks of optimizer state against its params: a saved state_dict's, or a live state's.

``check_state_dict`` works for any torch optimizer and changes nothing; the step uses
``state_problem`` and ``storage_holds`` on the states it is about to hand to a kernel.
"""

from __future__ import annotations

import torch

from .._backend import has_data
from .._backend import local as _local
from ..kernels.optim_spec import STATE_KEYS
from .quant8 import ABSMAX_SUFFIX, absmax_count

MASTER_KEY = "master_param"
#: state entries with one value per param element (torch's names, and the fp32 master)
ELEMENT_KEYS = (*STATE_KEYS, MASTER_KEY)
#: the block maxima of 8-bit states: ``key + ABSMAX_SUFFIX`` beside the uint8 codes in ``key``
ABSMAX_KEYS = tuple(key + ABSMAX_SUFFIX for key in STATE_KEYS)


def _quantized_problem(state: dict, key: str, codes_numel: int, local: bool) -> str | None:
    """Why 8-bit codes ``state[key]`` of ``codes_numel`` elements lack fitting block maxima, or None."""
    absmax = state.get(key + ABSMAX_SUFFIX)
    expected = absmax_count(codes_numel)
    if not torch.is_tensor(absmax):
        return f"{key!r} holds uint8 codes but there is no {key + ABSMAX_SUFFIX!r} tensor of their block maxima"
    if absmax.dtype != torch.float32 or _local(absmax).dim() != 1 or _local(absmax).numel() != expected:
        return (f"{key + ABSMAX_SUFFIX!r} is a {absmax.dtype} tensor of shape {tuple(_local(absmax).shape)}; "
                f"8-bit codes of {codes_numel} elements need float32 ({expected},)")
    t = _local(absmax)
    if local and (t.layout is not torch.strided or t.device.type == "meta" or not t.is_contiguous()
                  or not storage_holds(t)):
        return f"{key + ABSMAX_SUFFIX!r} must be a contiguous tensor with data, holding all its elements"
    return None


def state_problem(state: dict, p: torch.Tensor, local: bool) -> str | None:
    """Why ``state`` cannot serve param ``p``, or None. With ``local``, DTensors (FSDP2) are
    compared by their local shards (the optimizer's view), otherwise by their global shapes
    (a state_dict's)."""
    shape = _local(p).shape if local else p.shape
    for key, value in state.items():
        if key == "step":
            expected = "'step' must be a number or a one-element real tensor, not"
            if torch.is_tensor(value):
                if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                    return f"{expected} {value.dtype} {tuple(value.shape)}"
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"{expected} {type(value).__name__}"
        elif key in ABSMAX_KEYS:
            continue  # checked with its codes; beside a float state (a user's .data swap) it is stale, and dropped
        elif key in ELEMENT_KEYS and value is not None:  # None: absent, as torch's SGD reads it
            if not torch.is_tensor(value):
                return f"{key!r} is a {type(value).__name__}, not a tensor"
            quantized = value.dtype == torch.uint8 and key != MASTER_KEY and not p.is_complex()
            if not (value.is_floating_point() or (value.is_complex() and p.is_complex()) or quantized):
                return (f"{key!r} has dtype {value.dtype}; it must be a floating-point tensor "
                        "(complex for a complex param), or uint8 codes of an 8-bit state")
            t = _local(value)
            if local and (t.layout is not torch.strided or t.is_nested or t.device.type == "meta"):
                kind = "nested" if t.is_nested else str(t.layout)
                return f"{key!r} is a {kind} tensor on {t.device}; it must be a dense tensor with data"
            value_shape, expected_shape = (t.shape if local else value.shape), shape
            if quantized and value is t and _local(p) is not p:
                expected_shape = _local(p).shape  # a DTensor param's codes are its local shard's (plain tensors)
            if value_shape != expected_shape:
                return f"{key!r} has shape {tuple(value_shape)}, the param {tuple(expected_shape)}"
            if quantized:
                problem = _quantized_problem(state, key, t.numel() if local else value.numel(), local)
                if problem is not None:
                    return problem
            if local:  # what the kernel will read: real memory behind every element
                if not storage_holds(t):
                    return f"{key!r}'s storage holds {t.untyped_storage().nbytes()} bytes, too few for its elements"
    return None


def storage_holds(t: torch.Tensor) -> bool:
    """The tensor's storage really holds every element it addresses (a resized-away storage does not)."""
    if t.numel() == 0:
        return True
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() >= (last + 1) * t.element_size()


def check_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Check that ``state_dict`` fits ``optimizer``'s params; raise ValueError naming the param.

    Works for any torch optimizer and changes nothing. The group checks and their messages
    are torch's; mechgpu adds the per-param ones: every per-element state (``ELEMENT_KEYS``: the rules'
    states and the fp32 master) must be a floating-point tensor of its param's shape, and
    ``step`` a number or one-element tensor.
    """
    try:
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    except (KeyError, TypeError):
        raise ValueError("loaded state dict must be a dict with 'state' and 'param_groups'") from None
    groups = optimizer.param_groups
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                         "optimizer's group")
    loaded_groups = _groups_as_loaded(optimizer, saved_groups)
    for group_index, (group, saved, loaded) in enumerate(zip(groups, saved_groups, loaded_groups)):
        missing = [k for k in optimizer.defaults if k not in loaded]  # the hyperparameters its step reads
        if missing:
            raise ValueError(f"loaded state dict: param group {group_index} lacks {missing}, which "
                             f"{type(optimizer).__name__} needs (saved by another optimizer?)")
        required = _required_state_keys(optimizer, loaded)
        for i, (p, saved_id) in enumerate(zip(group["params"], saved["params"])):
            entry = saved_state.get(saved_id)
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"loaded state dict: the state of param {i} of group {group_index} is a "
                                 f"{type(entry).__name__}, not a dict")
            problem = state_problem(entry, p, local=False)
            if problem is None and entry:
                absent = [k for k in required if entry.get(k) is None]
                if absent:
                    problem = f"it has no {absent} (it has {sorted(entry)}; saved by another optimizer?)"
            if problem is None:
                stored = [(k, v) for k, v in entry.items() if torch.is_tensor(v) and not has_data(v)]
                if stored:
                    k, v = stored[0]
                    problem = f"{k!r} is a {v.layout} tensor on {v.device}, with no data to load"
            if problem is not None:
                raise ValueError(f"loaded state dict does not fit param {i} of group {group_index} "
                                 f"(shape {tuple(p.shape)}): {problem}")


def _groups_as_loaded(optimizer: torch.optim.Optimizer, saved_groups: list) -> list[dict]:
    """The saved param groups as ``optimizer.load_state_dict`` would leave them: each replaces
    the group, then the optimizer's ``__setstate__`` fills the keys an older torch did not save.
    Run on a bare instance, so nothing of ``optimizer`` changes."""
    probe = object.__new__(type(optimizer))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in saved_groups]
    torch.optim.Optimizer.__setstate__(probe, {"defaults": dict(optimizer.defaults), "state": {},
                                               "param_groups": groups})
    for cls in type(optimizer).__mro__:  # the optimizer's own defaults for old groups (torch's, not ours)
        if cls.__module__.startswith("torch.optim") and "__setstate__" in cls.__dict__ \
                and cls is not torch.optim.Optimizer:
            cls.__setstate__(probe, probe.__dict__)
            break
    return probe.param_groups


def _required_state_keys(optimizer: torch.optim.Optimizer, group: dict) -> tuple[str, ...]:
    """The state entries a started param must have under ``group``'s options, as torch's step
    reads them (KeyError without): from mechgpu's twin of a torch optimizer, else none known."""
    from . import _CLASSES

    twins = {cls._spec.torch_class: cls for cls in _CLASSES.values()}
    twin = next((twins[c] for c in type(optimizer).__mro__ if c in twins), None)
    if twin is None:
        return ()
    try:
        return object.__new__(twin)._required_keys(group)
    except (KeyError, TypeError):  # options the rule reads are missing: reported as missing group keys
        return ()
