"""``fit``: the fastest micro-batch x accumulation x checkpoint plan x optimizer-state precision
whose peak memory fits a budget.

With the global batch fixed (micro x accum x world = global batch, world = 1 unless
torch.distributed is initialised), three stages, each a public function that ``fit`` runs in turn:

1. ``probe`` measures, once:
   - the static memory: params, grads and the optimizer's state as it is after two steps of
     the ``Trainer`` (the second step, less its forward and backward, is the per-step overhead);
   - with a mechgpu optimizer whose kernels run on the model's device, the same for each state
     precision of ``STATE_DTYPES`` (fp32, bf16, 8-bit): the optimizer's ``state_dtype`` is switched,
     one step converts the states, the fastest of ``repeats`` more is timed, and the states' bytes
     are measured. Fewer state bytes mean a smaller static memory and, the step being memory-bound
     on a GPU, a faster step (``mechgpu.traffic.optimizer_step_bytes``); the timing says so where it
     is true (in the CPU interpreter 8-bit steps are slower, and are chosen only to fit). A
     precision the optimizer's options refuse (RMSprop's ``centered=True`` with 8-bit states) is
     left out. Any other optimizer keeps its own state (``state_dtype`` None);
   - for each micro-batch size (by default every divisor of the global batch per rank, rising),
     the blocks' profile (``profile_blocks``: saved bytes a_i, input bytes x_i, forward seconds
     t_i) and the faster of ``repeats`` timed forward and backward passes without checkpointing
     (backward is measured, not taken as 2x forward). Probing stops at the first size that
     cannot fit the budget with any plan, since a larger one cannot either, or at the first
     that runs out of device memory.
2. ``choose``: the candidates are, for each state precision and size, the plans of
   ``plan_frontier`` (the least recompute for each backward peak); predicted peak = static (with
   that precision's state bytes) + the plan's backward peak, and predicted step time = accum x
   (forward + backward + recompute) + that precision's per-step overhead. The fastest candidate
   whose peak fits wins; at equal speed the more precise states, then the lower peak. So a budget
   that only 8-bit states fit chooses them, and one where every precision fits chooses 8-bit only
   where it is measured faster. The candidates do not depend on the budget, so a looser budget never
   chooses a slower predicted configuration.
3. ``confirm`` trains a few steps with the choice through ``Trainer`` and measures the peak and
   the throughput (tokens/s without the first step). The peak is ``torch.cuda.max_memory_allocated``
   on CUDA; on CPU it is the static memory plus the saved activations of one micro-batch
   (``ActivationMeter``), which leaves out the backward's recompute of the largest segment
   that the predicted peak adds.

Every stage leaves the model's weights, buffers, forward methods and the RNG states as it
found them; ``FitResult.apply`` then makes the ``Trainer`` and ``DataLoader`` of the choice.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._backend import kernels_run_on
from .._text import format_bytes, parse_bytes
from ..optim._fused import FusedOptimizer
from ..optim.options import STATE_DTYPES
from .checkpointing import (
    BlockProfile,
    BudgetTooSmall,
    Segment,
    clear_checkpointing,
    describe_segments,
    find_blocks,
    plan_frontier,
    predict,
    profile_blocks,
    unwrap,
)
from .trainer import Trainer

STATIC_KEYS = ("params_bytes", "grads_bytes", "optimizer_state_bytes")


def state_dtype_name(state_dtype: torch.dtype | str | None) -> str | None:
    """How fit's table and ``fit.json`` name a ``state_dtype``: "float32", "bfloat16", "8bit"; None
    (the optimizer's own state) stays None."""
    if state_dtype is None or isinstance(state_dtype, str):
        return state_dtype
    return str(state_dtype).removeprefix("torch.")


def _precision_rank(state_dtype) -> int:
    """0 for the most precise states (STATE_DTYPES' order), and for an optimizer's own."""
    return next((i for i, d in enumerate(STATE_DTYPES) if d == state_dtype), 0)


def _use_state_dtype(optimizer: torch.optim.Optimizer, state_dtype) -> torch.optim.Optimizer:
    """``optimizer`` with its ``state_dtype`` set (a mechgpu option, read at every step); None leaves it."""
    if state_dtype is not None:
        optimizer.state_dtype = state_dtype
    return optimizer


@dataclass(frozen=True)
class StateProbe:
    """One optimizer-state precision: ``state_dtype`` (a ``mechgpu.optim`` option value, or None for
    an optimizer's own state), its measured ``optimizer_state_bytes``, and the per-step overhead
    (the train step less its forward and backward) measured with it."""

    state_dtype: torch.dtype | str | None
    optimizer_state_bytes: int
    step_overhead_s: float


@dataclass
class MicroProbe:
    """What one micro-batch size costs: ``items`` counted in one micro-batch (tokens), the
    blocks' ``profile``, forward and backward seconds without checkpointing, and the
    checkpoint plans worth considering (``plan_frontier``)."""

    micro_batch: int
    items: int
    profile: BlockProfile
    forward_s: float
    backward_s: float
    plans: list[list[Segment]]


@dataclass(frozen=True)
class Candidate:
    """One configuration and what the probes predict for it (bytes include the static memory)."""

    micro_batch: int
    accum_steps: int
    segments: tuple[Segment, ...]
    peak_bytes: int  # static + the plan's backward peak
    saved_bytes: int  # static + what one micro-batch's forward saves
    step_s: float
    tokens_per_s: float
    state_dtype: torch.dtype | str | None = None  # the optimizer's state precision (None: its own)


@dataclass
class _Job:
    """What ``probe`` was given, for ``confirm``."""

    model: nn.Module
    loss_fn: Callable
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer]
    sample_batch: Callable[[int], Any]
    blocks: str | None
    options: dict[str, Any]


