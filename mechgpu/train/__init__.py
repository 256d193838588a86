"""Training loop: gradient accumulation with exact normalisation, gradient checkpointing of
repeated blocks (with a memory-budget planner), measurement of memory and throughput.

``Trainer`` is the loop; ``mechgpu.train.checkpointing`` holds the policies, the planner
and the saved-activation meter; ``mechgpu.train.gpt`` the small character-level GPT and the
stdlib corpus that ``mechgpu train`` and ``mechgpu profile`` use.
"""

from .checkpointing import (
                            ActivationMeter,
                            BlockProfile,
                            Plan,
                            checkpoint_blocks,
                            clear_checkpointing,
                            find_blocks,
                            make_plan,
                            parse_bytes,
                            plan_budget,
                            predict,
                            profile_blocks,
)
from .trainer import Trainer, default_count

__all__ = ["Trainer", "default_count", "ActivationMeter", "BlockProfile", "Plan", "checkpoint_blocks",
           "clear_checkpointing", "find_blocks", "make_plan", "parse_bytes", "plan_budget", "predict",
           "profile_blocks"]
