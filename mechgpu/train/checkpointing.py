"""Gradient checkpointing of a model's repeated blocks, and the saved-activation meter.

A *plan* is a list of checkpointed segments ``(start, end)`` over the chain of blocks; each
segment runs under one ``torch.utils.checkpoint.checkpoint`` call (non-reentrant, RNG state
preserved, so dropout draws the same mask on recompute) and keeps only its input alive.
Blocks outside every segment run as usual and keep their saved tensors.

Policies (``checkpoint=``):

* ``"none"``: no segment; ``"all"``: every block its own segment;
* ``"sqrt"``: ``round(sqrt(n))`` equal segments, every one checkpointed but the last (as
  ``torch.utils.checkpoint.checkpoint_sequential`` does: the last one's activations are
  needed at once in backward, so recomputing them saves nothing at the peak), Chen et al. 2016;
* an int ``k``: ``k`` equal segments, the same way;
* a memory budget (``"2GiB"``, ``"300MB"``, an int of bytes via ``budget=``): the planner
  measures each block's saved-activation bytes and forward time once, then a dynamic
  programme over the chain picks the segments that keep the saved activations of one
  forward pass within the budget with the least recomputation time;
* a list of ``(start, end)`` segments: that plan as given (``mechgpu.train.fit`` chooses one
  from ``plan_frontier``, the plans of least recompute for each backward peak).

The memory model, which the planner uses and ``ActivationMeter`` checks: after forward, a
plain block i holds ``a_i`` bytes of saved tensors, a checkpointed segment starting at i
holds its input ``x_i``, and the rest of the model (embedding, head, loss) holds ``other``.
In backward a segment's activations come back for a moment, so the peak is the saved bytes
plus the largest segment's recomputed ``sum a_i``; the plan reports both.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .._text import format_bytes, parse_bytes

Segment = tuple[int, int]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return getattr(model, "module", model) if hasattr(model, "no_sync") else model


def find_blocks(model: nn.Module, name: str | None = None) -> tuple[str, Sequence[nn.Module]]:
    """The model's repeated blocks: the ModuleList/Sequential called ``name``, or else the one
    with the most children that all share one class (at least 2)."""
    model = unwrap(model)
    if name is not None:
        container = model.get_submodule(name)
        return name, list(container.children())
    best: tuple[str, list[nn.Module]] | None = None
    for qualname, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) >= 2 and len({type(c) for c in children}) == 1:
            if best is None or len(children) > len(best[1]):
                best = (qualname, children)
    if best is None:
        raise ValueError("no repeated blocks found (a ModuleList or Sequential of >= 2 modules of one class); "
                         "name them with blocks='path.to.container'")
    return best


# ----------------------------------------------------------------------------------------
# The saved-activation meter

class ActivationMeter:
    """Counts the bytes of tensors autograd saves for backward while it is active.

    Storages are counted once (a tensor saved by two ops, or views of one buffer) and
    parameters' storages are not counted (a Linear saves its weight, but that memory is the
    parameter's; under FSDP2 the all-gathered copies a layer saves do count). Inside a
    checkpointed segment torch's own hooks replace ours, so what is counted there is the
    segment's input, which ``checkpoint_blocks`` reports to the meter.
    Works on any device; it does not change what is saved.
    """

    _active: ActivationMeter | None = None

    def __init__(self, model: nn.Module | None = None) -> None:
        self._params = set()
        for p in model.parameters() if model is not None else ():
            p = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: the local shard
            try:
                self._params.add(p.untyped_storage().data_ptr())
            except RuntimeError:  # a parameter whose storage is freed (resharded)
                pass
        self._seen: set[int] = set()
        self.bytes = 0
        self.by_block: dict[int, int] = {}
        self.block: int = -1  # the block whose forward is running, -1 for the rest

    def add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            return
        ptr = storage.data_ptr()
        if ptr in self._params or ptr in self._seen:
            return
        self._seen.add(ptr)
        self.bytes += storage.nbytes()
        self.by_block[self.block] = self.by_block.get(self.block, 0) + storage.nbytes()

    def __enter__(self) -> ActivationMeter:
        def pack(t):
            self.add(t)
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        self._outer, ActivationMeter._active = ActivationMeter._active, self
        return self

    def __exit__(self, *exc) -> None:
        ActivationMeter._active = self._outer
        self._hooks.__exit__(*exc)


# ----------------------------------------------------------------------------------------
# Applying a plan

class _SegmentRunner:
    """Installed as ``forward`` of a segment's first block: runs blocks start..end-1 under one
    checkpoint, and makes the other blocks of the segment pass their input through."""

    def __init__(self, blocks: Sequence[nn.Module], originals: list[Callable]) -> None:
        self.blocks, self.originals = blocks, originals

    def _run(self, *args, **kwargs):
        out = self.originals[0](*args, **kwargs)
        for fn in self.originals[1:]:
            out = fn(out)
        return out

    def __call__(self, *args, **kwargs):
        meter = ActivationMeter._active
        if meter is not None:
            for a in args:
                meter.add(a)
        if not torch.is_grad_enabled():
            return self._run(*args, **kwargs)
        return torch_checkpoint(self._run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _identity(x, *args, **kwargs):
    return x


def checkpoint_blocks(blocks: Sequence[nn.Module], segments: list[Segment]) -> None:
    """Make each segment of ``blocks`` run under one non-reentrant checkpoint (undoing any
    earlier plan first). The module tree, its state_dict keys and parameters are unchanged:
    only the blocks' ``forward`` attributes are replaced. A multi-block segment needs each
    block to take and return one tensor (a transformer block's residual stream)."""
    clear_checkpointing(blocks)
    for start, end in segments:
        originals = [blocks[i].forward for i in range(start, end)]
        blocks[start].forward = _SegmentRunner(blocks, originals)
        for i in range(start + 1, end):
            blocks[i].forward = _identity
        for i in range(start, end):
            blocks[i]._mechgpu_checkpointed = True


def clear_checkpointing(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        if getattr(block, "_mechgpu_checkpointed", False):
            del block.forward
            del block._mechgpu_checkpointed


def _checked_segments(segments: Sequence, n_blocks: int) -> list[Segment]:
    """``segments`` as a list of (start, end) int pairs, or ValueError unless they lie in order,
    apart, within 0..n_blocks."""
    checked, previous_end = [], 0
    for segment in segments:
        pair = tuple(segment) if isinstance(segment, (list, tuple)) else ()
        if (len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                or not previous_end <= pair[0] < pair[1] <= n_blocks):
            raise ValueError(f"checkpoint segments {list(segments)!r}: each must be a (start, end) pair with "
                             f"0 <= start < end <= {n_blocks} (the blocks), in order and not overlapping")
        checked.append(pair)
        previous_end = pair[1]
    return checked


def _even_segments(n: int, k: int) -> list[Segment]:
    k = max(1, min(k, n))
    size = math.ceil(n / k)
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    return bounds[:-1]  # the last segment is not checkpointed (see the module docstring)


# ----------------------------------------------------------------------------------------
# Measuring the blocks and planning

@dataclass
class BlockProfile:
    """Per-block saved bytes ``a``, input bytes ``x``, forward seconds ``t``; ``other`` is
    what the rest of the model saves."""

    a: list[int]
    x: list[int]
    t: list[float]
    other: int

    @property
    def total(self) -> int:
        return self.other + sum(self.a)


def profile_blocks(model: nn.Module, blocks: Sequence[nn.Module], run: Callable[[], torch.Tensor]) -> BlockProfile:
    """One warm-up and one measured forward (``run()`` returns the loss) with no checkpointing."""
    clear_checkpointing(blocks)
    n = len(blocks)
    a, x, t = [0] * n, [0] * n, [0.0] * n
    starts = [0.0] * n
    meter = ActivationMeter(model)
    cuda = any(p.is_cuda for p in model.parameters())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    handles = []
    for i, block in enumerate(blocks):
        def pre(mod, args, i=i):
            sync()
            meter.block = i
            x[i] = sum(v.untyped_storage().nbytes() for v in args if isinstance(v, torch.Tensor))
            starts[i] = time.perf_counter()

        def post(mod, args, out, i=i):
            sync()
            t[i] = time.perf_counter() - starts[i]
            meter.block = -1

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        with torch.enable_grad():
            run()  # warm-up (kernel compilation, allocator)
            with meter:
                loss = run()
            del loss
    finally:
        for h in handles:
            h.remove()
    for i in range(n):
        a[i] = meter.by_block.get(i, 0)
    return BlockProfile(a, x, t, meter.by_block.get(-1, 0))


@dataclass
class Plan:
    """Checkpointed segments and what the memory model predicts for them."""

    policy: str
    n_blocks: int
    segments: list[Segment]
    predicted_saved: int | None = None  # bytes saved after one forward pass
    predicted_peak: int | None = None  # plus the largest segment's recompute, in backward
    recompute_s: float | None = None  # forward time redone in backward
    budget: int | None = None
    profile: BlockProfile | None = field(default=None, repr=False)

    def describe(self) -> str:
        segs = describe_segments(self.segments)
        text = f"checkpoint={self.policy}: {len(self.segments)} segment(s) of {self.n_blocks} blocks [{segs}]"
        if self.predicted_saved is not None:
            text += f"; predicted saved activations {format_bytes(self.predicted_saved)}"
            text += f", backward peak {format_bytes(self.predicted_peak)}"
        if self.budget is not None:
            text += f" (budget {format_bytes(self.budget)})"
        return text


def describe_segments(segments: Sequence[Segment]) -> str:
    """Checkpointed segments as block ranges: ``"0-1, 3"``, or ``"none"``."""
    return ", ".join(f"{s}-{e - 1}" if e - s > 1 else f"{s}" for s, e in segments) or "none"


def predict(profile: BlockProfile, segments: list[Segment]) -> tuple[int, int, float]:
    """(saved bytes after forward, peak in backward, recompute seconds) under ``segments``."""
    inside = {i for s, e in segments for i in range(s, e)}
    saved = profile.other + sum(a for i, a in enumerate(profile.a) if i not in inside)
    saved += sum(profile.x[s] for s, _ in segments)
    biggest = max((sum(profile.a[s:e]) for s, e in segments), default=0)
    recompute = sum(sum(profile.t[s:e]) for s, e in segments)
    return saved, saved + biggest, recompute


class BudgetTooSmall(ValueError):
    """A memory budget below the least any checkpoint plan of the model can save."""


def _least_recompute(profile: BlockProfile, room: int, resolution: int,
                     max_segment: int | None = None) -> dict[int, tuple[float, int, tuple]]:
    """The dynamic programme over the chain behind ``plan_budget`` and ``plan_frontier``.

    The state is (block i, bytes the blocks save so far, in units of room/resolution, rounded
    up so a plan that fits in units fits in bytes); from block i either run it plainly (+a_i
    bytes) or start a segment i..j-1 (+x_i bytes, +sum t time) whose saved bytes sum to at most
    ``max_segment``. Returns, for each number of units within ``room``, the plan of least
    recompute time as (time, largest segment's bytes, segments); ties in time go to the smaller
    largest segment (a lower backward peak).
    """
    n = len(profile.a)
    unit = max(1, math.ceil(room / resolution)) if room > 0 else 1
    cap = room // unit
    up = lambda b: -(-b // unit)
    A, X = [up(a) for a in profile.a], [up(x) for x in profile.x]
    prefix_t = [0.0]
    prefix_a = [0]
    for t, a in zip(profile.t, profile.a):
        prefix_t.append(prefix_t[-1] + t)
        prefix_a.append(prefix_a[-1] + a)
    # best[i]: units used -> (time, biggest segment bytes, segments) for blocks 0..i-1
    best: list[dict[int, tuple[float, int, tuple]]] = [dict() for _ in range(n + 1)]
    best[0][0] = (0.0, 0, ())

    def offer(i, m, value):
        if m <= cap and (m not in best[i] or value[:2] < best[i][m][:2]):
            best[i][m] = value

    for i in range(n):
        for m, (t, big, segs) in best[i].items():
            offer(i + 1, m + A[i], (t, big, segs))
            for j in range(i + 1, n + 1):
                seg_a = prefix_a[j] - prefix_a[i]
                if max_segment is not None and seg_a > max_segment:
                    break
                seg_t = prefix_t[j] - prefix_t[i]
                offer(j, m + X[i], (t + seg_t, max(big, seg_a), segs + ((i, j),)))
        # prune states dominated by one with fewer units and no more time
        frontier, kept = math.inf, {}
        for m in sorted(best[i + 1]):
            value = best[i + 1][m]
            if value[0] < frontier:
                kept[m], frontier = value, value[0]
        best[i + 1] = kept
    return best[n]


def plan_budget(profile: BlockProfile, budget: int, resolution: int = 512) -> list[Segment]:
    """The segments whose saved bytes after forward fit ``budget`` with the least recompute time
    (``_least_recompute``)."""
    room = budget - profile.other
    if room < 0:
        raise BudgetTooSmall(f"budget {format_bytes(budget)} is below what the model outside its blocks saves "
                         f"({format_bytes(profile.other)})")
    plans = _least_recompute(profile, room, resolution)
    if not plans:
        least = profile.other + min(profile.x[0], profile.total - profile.other)
        raise BudgetTooSmall(f"budget {format_bytes(budget)} cannot be met: the least this model can save is about "
                         f"{format_bytes(least)} (every block in one checkpointed segment)")
    return list(min(plans.values(), key=lambda v: v[:2])[2])


def plan_frontier(profile: BlockProfile, resolution: int = 256, max_caps: int = 24) -> list[list[Segment]]:
    """The plans that trade the backward peak against recompute time, by rising peak: each
    recomputes less than every plan of lower predicted peak (``predict``), and checkpointing
    nothing is the last. Peak = saved bytes + the largest segment's, so the programme of
    ``_least_recompute`` runs once per cap on the largest segment: each block's own bytes and
    up to ``max_caps`` sums of longer runs of blocks (all of them for short chains, which makes
    the frontier exact up to the rounding of bytes to 1/resolution of the blocks' total).
    """
    n = len(profile.a)
    prefix = list(itertools.accumulate(profile.a, initial=0))
    runs = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 2, n + 1)})
    caps = set(profile.a) | set(runs[::max(1, math.ceil(len(runs) / max_caps))]) | set(runs[-1:])
    room = sum(profile.a) + sum(profile.x)  # more than any plan's blocks save: no plan is cut
    plans = {()}  # checkpointing nothing
    for cap in caps:
        plans.update(segments for _, _, segments in _least_recompute(profile, room, resolution, cap).values())
    scored = sorted((*predict(profile, list(segments))[1:], segments) for segments in plans)
    frontier, least = [], math.inf
    for _, recompute, segments in scored:
        if recompute < least:
            frontier.append(list(segments))
            least = recompute
    return frontier


