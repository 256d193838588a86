"""What the Trainer needs to know of a batch: moving it to the device, its target, its count
of items and samples, and how a model is called on it (HF-style mapping batches included)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from .checkpointing import unwrap

IGNORE_INDEX = -100


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with its tensors on ``device``, as Lightning moves batches: through tuples
    (namedtuples too), lists and mappings, keeping their types (HF ``BatchEncoding`` included),
    and any other object with a ``.to`` by ``.to(device)``; anything else is returned as it is.
    A copy from pinned memory does not block."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.device.type == "cpu" and batch.is_pinned())
    if isinstance(batch, Mapping):
        out = copy.copy(batch) if isinstance(batch, MutableMapping) else {}  # its type and attributes kept
        for key, value in batch.items():
            out[key] = to_device(value, device)
        return out
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device) if callable(getattr(batch, "to", None)) else batch


def target_of(batch) -> torch.Tensor:
    """What a micro-batch's loss compares with: ``batch[-1]``, or a mapping batch's ``labels``."""
    return batch["labels"] if isinstance(batch, Mapping) else batch[-1]


def default_count(batch) -> int:
    """Items in a micro-batch (``target_of``): the targets' elements, less those equal to -100
    (cross_entropy's and HF's ignore index) for integer targets."""
    target = target_of(batch)
    if not target.is_floating_point():
        return target.numel() - int((target == IGNORE_INDEX).sum())
    return target.shape[0] if target.dim() > 0 else 1


def default_forward(model: nn.Module, batch) -> Any:
    """``model(**batch)`` for a mapping batch (HF style), else ``model(batch[0])``."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch[0])


def sample_count(batch) -> int:
    """Samples in a micro-batch: the length of ``batch[0]``, or of a mapping batch's first tensor."""
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor)) if isinstance(batch, Mapping) \
        else batch[0]
    return int(first.shape[0])


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether an HF model's own loss shifts its labels: its ``loss_function`` is HF's causal LM
    loss (position i predicts label i + 1, so the first label is never counted), outside an
    encoder-decoder (whose decoder inputs are shifted instead)."""
    inner = unwrap(model)
    loss_function = getattr(inner, "loss_function", None)
    if loss_function is None:
        return False
    from transformers.loss.loss_utils import ForCausalLMLoss

    return loss_function is ForCausalLMLoss and not getattr(getattr(inner, "config", None), "is_encoder_decoder",
                                                            False)