@dataclass
class Probes:
    """The measurements ``choose`` predicts from: ``static`` bytes by kind (STATIC_KEYS) and the
    per-step overhead with the optimizer as its factory made it, one ``MicroProbe`` per size
    probed, the sizes left out with why, and ``states``: one ``StateProbe`` per state precision
    considered (none: only the optimizer's own)."""

    global_batch: int
    world: int
    static: dict[str, int]
    step_overhead_s: float
    micros: list[MicroProbe]
    skipped: dict[int, str]
    job: _Job = field(repr=False)
    states: list[StateProbe] = field(default_factory=list)

    @property
    def static_bytes(self) -> int:
        return sum(self.static.values())

    def state_probes(self) -> list[StateProbe]:
        """``states``, or the optimizer's own state as measured in ``static``."""
        return self.states or [StateProbe(None, self.static.get("optimizer_state_bytes", 0), self.step_overhead_s)]

    def candidates(self) -> list[Candidate]:
        """Every state precision with every probed micro-batch size and every plan of its frontier,
        by precision, then size, then peak."""
        out = []
        for state in self.state_probes():
            static = self.static_bytes - self.static.get("optimizer_state_bytes", 0) + state.optimizer_state_bytes
            for probe_ in self.micros:
                accum = self.global_batch // (self.world * probe_.micro_batch)
                for segments in probe_.plans:
                    saved, peak, recompute = predict(probe_.profile, segments)
                    step_s = accum * (probe_.forward_s + probe_.backward_s + recompute) + state.step_overhead_s
                    out.append(Candidate(probe_.micro_batch, accum, tuple(segments), static + peak, static + saved,
                                         step_s, self.world * accum * probe_.items / step_s, state.state_dtype))
        return out

    @property
    def least_static_bytes(self) -> int:
        """The static memory with the fewest state bytes considered."""
        return self.static_bytes - self.static.get("optimizer_state_bytes", 0) + min(
            s.optimizer_state_bytes for s in self.state_probes())