def make_plan(policy: str | int | Sequence[Segment], n_blocks: int, profile: BlockProfile | None = None) -> Plan:
    """Turn ``policy`` into segments; budgets need ``profile``. A sequence of ``(start, end)``
    pairs is a plan of its own (as ``mechgpu.train.fit`` chooses): used as given once checked."""
    if isinstance(policy, bool):
        policy = "all" if policy else "none"
    if isinstance(policy, (list, tuple)):
        segments, name = _checked_segments(policy, n_blocks), "segments"
    elif isinstance(policy, int):
        if policy < 1:
            raise ValueError(f"checkpoint={policy}: the number of segments must be >= 1")
        segments, name = _even_segments(n_blocks, policy), str(policy)
    elif policy == "none":
        segments, name = [], policy
    elif policy == "all":
        segments, name = [(i, i + 1) for i in range(n_blocks)], policy
    elif policy == "sqrt":
        segments, name = _even_segments(n_blocks, max(1, round(math.sqrt(n_blocks)))), policy
    elif isinstance(policy, str) and policy.isdigit():
        return make_plan(int(policy), n_blocks, profile)
    else:
        budget = parse_bytes(policy)
        if profile is None:
            raise ValueError("a memory budget needs the blocks' profile (profile_blocks)")
        plan = Plan(str(policy), n_blocks, plan_budget(profile, budget), budget=budget, profile=profile)
        plan.predicted_saved, plan.predicted_peak, plan.recompute_s = predict(profile, plan.segments)
        return plan
    plan = Plan(name, n_blocks, segments, profile=profile)
    if profile is not None:
        plan.predicted_saved, plan.predicted_peak, plan.recompute_s = predict(profile, segments)
    return plan
