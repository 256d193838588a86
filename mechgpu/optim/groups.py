"""Param groups with and without weight decay, chosen as Hugging Face's ``Trainer`` chooses them.

transformers' ``Trainer.create_optimizer`` gives no weight decay to biases and norm weights:
a param is left out when it lies inside a ``torch.nn.LayerNorm`` (or a subclass), or when its
lowercased name matches one of ``NO_DECAY_PATTERNS`` (``Trainer.get_decay_parameter_names``
as of transformers 5). The same rule, without importing transformers, for any trainer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

#: transformers' ``forbidden_name_patterns``: biases, and norms named layernorm, rmsnorm, norm or *_norm
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY = re.compile("|".join(NO_DECAY_PATTERNS))


def _decay_names(module: nn.Module, prefix: str = "", in_norm: bool = False) -> Iterator[str]:
    """The names of the params that get weight decay, walked as transformers' ``get_parameter_names``."""
    if not in_norm:
        names = (prefix + name for name, _ in module.named_parameters(recurse=False))
        yield from (name for name in names if not _NO_DECAY.search(name.lower()))
    for name, child in module.named_children():
        yield from _decay_names(child, f"{prefix}{name}.", in_norm or isinstance(child, nn.LayerNorm))


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0.0}]``
    over ``model``'s params that require grad, as transformers' ``Trainer`` builds them: no decay
    for biases and norm weights (module docstring). Either group may be empty, as in transformers.

    A norm that is neither a ``LayerNorm`` nor named like one (a ``torch.nn.RMSNorm`` called ``scale``)
    is decayed, as in transformers.
    """
    decay = set(_decay_names(model))
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for name, p in params if name in decay], "weight_decay": weight_decay},
            {"params": [p for name, p in params if name not in decay], "weight_decay": 0.0}]