@dataclass
class Choice:
    """The fastest candidate within ``budget`` bytes, among all the probes gave."""

    budget: int
    chosen: Candidate
    candidates: list[Candidate]
    probes: Probes

    def table(self) -> str:
        """Per micro-batch size, the candidates of least memory, of most tokens/s within the budget,
        and without checkpointing (micro, accum, plan, predicted peak and tokens/s, fits?), the
        chosen one marked; ``FitResult.as_dict`` lists them all."""
        shown = []
        for state, micro in dict.fromkeys((c.state_dtype, c.micro_batch) for c in self.candidates):
            group = [c for c in self.candidates if (c.state_dtype, c.micro_batch) == (state, micro)]  # rising peak
            fitting = [c for c in group if c.peak_bytes <= self.budget]
            picks = {group[0], group[-1], *([max(fitting, key=lambda c: c.tokens_per_s)] if fitting else [])}
            shown += [c for c in group if c in picks]
        states = any(c.state_dtype is not None for c in self.candidates)  # a column only where it varies
        head = ("micro", "accum", *(("states",) if states else ()), "checkpointed blocks", "predicted peak",
                "predicted tokens/s", "fits")
        rows = [(str(c.micro_batch), str(c.accum_steps), *((state_dtype_name(c.state_dtype),) if states else ()),
                 describe_segments(c.segments), format_bytes(c.peak_bytes),
                 f"{c.tokens_per_s:,.0f}", ("yes" if c.peak_bytes <= self.budget else "no")
                 + ("  <- chosen" if c == self.chosen else "")) for c in shown]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        right = {0, 1, len(head) - 3, len(head) - 2}  # the numbers
        align = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        lines = [align(head), align(["-" * w for w in widths]), *map(align, rows)]
        if len(shown) < len(self.candidates):
            lines.append(f"({len(shown)} of {len(self.candidates)} candidates shown; fit.json lists them all)")
        lines += [f"micro-batch {m} not probed: {why}" for m, why in self.probes.skipped.items()]
        return "\n".join(lines)


@dataclass
class FitResult:
    """The choice and what a short run with it measured."""

    choice: Choice
    measured_peak_bytes: int
    peak_measure: str
    tokens_per_s: float
    step_s: float
    steps: int

    def as_dict(self) -> dict[str, Any]:
        """The contents of ``fit.json``."""
        c, probes = self.choice.chosen, self.choice.probes
        row = lambda c: {"micro_batch": c.micro_batch, "accum_steps": c.accum_steps,
                         "checkpoint": [list(s) for s in c.segments], "state_dtype": state_dtype_name(c.state_dtype)}
        return {
            "budget_bytes": self.choice.budget,
            "global_batch": probes.global_batch, "world_size": probes.world,
            "chosen": row(c),
            "predicted_peak_bytes": c.peak_bytes, "measured_peak_bytes": self.measured_peak_bytes,
            "peak_measure": self.peak_measure, "predicted_after_forward_bytes": c.saved_bytes,
            "predicted_tokens_per_s": c.tokens_per_s, "tokens_per_s": self.tokens_per_s,
            "predicted_step_s": c.step_s, "step_s": self.step_s, "confirm_steps": self.steps,
            "static_bytes": dict(probes.static),
            "candidates": [{**row(k), "predicted_peak_bytes": k.peak_bytes, "predicted_tokens_per_s": k.tokens_per_s,
                            "fits": k.peak_bytes <= self.choice.budget} for k in self.choice.candidates],
            "not_probed": {str(m): why for m, why in probes.skipped.items()},
        }

    def apply(self, dataset, optimizer: torch.optim.Optimizer | None = None, *,
              loader_options: Mapping[str, Any] | None = None, **trainer_options) -> tuple[Trainer, DataLoader]:
        """The chosen configuration, ready to train: a ``Trainer`` with its accumulation steps and
        checkpoint plan, and a ``DataLoader`` over ``dataset`` (single samples, collated) at its
        micro-batch size.

        The trainer gets the model, loss, blocks and trainer options given to ``fit``, with
        ``trainer_options`` added or overriding (``scheduler``, ``log_dir``, ...), and
        ``optimizer`` (by default a fresh one from fit's factory, with the chosen ``state_dtype``; an
        optimizer given is used as it is). The loader gets
        ``loader_options`` (``shuffle``, ``collate_fn``, a ``DistributedSampler`` on several ranks).

        Example::

            result = mechgpu.train.fit(model, loss_fn, lambda m: mo.AdamW(m.parameters()), sample_batch,
                                       memory="8GiB", global_batch=64)
            trainer, loader = result.apply(dataset, loader_options={"shuffle": True})
            trainer.fit(loader, steps=1000)
        """
        job, chosen = self.choice.probes.job, self.choice.chosen
        if optimizer is None:
            optimizer = _use_state_dtype(job.optimizer_factory(job.model), chosen.state_dtype)
        trainer = Trainer(job.model, job.loss_fn, optimizer, accum_steps=chosen.accum_steps,
                          checkpoint=list(chosen.segments), blocks=job.blocks, **{**job.options, **trainer_options})
        return trainer, DataLoader(dataset, batch_size=chosen.micro_batch, **(loader_options or {}))

    def write(self, out_dir: str | Path) -> Path:
        """Write ``fit.json`` into ``out_dir`` (made if missing); returns its path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "fit.json"
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    def report(self) -> str:
        """The candidates' table, the choice, and predicted against measured peak and throughput."""
        c, probes = self.choice.chosen, self.choice.probes
        static = ", ".join(f"{k.removesuffix('_bytes').replace('_', ' ')} {format_bytes(v)}"
                           for k, v in probes.static.items())
        return "\n".join([
            f"candidates for a memory budget of {format_bytes(self.choice.budget)} (static memory "
            f"{format_bytes(probes.static_bytes)}: {static}):",
            self.choice.table(), "",
            f"chosen: micro-batch {c.micro_batch} x {c.accum_steps} accumulation steps x {probes.world} rank(s) "
            f"= global batch {probes.global_batch}, checkpointed blocks: {describe_segments(c.segments)}"
            + ("" if c.state_dtype is None else f", optimizer states: {state_dtype_name(c.state_dtype)}"),
            f"peak memory: predicted {format_bytes(c.peak_bytes)} ({format_bytes(c.saved_bytes)} after forward), "
            f"measured {format_bytes(self.measured_peak_bytes)} ({self.peak_measure})",
            f"throughput: predicted {c.tokens_per_s:,.0f} tokens/s ({1e3 * c.step_s:.1f} ms/step), measured "
            f"{self.tokens_per_s:,.0f} tokens/s ({1e3 * self.step_s:.1f} ms/step, {self.steps} steps, the first "
            f"left out)",
        ])


