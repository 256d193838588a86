"""Training loop: gradient accumulation with exact normalisation, gradient checkpointing of
repeated blocks (with a memory-budget planner), measurement of memory and throughput.

``Trainer`` is the loop; ``mechgpu.train.checkpointing`` holds the policies, the planner
and the saved-activation meter; ``fit`` (``mechgpu.train.fit``) chooses the fastest
micro-batch x accumulation x checkpoint plan within a memory budget.
"""

from .._text import parse_bytes
from .checkpointing import (
                            ActivationMeter,
                            BlockProfile,
                            BudgetTooSmall,
                            Plan,
                            checkpoint_blocks,
                            clear_checkpointing,
                            find_blocks,
                            make_plan,
                            plan_budget,
                            plan_frontier,
                            predict,
                            profile_blocks,
)
from .fit import fit  # the function shadows its module's name: import the module's other names from it
from .trainer import Trainer, default_count, to_device

__all__ = ["Trainer", "default_count", "fit", "to_device", "ActivationMeter", "BlockProfile", "BudgetTooSmall", "Plan",
           "checkpoint_blocks", "clear_checkpointing", "find_blocks", "make_plan", "parse_bytes", "plan_budget",
           "plan_frontier", "predict", "profile_blocks"]
