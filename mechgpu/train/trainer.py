"""``Trainer``: gradient accumulation with exact normalisation, checkpointing, measurement.

The loss is normalised by the global count of items (or tokens) in the step's window of
micro-batches, not by a mean of means: every micro-batch's summed loss is multiplied by
``world_size / N`` before its backward, where N is the count over all micro-batches of the
window on all ranks (DDP and FSDP2 average gradients over ranks, hence the world size). The
gradients are then exactly those of the full window's mean loss, whatever the sizes of the
micro-batches, including a shorter last window.

Batches are moved to the model's device (``to_device``); a mapping batch (HF style:
``input_ids``, ``attention_mask``, ``labels``) is passed as ``model(**batch)``, and with
``loss_fn=None`` the model's own ``output.loss`` is trained on. ``autocast="fp16"`` runs
``torch.amp.GradScaler`` through the optimizer step.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._backend import local as _local
from .._text import format_bytes
from ._resume import (
    CHECKPOINT_KEYS,
    check_model_state,
    checked_epoch_rng,
    checked_rng,
    data_generators,
    fsync_dir,
    full,
    numpy_rng_globals,
    numpy_rng_to_tensors,
    resumable,
)
from .batches import default_count, default_forward, loss_shifts_labels, sample_count, target_of, to_device
from .checkpointing import (
    ActivationMeter,
    Plan,
    checkpoint_blocks,
    find_blocks,
    make_plan,
    profile_blocks,
    unwrap,
)

#: what a step logs from a mechgpu optimizer made with telemetry=True (beside its update_norm)
TELEMETRY_KEYS = ("param_norm", "update_ratio", "nonfinite_grads", "lost_update_fraction")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Trainer:
    """Train any model on an iterable of micro-batches.

    Args:
        model: the model (plain, DDP-wrapped, or FSDP2 ``fully_shard``-ed). Batches are moved to the
            device of its first trainable parameter (``to_device``).
        loss_fn: ``loss_fn(output, target_of(batch))`` returning the sum or the mean of the
            per-item losses of the micro-batch (``nn.CrossEntropyLoss()``, ``F.cross_entropy``, or
            with ``reduction="sum"``), or ``None`` to train on the model's own ``output.loss`` (an
            HF model computes it, a mean over the counted tokens, when the batch has ``labels``).
            The trainer turns each into the micro-batch's sum and divides by the window's global
            count, so sums and means alike give the exact full-window mean.
        loss_reduction: ``"sum"`` or ``"mean"``: which of the two ``loss_fn`` returns. By default
            it is ``loss_fn.reduction`` where that exists, else found on the first micro-batch
            (``loss_fn`` on the output and target repeated twice: a sum doubles, a mean does
            not; an eval-mode forward without grad, RNG untouched); a loss that does neither is
            a ValueError that asks for this argument. A mean must be over ``count_fn``'s items
            (or a constant multiple of them, as ``mse_loss`` over the features of each item).
            With ``loss_fn=None`` it is ``"mean"``.
        optimizer: any torch optimizer; with a mechgpu optimizer built with ``max_grad_norm``
            the clipping is fused into its step and the logged norm is its ``last_grad_norm``.
        scheduler: an LR scheduler stepped once per optimizer step.
        accum_steps: micro-batches per optimizer step, or ``"all"`` for full-batch gradient
            descent (every micro-batch of ``data`` in each step).
        checkpoint: ``"none"``, ``"all"``, ``"sqrt"``, an int number of segments, a memory
            budget such as ``"2GiB"``, or a list of ``(start, end)`` segments of blocks, such as
            ``mechgpu.train.fit`` chooses (see ``mechgpu.train.checkpointing``).
        blocks: the name of the ModuleList/Sequential of repeated blocks (found if None).
        max_grad_norm: clip with ``mechgpu.clip.clip_grad_norm_`` when the optimizer does
            not clip itself.
        autocast: ``None``, ``"bf16"`` or ``"fp16"`` (``torch.autocast`` around forward and loss).
            ``"fp16"`` adds a ``torch.amp.GradScaler`` (``self.scaler``, saved in checkpoints) that
            scales the loss and drives the optimizer step: a step with inf/NaN grads is skipped.
            A mechgpu optimizer (``_step_supports_amp_scaling``) unscales the grads in its kernel
            (and clips them there with its ``max_grad_norm``); a torch optimizer's grads are
            unscaled by the scaler. When the trainer clips (``max_grad_norm``), it unscales first
            (``scaler.unscale_``); its logged ``grad_norm`` is always of the unscaled grads.
            Not with FSDP2-sharded params, whose ranks would each find inf/NaN on their shards.
        count_fn: items in a micro-batch. By default ``default_count``; with ``loss_fn=None`` and
            a mapping batch, the labels the model's loss averages over (not -100):
            ``shift_labels`` where the batch has it, else ``labels``, less the first position of
            each row where the model's loss is HF's causal LM loss, which shifts them.
        forward_fn: ``forward_fn(model, batch) -> output``, default ``default_forward``:
            ``model(**batch)`` for a mapping batch, else ``model(batch[0])``.
        eval_data, eval_every: mean loss over ``eval_data`` every ``eval_every`` steps.
        log_every: steps between host reads of the logged tensors (the only syncs).
        log_dir: writes ``train_log.csv``, ``train_log.jsonl`` and ``summary.json`` there.
        track_update_norm: log ``||p_after - p_before||``: summed inside the update kernel by a
            mechgpu optimizer made with ``track_update_norm=True`` (no extra pass), else from one
            copy of the params. The optimizer is not changed.
        warmup_steps: steps left out of the throughput.
        progress: show a tqdm progress bar.
        predict: profile the blocks (two extra forward passes) to predict the saved
            activations of any policy, not only of a budget.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable | None, optimizer: torch.optim.Optimizer, *,
                 scheduler=None, accum_steps: int | str = 1, checkpoint: str | int | list = "none",
                 blocks: str | None = None, max_grad_norm: float | None = None, autocast: str | None = None,
                 count_fn: Callable | None = None, forward_fn: Callable | None = None,
                 eval_data: Iterable | None = None, eval_every: int = 0, log_every: int = 1,
                 log_dir: str | Path | None = None, track_update_norm: bool = True, warmup_steps: int = 1,
                 progress: bool = False, predict: bool = False, loss_reduction: str | None = None) -> None:
        if loss_reduction is None:
            loss_reduction = "mean" if loss_fn is None else getattr(loss_fn, "reduction", None)
        if loss_reduction not in (None, "sum", "mean"):
            raise ValueError(f"loss_fn must reduce over the micro-batch with reduction='sum' or 'mean', not "
                             f"{loss_reduction!r}: the trainer divides by the window's global count")
        if accum_steps != "all" and not (isinstance(accum_steps, int) and accum_steps >= 1):
            raise ValueError(f"accum_steps must be an int >= 1 or 'all', not {accum_steps!r}")
        if autocast not in (None, *AUTOCAST_DTYPES):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', not {autocast!r}")
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.loss_reduction = loss_reduction  # None: found on the first micro-batch
        self.accum_steps, self.policy, self.blocks_name = accum_steps, checkpoint, blocks
        self.max_grad_norm, self.autocast = max_grad_norm, autocast
        self.count_fn, self.forward_fn = count_fn or self._default_count, forward_fn or default_forward
        self.eval_data, self.eval_every, self.log_every = eval_data, eval_every, max(1, log_every)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.track_update_norm, self.warmup_steps, self.progress = track_update_norm, warmup_steps, progress
        self.predict = predict
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.fused_clip = getattr(optimizer, "max_grad_norm", None) is not None
        if autocast == "fp16" and any(hasattr(p, "to_local") for p in self.params):
            raise ValueError("autocast='fp16' with FSDP2-sharded params: each rank's GradScaler would look for "
                             "inf/NaN in its own shards only, so ranks could disagree on skipping a step; use 'bf16'")
        self.scaler = torch.amp.GradScaler(self.device.type) if autocast == "fp16" else None
        self._shifts_labels = loss_fn is None and loss_shifts_labels(model)
        self.step = 0
        self.epoch = 0
        self.position = 0  # micro-batches of the current epoch already consumed
        #: torch's RNG state and the data's generators' states when this epoch's iterator started
        self.epoch_rng: dict[str, Any] | None = None
        self._data_resumable: str | None = None  # why the last data given to fit cannot resume exactly
        self.history: list[dict[str, Any]] = []
        self.plan: Plan | None = None
        self.measured_saved: int | None = None
        self._blocks = None
        self._full_count: int | None = None

    # ------------------------------------------------------------------ checkpointing
    def setup_checkpointing(self, sample_batch) -> Plan:
        """Find the blocks and apply the policy; budgets profile the blocks on ``sample_batch``."""
        if self.policy in ("none", None) and not self.predict:
            self.plan = Plan("none", 0, [])
            return self.plan
        name, blocks = find_blocks(self.model, self.blocks_name)
        self._blocks = blocks
        profile = None
        is_budget = isinstance(self.policy, str) and not (self.policy in ("none", "all", "sqrt")
                                                          or self.policy.isdigit())
        if is_budget or self.predict:
            inner = unwrap(self.model)  # not through DDP: a forward without backward upsets its reducer
            cuda = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # the profile's dropout draws leave no trace
                profile = profile_blocks(inner, blocks, lambda: self.micro_batch_loss(sample_batch, model=inner))
        self.plan = make_plan(self.policy, len(blocks), profile)
        checkpoint_blocks(blocks, self.plan.segments)
        return self.plan

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])

    def _default_count(self, batch) -> int:
        if isinstance(batch, Mapping) and self.loss_fn is None:
            labels = batch.get("shift_labels")
            if labels is None:
                labels = batch["labels"][..., 1:] if self._shifts_labels else batch["labels"]
            return default_count({"labels": labels})
        return default_count(batch)

    def _loss(self, out, batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(out, target_of(batch))
        loss = getattr(out, "loss", None)
        if loss is None:
            raise ValueError(f"Trainer(loss_fn=None) trains on the model's own output.loss, but its "
                             f"{type(out).__name__} output has none (an HF model computes it when the batch has "
                             "'labels')")
        return loss

    @staticmethod
    def world_size() -> int:
        """Ranks training together: torch.distributed's world size once its process group is
        initialised, else 1."""
        return torch.distributed.get_world_size() if _is_distributed() else 1

    def micro_batch_loss(self, batch, scale: float = 1.0, *, model: nn.Module | None = None,
                         count: int | None = None) -> torch.Tensor:
        """One micro-batch's loss summed over its items, times ``scale``, ready for backward:
        ``batch`` moved to the trainer's device, ``forward_fn`` and ``loss_fn`` (or the model's
        own loss) under the trainer's autocast (a half-precision loss comes back in float32), a
        mean loss multiplied by its ``count`` of items (``count_fn(batch)`` when None). ``model``
        runs in place of the trainer's (the module inside a DDP wrapper, for a forward without
        backward). The loop's ``scale`` is world size / the window's global count."""
        moved = to_device(batch, self.device)
        if self.loss_reduction is None:
            self.loss_reduction = self._find_reduction(moved)
        with self._autocast():
            out = self.forward_fn(self.model if model is None else model, moved)
            loss = self._loss(out, moved)
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        if self.loss_reduction == "mean":
            scale = scale * (int(self.count_fn(batch)) if count is None else count)
        return loss * scale

    @torch.no_grad()
    def _find_reduction(self, batch) -> str:
        """"sum" or "mean": loss_fn on the output and target of ``batch`` repeated twice doubles a
        sum and keeps a mean. An eval-mode forward (no dropout, no BatchNorm statistics), with
        the RNGs forked, so training sees no trace of it."""
        model = unwrap(self.model)
        was_training = model.training
        cuda = [self.device] if self.device.type == "cuda" else []
        ask = "pass loss_reduction='sum' or 'mean' to Trainer to say which it returns"
        try:
            with torch.random.fork_rng(devices=cuda), self._autocast():
                model.eval()
                out, target = self.forward_fn(model, batch), target_of(batch)
                if not (isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor)):
                    raise ValueError(f"Trainer: loss_fn has no 'reduction' attribute and the model's output is a "
                                     f"{type(out).__name__}, so the trainer cannot tell whether loss_fn sums or "
                                     f"averages over the micro-batch; {ask}")
                once = self.loss_fn(out, target).double()
                twice = self.loss_fn(torch.cat([out, out]), torch.cat([target, target])).double()
        finally:
            model.train(was_training)
        ratio = float(twice / once) if float(once) != 0.0 else math.nan
        for name, expected in (("sum", 2.0), ("mean", 1.0)):
            if abs(ratio - expected) <= 1e-3:
                return name
        raise ValueError(f"Trainer: loss_fn neither sums nor averages over the micro-batch (on the batch "
                         f"repeated twice it gave {float(twice):.6g} against {float(once):.6g}); {ask}")

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Within: backward all-reduces the gradients over ranks only if ``enabled`` (DDP's
        ``no_sync``; FSDP2's ``set_requires_gradient_sync``, switched back on at exit); nothing
        changes in one process. The loop enables it for the last micro-batch of a window only."""
        if hasattr(self.model, "no_sync"):  # DDP
            with contextlib.nullcontext() if enabled else self.model.no_sync():
                yield
        elif hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(enabled)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def _global_count(self, counts: list[int]) -> int:
        count = sum(counts)
        if self.world_size() > 1:
            t = torch.tensor([count], dtype=torch.float64, device=self._comm_device())
            torch.distributed.all_reduce(t)
            count = int(t.item())
        return count

    def _comm_device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        return self.device if backend == "nccl" else torch.device("cpu")

    def train_step(self, window: list, measure: bool = False) -> dict[str, torch.Tensor]:
        """One optimizer step over the micro-batches of ``window``; returns device tensors."""
        counts = [int(self.count_fn(b)) for b in window]
        n_items = self._global_count(counts)
        self.last_global_items = n_items
        if n_items == 0:
            raise ValueError("a window of micro-batches with no items to count (all targets ignored?)")
        scale = self.world_size() / n_items
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        meter = ActivationMeter(self.model) if measure else None
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            with self.gradient_sync(last):
                with meter if (meter is not None and i == 0) else contextlib.nullcontext():
                    loss = self.micro_batch_loss(batch, scale, count=counts[i])
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            loss_total += loss.detach().double()
            del loss
        if meter is not None:
            self.measured_saved = meter.bytes
        if self.world_size() > 1:
            loss_total = loss_total.to(self._comm_device())
            torch.distributed.all_reduce(loss_total)
            loss_total = loss_total.to(self.device)
        loss_mean = loss_total / self.world_size()

        grad_norm = None if self.fused_clip else self._grad_norm()
        # a mechgpu optimizer with track_update_norm sums the update's squares in its kernel;
        # otherwise one copy of the (local shards of the) params is kept for the difference
        in_kernel = bool(getattr(self.optimizer, "track_update_norm", False) or getattr(self.optimizer, "telemetry",
                                                                                        False))
        before = [_local(p).detach().clone() for p in self.params] if self.track_update_norm and not in_kernel \
            else None
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is None:
            self.optimizer.step()
        else:  # skipped on inf/NaN grads; a mechgpu optimizer is handed grad_scale and found_inf
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.fused_clip:
            grad_norm = self.optimizer.last_grad_norm.clone()
        update_norm = None
        if self.track_update_norm and in_kernel:
            update_norm = self._sum_over_shards(self.optimizer.last_update_norm.double().square()).sqrt()
        elif before is not None:
            diffs = torch._foreach_sub([_local(p).detach() for p in self.params], before)
            update_norm = self._sum_over_shards(torch.stack(torch._foreach_norm(diffs)).double().square().sum()).sqrt()
            del diffs, before
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        out = {"loss": loss_mean, "grad_norm": full(grad_norm), "lr": lr}
        if update_norm is not None:
            out["update_norm"] = update_norm
        sums = getattr(self.optimizer, "last_telemetry_sums", None)
        if sums is not None:  # a mechgpu optimizer with telemetry=True: summed in its kernel
            from ..optim import telemetry_from_sums

            figures = telemetry_from_sums(self._sum_over_shards(sums))
            out.update({k: figures[k] for k in TELEMETRY_KEYS})
        return out

    def _grad_norm(self) -> torch.Tensor:
        """The grads' global 2-norm before clipping, clipped to max_grad_norm when set (mechgpu.clip).
        Under a GradScaler: unscaled first to clip; else the scaled grads' norm over the scale,
        which leaves the unscaling to the optimizer's step."""
        from .. import clip

        grads = [p for p in self.params if p.grad is not None]
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            return clip.clip_grad_norm_(grads, self.max_grad_norm)
        if not grads:
            return torch.zeros((), device=self.device)
        norm = clip.get_total_norm([p.grad for p in grads])
        if self.scaler is not None:
            norm = norm / self.scaler._get_scale_async()  # the scale's tensor, without a host read
        return norm

    def _sum_over_shards(self, squares: torch.Tensor) -> torch.Tensor:
        """A sum of squares over local shards, summed over ranks where params are FSDP2 shards."""
        if any(hasattr(p, "to_local") for p in self.params) and _is_distributed():
            squares = squares.to(self._comm_device())  # FSDP2 shards on a 1-D mesh
            torch.distributed.all_reduce(squares)
            squares = squares.to(self.device)
        return squares

    # ------------------------------------------------------------------ data
    def _epoch_iter(self, data: Iterable):
        """``iter(data)`` for the current epoch, positioned after the micro-batches it already gave.

        A DataLoader draws its shuffle (and workers') seeds from its own generator, else from
        torch's global RNG, when its iterator starts. So the RNG states of the moment this
        epoch's iterator first started are kept (``epoch_rng``, saved in checkpoints); a resumed
        epoch restarts its iterator from them, which gives the same order, skips the batches
        already trained on, and puts torch's global RNG back where the run had it."""
        generators = data_generators(data)
        resumed = self.position > 0 and self.epoch_rng is not None
        if resumed:
            current = torch.get_rng_state()
            torch.set_rng_state(self.epoch_rng["torch"])
            for gen, state in zip(generators, self.epoch_rng["generators"]):
                gen.set_state(state)
        else:
            self.epoch_rng = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
        it = iter(data)
        for _ in range(self.position):  # resume: skip what this epoch already consumed
            next(it, None)
        if resumed:
            torch.set_rng_state(current)
        return it

    def _windows(self, data: Iterable):
        """Windows of micro-batches, epoch after epoch, from the saved position on."""
        self._data_resumable = resumable(data)
        while True:
            if hasattr(data, "set_epoch"):
                data.set_epoch(self.epoch)
            it = self._epoch_iter(data)
            window = []
            size = math.inf if self.accum_steps == "all" else self.accum_steps
            got_any = False
            for batch in it:
                got_any = True
                window.append(batch)
                if len(window) == size:
                    self.position += len(window)
                    yield window
                    window = []
            if window:  # the partial last window of the epoch
                self.position += len(window)
                yield window
            elif not got_any and self.position == 0:
                raise ValueError("the training data yielded no batches")
            self.epoch += 1
            self.position = 0

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: Iterable) -> float:
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in data:
            total += self.micro_batch_loss(batch).double()
            count += int(self.count_fn(batch))
        self.model.train(was_training)
        return (total / max(count, 1)).item()

    # ------------------------------------------------------------------ the loop
    def fit(self, data: Iterable, until_step: int | None = None, *, steps: int | None = None) -> dict[str, Any]:
        """Train on ``data``, an iterable of micro-batches (iterated afresh each epoch), either
        until ``self.step`` reaches ``until_step`` or for ``steps`` more steps; exactly one of the
        two. ``until_step`` is the step to reach, the second positional argument as before: a
        trainer resumed at step 2 runs 3 steps for ``fit(data, 5)`` and 5 for ``fit(data,
        steps=5)``, and none for ``fit(data, 1)``. Returns the summary (also in ``summary.json``)."""
        if (until_step is None) == (steps is None):
            raise ValueError("Trainer.fit takes exactly one of until_step (the step to reach; the second "
                             "positional argument) and steps= (the steps to run now)")
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ValueError(f"Trainer.fit: steps must be an int >= 0, not {steps!r}")
        target = self.step + steps if steps is not None else until_step
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        windows = self._windows(data)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=target, initial=self.step, unit="step", dynamic_ncols=True)
        pending: list[tuple[int, dict, int, int, int]] = []
        t_start = None
        items_timed = samples_timed = 0
        last_flush = time.perf_counter()
        first_step = self.step
        while self.step < target:
            window = next(windows)
            if self.plan is None:
                self.setup_checkpointing(window[0])
            measure = self.measured_saved is None
            if t_start is None and self.step - first_step >= self.warmup_steps:
                if cuda:
                    torch.cuda.synchronize()
                t_start = time.perf_counter()
            result = self.train_step(window, measure=measure)
            items = self.last_global_items  # over all ranks
            samples = self.world_size() * sum(sample_count(b) for b in window)  # ranks' micro-batches are alike
            if t_start is not None:
                items_timed += items
                samples_timed += samples
            pending.append((self.step, result, items, samples, len(window)))
            if self.step % self.log_every == 0 or self.step == target:
                self._flush(pending, time.perf_counter() - last_flush, cuda)
                last_flush = time.perf_counter()
                pending = []
                if bar is not None:
                    rec = self.history[-1]
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['items_per_s']:.0f}",
                                    mem=format_bytes(rec.get("peak_bytes", self.measured_saved or 0)))
                    bar.update(self.step - bar.n)
            if self.eval_data is not None and self.eval_every and self.step % self.eval_every == 0:
                self.history[-1]["eval_loss"] = self.evaluate(self.eval_data)
        if bar is not None:
            bar.close()
        if cuda:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - t_start) if t_start is not None else float("nan")
        summary = self.summary(elapsed, items_timed, samples_timed)
        if self.log_dir is not None:
            self.write_logs(summary)
        return summary

    def _flush(self, pending, seconds: float, cuda: bool) -> None:
        keys = ("loss", "grad_norm", "update_norm", *(k for k in TELEMETRY_KEYS if k in pending[0][1]))
        stacked = torch.stack([torch.stack([r[k].double().reshape(()) if k in r else
                                            torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
                                            for k in keys]) for _, r, *_ in pending]).tolist()  # the one sync
        per_step = seconds / len(pending)
        for (step, result, items, samples, micro), values in zip(pending, stacked):
            rec = {"step": step, **dict(zip(keys, values)), "lr": float(result["lr"]), "micro_batches": micro,
                   "items": items, "samples": samples, "step_s": per_step, "items_per_s": items / per_step}
            if cuda:
                rec["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self.history.append(rec)

    # ------------------------------------------------------------------ measurement
    def memory_split(self) -> dict[str, int]:
        def nbytes(ts):
            seen, total = set(), 0
            for t in ts:
                if isinstance(t, torch.Tensor) and hasattr(t, "to_local"):
                    t = t.to_local()
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
            return total

        params = nbytes(self.model.parameters())
        grads = sum(_local(p).numel() * p.element_size() for p in self.params)  # as allocated in backward
        state = nbytes(v for s in self.optimizer.state.values() for v in s.values())
        split = {"params_bytes": params, "grads_bytes": grads, "optimizer_state_bytes": state}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            split["peak_bytes"] = peak
            split["activations_and_other_bytes"] = max(0, peak - params - grads - state)
        return split

    def summary(self, elapsed: float, items: int, samples: int) -> dict[str, Any]:
        timed = max(0, len(self.history) - self.warmup_steps)
        summary = {
            "steps": self.step, "checkpoint": self.plan.describe() if self.plan else "none",
            "accum_steps": self.accum_steps,
            "first_loss": self.history[0]["loss"] if self.history else None,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "eval_loss": next((r["eval_loss"] for r in reversed(self.history) if "eval_loss" in r), None),
            "saved_activation_bytes": self.measured_saved,
            "predicted_saved_activation_bytes": self.plan.predicted_saved if self.plan else None,
            "predicted_backward_peak_bytes": self.plan.predicted_peak if self.plan else None,
            "items_per_s": items / elapsed if elapsed > 0 else None,
            "samples_per_s": samples / elapsed if elapsed > 0 else None,
            "step_s": elapsed / timed if timed else None,
            "timed_steps": timed,
            **self.memory_split(),
        }
        return summary

    def write_logs(self, summary: dict) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fields = sorted({k for r in self.history for k in r})
        with open(self.log_dir / "train_log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)
        with open(self.log_dir / "train_log.jsonl", "w") as f:
            for r in self.history:
                f.write(json.dumps(r) + "\n")
        with open(self.log_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=str)

    # ------------------------------------------------------------------ save / resume
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-identical resume needs, in types that ``torch.load(weights_only=True)``
        accepts: tensors, numbers, strings, and lists, tuples and dicts of them."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": numpy_rng_to_tensors(np.random.get_state())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self._data_resumable is not None and self.position > 0:
            warnings.warn(f"Trainer.save: {self._data_resumable}, so a run resumed from this checkpoint skips "
                          f"the {self.position} micro-batches this epoch has given by iterating afresh, which "
                          "repeats them exactly only if the data gives the same order again", stacklevel=3)
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": rng, "step": self.step, "epoch": self.epoch, "position": self.position,
                "history": self.history, "epoch_rng": self.epoch_rng,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``. Everything is checked first: on a checkpoint that does not
        fit (missing keys, other parameter names or shapes, another optimizer layout, bad RNG
        states) it raises ValueError and the model, optimizer, scheduler and RNGs are untouched."""
        if not isinstance(state, Mapping):
            raise ValueError(f"Trainer.load: the checkpoint is a {type(state).__name__}, not a dict")
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise ValueError(f"Trainer.load: the checkpoint lacks the keys {missing}")
        check_model_state(unwrap(self.model).state_dict(), state["model"])
        from ..optim import check_state_dict

        try:
            check_state_dict(self.optimizer, state["optimizer"])
        except ValueError as e:
            raise ValueError(f"Trainer.load: the checkpoint's optimizer state does not fit this optimizer: {e}") from e
        rng = checked_rng(state["rng"])
        epoch_rng = checked_epoch_rng(state.get("epoch_rng"))  # None in checkpoints of earlier versions
        for key in ("step", "epoch", "position"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise ValueError(f"Trainer.load: the checkpoint's {key!r} must be an int >= 0, not {state[key]!r}")
        scaler_state = state.get("scaler")  # absent from checkpoints of earlier versions
        if self.scaler is not None and scaler_state is not None and not (
                isinstance(scaler_state, Mapping) and self.scaler.state_dict().keys() <= scaler_state.keys()):
            raise ValueError(f"Trainer.load: the checkpoint's GradScaler state {scaler_state!r} lacks some of "
                             f"{sorted(self.scaler.state_dict())}")
        scheduler_state = state["scheduler"]
        if self.scheduler is not None and scheduler_state is not None and not isinstance(scheduler_state, Mapping):
            raise ValueError(f"Trainer.load: the checkpoint's scheduler state is a {type(scheduler_state).__name__}, "
                             "not a dict")

        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and scaler_state is not None:
            self.scaler.load_state_dict(dict(scaler_state))
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            np.random.set_state(rng["numpy"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.history = list(state["history"])
        self.epoch_rng = epoch_rng

    def save(self, path: str | Path) -> None:
        """Write ``state_dict()`` to ``path`` atomically: to a new file in the same directory,
        flushed and fsynced, then renamed over ``path``. If anything fails, the temporary file is
        removed, the error propagates, and an existing checkpoint at ``path`` is left as it was."""
        path = Path(path)
        state = self.state_dict()
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:16]}.tmp")
        # O_EXCL: never reuse a file; mode 0o666 less the umask, like the plain open() it replaces
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)  # make the rename itself durable

    def load(self, path: str | Path) -> None:
        """Load a checkpoint written by ``save`` with ``torch.load(weights_only=True)``: a file
        cannot run code. Checkpoints of earlier versions, which pickled numpy's RNG state as an
        ndarray, load too: only the uint32 ndarray's reconstruction is allowed beyond torch's
        defaults. Then ``load_state_dict``."""
        with torch.serialization.safe_globals(numpy_rng_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(state)