# ---------------------------------------------------------------------------- the stages
def probe(model: nn.Module, loss_fn: Callable, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
          sample_batch: Callable[[int], Any], *, global_batch: int, micro_batches: list[int] | None = None,
          memory: str | int | None = None, blocks: str | None = None, repeats: int = 2,
          **trainer_options) -> Probes:
    """Measure what ``choose`` needs (see the module docstring).

    Args:
        model, loss_fn: as ``Trainer`` takes them.
        optimizer_factory: ``optimizer_factory(model)`` returns a fresh optimizer for ``model``;
            called once here and once by ``confirm``.
        sample_batch: ``sample_batch(n)`` returns a micro-batch of ``n`` samples (sequences), as
            the ``Trainer`` takes them (``(inputs, targets)`` or an HF-style dict); called once per
            size probed and for every micro-batch of the confirmation.
        global_batch: samples per optimizer step over all ranks.
        micro_batches: the micro-batch sizes to consider (default: every divisor of the global
            batch per rank); each must divide it.
        memory: a budget (``"2GiB"`` or bytes): stop probing at the first size that cannot fit it.
        blocks: the name of the model's ModuleList/Sequential of repeated blocks (found if None).
        repeats: timed forward and backward passes per size, and timed train steps per state
            precision; the fastest counts.
        trainer_options: passed to ``Trainer`` (``autocast``, ``max_grad_norm``, ``count_fn``,
            ``forward_fn``, ...).
    """
    world = Trainer.world_size()
    if not isinstance(global_batch, int) or global_batch < 1 or global_batch % world:
        raise ValueError(f"global_batch={global_batch!r} must be a positive multiple of the world size {world}")
    per_rank = global_batch // world
    sizes = sorted(set(micro_batches)) if micro_batches else [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    wrong = [m for m in sizes if not isinstance(m, int) or m < 1 or per_rank % m]
    if wrong:
        raise ValueError(f"micro-batch sizes {wrong} do not divide the global batch per rank, {per_rank} "
                         f"({global_batch} over {world} rank(s))")
    budget = None if memory is None else _budget(memory)
    job = _Job(model, loss_fn, optimizer_factory, sample_batch, blocks, trainer_options)
    trainer = Trainer(model, loss_fn, optimizer_factory(model), blocks=blocks, warmup_steps=0, **trainer_options)
    inner, (_, block_list) = unwrap(model), find_blocks(model, blocks)
    micros: list[MicroProbe] = []
    skipped: dict[int, str] = {}
    with _restored(inner, trainer.device):
        clear_checkpointing(block_list)
        first = sample_batch(sizes[0])
        step_s, split = _timed_steps(trainer, first, repeats)
        static = {k: split[k] for k in STATIC_KEYS}
        state_steps = {}  # state_dtype: (state bytes, train step seconds)
        optimizer = trainer.optimizer
        if isinstance(optimizer, FusedOptimizer) and kernels_run_on(trainer.device):
            own = optimizer.state_dtype
            state_steps[own] = (static["optimizer_state_bytes"], step_s)
            for state_dtype in STATE_DTYPES:
                if state_dtype not in state_steps:
                    optimizer.state_dtype = state_dtype  # the next step converts the states
                    try:
                        seconds, other = _timed_steps(trainer, first, repeats)
                    except ValueError:  # refused before any write (RMSprop's centered=True with 8-bit)
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    state_steps[state_dtype] = (other["optimizer_state_bytes"], seconds)
            optimizer.state_dtype = own
        least_static = sum(static.values()) - static["optimizer_state_bytes"] + min(
            (b for b, _ in state_steps.values()), default=static["optimizer_state_bytes"])
        for i, micro in enumerate(sizes):
            batch = first if i == 0 else sample_batch(micro)
            try:
                profile = profile_blocks(inner, block_list, lambda b=batch: trainer.micro_batch_loss(b, model=inner))
                forward_s, backward_s = _forward_backward_s(trainer, batch, repeats)
            except torch.cuda.OutOfMemoryError:
                skipped.update({m: "out of device memory without checkpointing" for m in sizes[i:]})
                break
            plans = plan_frontier(profile)
            micros.append(MicroProbe(micro, int(trainer.count_fn(batch)), profile, forward_s, backward_s, plans))
            least = least_static + min(predict(profile, p)[1] for p in plans)
            if budget is not None and least > budget:
                skipped.update({m: f"micro-batch {micro} already needs at least {format_bytes(least)}"
                                for m in sizes[i + 1:]})
                break
    overhead = lambda seconds: max(0.0, seconds - micros[0].forward_s - micros[0].backward_s) if micros else 0.0
    states = [StateProbe(d, nbytes, overhead(seconds)) for d, (nbytes, seconds) in
              sorted(state_steps.items(), key=lambda item: _precision_rank(item[0]))]
    return Probes(global_batch, world, static, overhead(step_s), micros, skipped, job, states)


def choose(probes: Probes, memory: str | int) -> Choice:
    """The candidate of most predicted tokens/s whose predicted peak fits ``memory`` (ties: the
    lower peak). Raises ``BudgetTooSmall``, naming the least any candidate needs, when none fits."""
    budget = _budget(memory)
    candidates = probes.candidates()
    if not candidates:
        raise BudgetTooSmall("no micro-batch size could be probed: " + "; ".join(
            f"{m}: {why}" for m, why in probes.skipped.items()))
    fitting = [c for c in candidates if c.peak_bytes <= budget]
    if not fitting:
        least = min(candidates, key=lambda c: c.peak_bytes)
        static = probes.least_static_bytes
        why = (f"is below the static memory alone ({format_bytes(static)}: params, grads and optimizer state)"
               if budget < static else "is too small for any configuration")
        raise BudgetTooSmall(
            f"memory budget {format_bytes(budget)} {why}; the least any configuration needs is "
            f"{format_bytes(least.peak_bytes)} ({least.peak_bytes} bytes): micro-batch {least.micro_batch} with "
            f"checkpointed blocks {describe_segments(least.segments)}")
    chosen = max(fitting, key=lambda c: (c.tokens_per_s, -_precision_rank(c.state_dtype), -c.peak_bytes))
    return Choice(budget, chosen, candidates, probes)


def confirm(choice: Choice, steps: int = 3) -> FitResult:
    """Train ``steps`` steps with the chosen configuration through ``Trainer`` (a fresh optimizer,
    fresh micro-batches) and measure its peak memory and throughput; the model is restored after."""
    if steps < 2:
        raise ValueError(f"steps={steps}: the confirmation needs at least 2 steps (the first is left out of "
                         "the throughput)")
    job, chosen = choice.probes.job, choice.chosen
    inner, (_, block_list) = unwrap(job.model), find_blocks(job.model, job.blocks)
    with _restored(inner, next(inner.parameters()).device):
        optimizer = _use_state_dtype(job.optimizer_factory(job.model), chosen.state_dtype)
        trainer = Trainer(job.model, job.loss_fn, optimizer, accum_steps=chosen.accum_steps,
                          checkpoint=list(chosen.segments), blocks=job.blocks, warmup_steps=1, **job.options)
        try:
            summary = trainer.fit((job.sample_batch(chosen.micro_batch) for _ in itertools.count()), steps=steps)
        finally:
            clear_checkpointing(block_list)
    if trainer.device.type == "cuda":
        peak, measure = summary["peak_bytes"], "torch.cuda.max_memory_allocated"
    else:
        peak = sum(summary[k] for k in STATIC_KEYS) + summary["saved_activation_bytes"]
        measure = ("static memory + the saved activations of one micro-batch (ActivationMeter); the prediction "
                   "adds the recompute of the largest checkpointed segment in backward")
    return FitResult(choice, peak, measure, summary["items_per_s"], summary["step_s"], steps)


def fit(model: nn.Module, loss_fn: Callable, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
        sample_batch: Callable[[int], Any], *, memory: str | int, global_batch: int,
        micro_batches: list[int] | None = None, steps: int = 3, blocks: str | None = None,
        **trainer_options) -> FitResult:
    """The fastest micro-batch size, accumulation steps and checkpoint plan whose predicted peak
    memory fits ``memory``, confirmed by ``steps`` steps of training: ``probe``, ``choose`` and
    ``confirm`` in turn (their docstrings give the arguments). Raises ``BudgetTooSmall``, naming
    the least memory any configuration needs, when none fits."""
    probes = probe(model, loss_fn, optimizer_factory, sample_batch, global_batch=global_batch,
                   micro_batches=micro_batches, memory=memory, blocks=blocks, **trainer_options)
    return confirm(choose(probes, memory), steps)


# ---------------------------------------------------------------------------- helpers
def _budget(memory: str | int) -> int:
    budget = parse_bytes(memory)
    if budget <= 0:
        raise ValueError(f"memory budget {memory!r} is not above 0 bytes")
    return budget


@contextlib.contextmanager
def _restored(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Within: the RNG states forked; after: the model's weights and buffers as they were, no grads."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)


def _clock(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed_steps(trainer: Trainer, batch, repeats: int) -> tuple[float, dict[str, int]]:
    """Train steps on ``batch``: the first makes (or converts) the optimizer's state and compiles
    its kernels, then the fastest of ``repeats`` timed ones; its seconds, and the memory split after."""
    trainer.train_step([batch])
    fastest = math.inf
    for _ in range(max(1, repeats)):
        start = _clock(trainer.device)
        trainer.train_step([batch])
        fastest = min(fastest, _clock(trainer.device) - start)
    return fastest, trainer.memory_split()


def _forward_backward_s(trainer: Trainer, batch, repeats: int) -> tuple[float, float]:
    """The fastest of ``repeats`` forward and backward passes on ``batch``, without checkpointing."""
    forward = backward = math.inf
    for _ in range(max(1, repeats)):
        with trainer.gradient_sync(False):
            start = _clock(trainer.device)
            loss = trainer.micro_batch_loss(batch)
            middle = _clock(trainer.device)
            loss.backward()
            end = _clock(trainer.device)
        del loss
        trainer.optimizer.zero_grad(set_to_none=True)
        forward, backward = min(forward, middle - start), min(backward, end - middle)
    return forward, backward
