"""The shared step of every mechgpu optimizer: validate, group, build tables, launch.

Each optimizer subclasses its ``torch.optim`` twin, so the constructor, its validation
messages, ``param_groups``, ``add_param_group``, ``zero_grad``, ``state_dict`` and
scheduler hooks are torch's own. ``step`` is ours, and ``load_state_dict`` checks the
states against the params and keeps them in their own dtype (torch casts them to the
param's).

Safety: a kernel dereferences only addresses of tensors that ``step`` confirmed for this
launch (same object, address, element count and dtype as when their table row was
built), or of buffers the optimizer owns. Every group is validated before the first
write, so a bad group leaves every param, state and step count as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import operator
from collections.abc import Callable

import torch
import torch.optim.optimizer as _torch_optimizer

from .._backend import PLAIN_TENSORS, is_dense, kernels_run_on, warn_fallback_once
from .._backend import local as _local
from ..kernels import clip as clip_kernels
from ..kernels import optim as optim_kernels
from ..kernels.multi_tensor import MultiTensorPlan
from ..kernels.optim import TELEMETRY_FIELDS, Precision, StepControl
from ..kernels.optim_spec import NONNEGATIVE_KEYS, OptimizerSpec
from . import _host
from . import options as _options
from ._state_dict import ABSMAX_KEYS, ELEMENT_KEYS, MASTER_KEY, check_state_dict, state_problem, storage_holds
from .quant8 import ABSMAX_SUFFIX, MIN_8BIT_NUMEL, STATE_8BIT, dequantize, quantize

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: state entries a step writes (besides the param): checked for aliasing
_WRITTEN_KEYS = frozenset(("step", *ELEMENT_KEYS, *ABSMAX_KEYS))
#: what pickling keeps beside torch's own state and mechgpu's options
_PICKLED = ("_rounding_seed", "_own_steps")


def telemetry_from_sums(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """The step-size figures of telemetry sums (``TELEMETRY_FIELDS``: one group's, or several added),
    as 0-d fp32 tensors: ``param_norm`` (||p|| before the update), ``update_norm`` (||p_after -
    p_before||, as stored), ``update_ratio`` (their ratio), ``nonfinite_grads`` (inf or NaN grad
    elements, counted even when the step was skipped) and ``lost_update_fraction`` (of the elements
    whose fp32 update changed them, those whose stored value did not: bf16/fp16 rounding; 0 with
    masters or fp32 params)."""
    field = TELEMETRY_FIELDS.index
    param_norm, update_norm = sums[field("param_sq")].sqrt(), sums[field("update_sq")].sqrt()
    figures = {"param_norm": param_norm, "update_norm": update_norm,
               "update_ratio": update_norm / param_norm.clamp_min(torch.finfo(torch.float64).tiny),
               "nonfinite_grads": sums[field("nonfinite_grads")],
               "lost_update_fraction": sums[field("lost_updates")] / sums[field("changed")].clamp_min(1.0)}
    return {k: v.float() for k, v in figures.items()}


def _warn_fallback(name: str, cpu: bool) -> None:
    """Once per process and reason: torch.optim's own step ran for some params."""
    if cpu:
        warn_fallback_once(
            "optim",
            f"mechgpu.optim.{name}: parameters are on the CPU and TRITON_INTERPRET=1 is not set, so "
            f"this step runs torch.optim.{name}'s own implementation instead of mechgpu's Triton "
            "kernel. Move the model to CUDA, or set TRITON_INTERPRET=1 before importing triton to "
            "run the kernels on the CPU (slowly).",
            stacklevel=4,
        )
    else:
        warn_fallback_once(
            "optim-dtype",
            f"mechgpu.optim.{name}: a param group holds params in a dtype the kernels do not take "
            f"(they take float32, bfloat16 and float16), so torch.optim.{name}'s own implementation "
            "steps that group.",
            stacklevel=4,
        )


#: torch's cheap RecordFunction (the one torch.compile's code emits): the same event for a profiler as
#: ``torch.autograd.profiler.record_function``, without its dispatcher op (measured 6-25 µs a step)
_RecordFunction = getattr(torch._C._profiler, "_RecordFunctionFast", torch.autograd.profiler.record_function)


def _hooked_step(step: Callable) -> Callable:
    """``step`` inside what torch's ``Optimizer.profile_hook_step`` puts around every optimizer's step:
    a RecordFunction named ``Optimizer.step#<class>.step``, the global and the optimizer's step pre
    hooks (which may replace the arguments), ``_optimizer_step_code`` (the profiler's entry point),
    then the post hooks. Marked ``hooked``, so torch's constructor does not wrap it again; a subclass's
    own ``step``, which torch does wrap, runs them once, there."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        if type(self).step is not wrapper:  # a subclass's own step, which torch wrapped: its hooks ran there
            return step(*args, **kwargs)
        with _RecordFunction(f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in itertools.chain(_torch_optimizer._global_optimizer_pre_hooks.values(),
                                            self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but "
                                           f"got {result}.")
            out = step(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in itertools.chain(self._optimizer_step_post_hooks.values(),
                                             _torch_optimizer._global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    wrapper.hooked = True
    return wrapper


class StateKeyError(KeyError):
    """A param's optimizer state lacks an entry its group's options need (torch raises KeyError too)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Bucket:
    """One launch: the tensors of a group with one dtype and one alignment."""

    __slots__ = ("plan", "dtype", "aligned", "precision", "indices", "whole", "index_tensor")

    def __init__(self, plan, dtype, aligned, precision, indices):
        self.plan, self.dtype, self.aligned, self.precision, self.indices = plan, dtype, aligned, precision, indices
        self.whole = False  # the group's only bucket: its params in order, no gather (_build_cache)
        self.index_tensor = torch.tensor(indices, dtype=torch.int64)


#: the types of ``optimizer.state`` the compiled path reads as torch does (torch's is a defaultdict)
_STATE_TYPES = (dict, collections.defaultdict)
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_dtype_of = operator.attrgetter("dtype")
_stride = torch.Tensor.stride
_get_device = torch.Tensor.get_device
_storage = torch.Tensor.untyped_storage
_nbytes = torch.UntypedStorage.nbytes
_storage_offset = torch.Tensor.storage_offset
_element_size = torch.Tensor.element_size


def _where(tensors: list[torch.Tensor]) -> tuple[list, ...]:
    """What a launch relies on for each tensor: its address, element count, dtype, layout, device and
    the bytes of its storage (a dense tensor whose storage keeps the size it had when its row was
    built, at the same address, still holds it: ``_check_group`` checked that then)."""
    return (list(map(_data_ptr, tensors)), list(map(_numel, tensors)), list(map(_dtype_of, tensors)),
            list(map(_stride, tensors)), list(map(_get_device, tensors)),
            list(map(_nbytes, map(_storage, tensors))))


def _locals(tensors: list[torch.Tensor], plain: bool) -> list[torch.Tensor]:
    return tensors if plain else [_local(t) for t in tensors]


class _GroupCache:
    """A param group's launches, and every tensor whose address they dereference.

    The cache is an optimisation, never the source of truth: before each step
    ``confirm`` re-reads the group's params, grads and ``optimizer.state`` and checks
    that every tensor in the table is the same object, at the same address, with the same
    element count, dtype and strides as when its row was built (one C-level pass per list, no
    per-tensor Python). Anything else (state cleared or replaced, ``.data`` swapped, an
    option that adds or drops a state, another param set) makes the step rebuild, which
    validates first. New grad tensors with their param's dtype, shape and strides only
    re-point the grad column.

    Between steps it holds no reference of any kind to a user's tensor, only ``id()``s and
    what ``_where`` read: no memory kept alive, and no weak reference to stop
    ``torch.utils.swap_tensors`` (``Module.to`` with swapping on, FSDP2). An ``id`` may be reused
    by a new tensor once the old one is gone; what the kernel relies on (address, element
    count, dtype, strides, device, storage) is confirmed afresh on the live tensors either way.

    Two paths confirm the same facts. ``confirm`` is Python. ``confirm_fast`` is one call into the
    compiled extension (``_host.cpp``, when loaded) over a record ``record_fast`` made at the end of
    a step the Python path confirmed. It walks ``optimizer.state`` and each param's state dict
    comparing every key and value with the record by identity (no hashing and no Python code, so
    a ``dict.__setitem__`` that bypasses any hook, a dict replaced wholesale or a new entry all
    show), walks the group's params list reading each grad, and compares every live tensor the
    launch reads with its record. Anything else sends the group to the Python path, which
    rebuilds where needed; the compiled record is then made again.
    """

    def __init__(self, signature: tuple, params: list[torch.Tensor], grads: list[torch.Tensor],
                 keys: list[tuple[str, ...]], states: list[torch.Tensor], counters: list[torch.Tensor] | None,
                 buckets: list[_Bucket]) -> None:
        self.signature = signature
        self.param_ids = list(map(id, params))
        self.plain = all(type(t) in PLAIN_TENSORS for t in (*params, *grads, *states))
        self.param_where = _where(_locals(params, self.plain))
        self.keys = keys  # per param, the state entries its row points at
        self.state_ids = list(map(id, states))
        self.state_where = _where(_locals(states, self.plain))
        self.counters = counters  # the optimizer's own step counters (SGD), or None
        self.meta = [(p.dtype, _local(p).shape, _local(p).stride(), _local(p).get_device()) for p in params]
        self.buckets = buckets
        self.grad_ids = list(map(id, grads))
        self.grad_where = _where(_locals(grads, self.plain))  # grads keep their param's layout
        self.grad_ptrs = self.grad_where[0]  # the grad addresses the tables hold (a list or an int64 tensor)
        self.grad_version = 0  # counts the uploads of new grad addresses
        self.pending_grads: list[int] | None = None  # grad addresses confirmed but not yet uploaded
        self.held: list = states  # the confirmed states (or their dicts), held during one step only
        self.device = _local(params[0]).device
        self.fast: tuple | None = None  # the compiled path's record (``record_fast``), or None
        self.moved = False  # confirm_fast found grads at new addresses, not yet uploaded
        self.own_steps: dict | None = None  # the optimizer's counters dict the record was made with
        self.fast_counters = 0  # and its length

    def confirm(self, optimizer: FusedOptimizer, signature: tuple, params: list[torch.Tensor],
                grads: list[torch.Tensor]) -> bool:
        """True when this step can launch from the cache. Writes nothing but the cache itself."""
        try:
            return self._confirm(optimizer, signature, params, grads)
        except (RuntimeError, TypeError):  # no storage (sparse, meta), None: the full checks say what
            return False

    def _confirm(self, optimizer, signature, params, grads) -> bool:
        if signature != self.signature or list(map(id, params)) != self.param_ids:
            return False
        plain = self.plain
        if _where(_locals(params, plain)) != self.param_where:
            return False
        state = optimizer.state
        try:
            states = [entry[key] for entry, keys in zip(map(state.__getitem__, params), self.keys) for key in keys]
        except (KeyError, TypeError):
            return False
        if list(map(id, states)) != self.state_ids or _where(_locals(states, plain)) != self.state_where:
            return False
        self.held = states  # alive until the launches are queued
        if self.counters is not None and not all(map(operator.is_, optimizer._own_counters(params), self.counters)):
            return False
        local_grads = _locals(grads, plain)
        if list(map(id, grads)) == self.grad_ids:
            return _where(local_grads) == self.grad_where
        strided = torch.strided  # new grads: each must fit its param as the rows assume
        for g, (dtype, shape, stride, device) in zip(local_grads, self.meta):
            if (g.layout is not strided or g.dtype is not dtype or g.shape != shape
                    or g.stride() != stride or g.get_device() != device):
                return False
        where = _where(local_grads)
        # dense as its param: numel elements from the storage offset, which the storage must hold
        reach = map(operator.mul, map(operator.add, map(_storage_offset, local_grads), where[1]),
                    map(_element_size, local_grads))
        if any(map(operator.gt, reach, where[5])):
            return False
        ptrs = where[0]
        for bucket in self.buckets:
            if bucket.aligned and any(ptrs[i] % 16 for i in bucket.indices):
                return False
        self.grad_ids = list(map(id, grads))
        self.grad_where = where
        self.pending_grads = ptrs
        return True

    def upload_grads(self) -> None:
        """Point the tables at the grads ``confirm`` or ``confirm_fast`` accepted (an upload only if
        they moved)."""
        if self.moved:
            fast = self.fast
            grad_ptrs = fast[14]
            for bucket in self.buckets:
                bucket.plan.upload_column("grad", grad_ptrs if bucket.whole else grad_ptrs[bucket.index_tensor])
            self.fast = (*fast[:2], grad_ptrs, *fast[3:14], fast[2], fast[15])  # uploaded <-> next step's buffer
            self.moved = False
            self.grad_ids = None  # the Python record no longer says what the tables hold
            self.grad_ptrs, self.grad_version = grad_ptrs, self.grad_version + 1
        if self.pending_grads is not None:
            for bucket in self.buckets:
                bucket.plan.set_column("grad", [self.pending_grads[i] for i in bucket.indices])
            self.grad_ptrs, self.grad_version = self.pending_grads, self.grad_version + 1
            self.pending_grads = None

    @property
    def norm_ready(self) -> bool:
        """Whether the optimizer's clip norm can read this group's grads from the addresses it
        confirmed (``_NormOverCaches``): plain tensors, 16-byte aligned (every bucket aligned)."""
        return self.plain and all(bucket.aligned for bucket in self.buckets)

    def confirm_fast(self, host, optimizer: FusedOptimizer, signature: tuple, group_params) -> bool:
        """``confirm`` through the compiled extension: True when this step can launch from the cache.
        Writes nothing but the cache itself."""
        state = optimizer.state
        if signature != self.signature or type(group_params) is not list or type(state) not in _STATE_TYPES:
            return False
        if self.counters is not None:
            own = optimizer.__dict__.get("_own_steps")
            if own is not self.own_steps or len(own) != self.fast_counters:
                return False
        status = host.confirm(group_params, state, self.fast)
        if status < 0:
            return False
        self.moved = status == 1
        return True

    def record_fast(self, host, optimizer: FusedOptimizer, group_params, params: list[torch.Tensor]) -> None:
        """The compiled path's record of this step's confirmed tensors (``self.held``: the states),
        of ``optimizer.state``'s keys and values and of each param's state dict, all read now (at
        the end of a step the Python path confirmed, with nothing run since). None where the
        extension cannot describe a tensor: the Python path stays."""
        self.fast = None
        state = optimizer.state
        if (not self.plain or type(group_params) is not list or type(state) not in _STATE_TYPES
                or len(self.held) != len(self.state_ids)):
            return
        allowed = PLAIN_TENSORS
        owned = self.counters or []
        records = [host.where(tensors, allowed) for tensors in (params, self.held, owned)]
        if any(r is None for r in records):
            return
        where_p, where_s, where_o = records
        position = {id(k): i for i, k in enumerate(state)}
        entries = [state[p] for p in params]
        if any(type(e) is not dict for e in entries):
            return
        starts, entry_keys, entry_values, state_entry = [0], [], [], []
        held = iter(self.held)
        for entry, keys in zip(entries, self.keys):
            first = len(entry_keys)
            order = list(entry)
            for key in keys:
                value = entry[key]
                if value is not next(held):  # not what this step confirmed
                    return
                state_entry.append(first + order.index(key))
            entry_keys += map(id, order)
            entry_values += map(id, entry.values())
            starts.append(len(entry_keys))
        aligned = [0] * len(params)
        for bucket in self.buckets:
            for i in bucket.indices:
                aligned[i] = int(bucket.aligned)

        def int64(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.int64)

        self.fast = (int64(p.grad is not None for p in group_params), where_p,
                     int64(map(_data_ptr, [p.grad for p in params])), int64(aligned),
                     int64(position.get(id(p), -1) for p in params), int64(map(id, state)),
                     int64(map(id, state.values())), int64(starts), int64(entry_keys), int64(entry_values),
                     int64(state_entry), where_s, list(owned), where_o,
                     torch.empty(len(params), dtype=torch.int64), allowed)
        self.own_steps = optimizer.__dict__.get("_own_steps")
        self.fast_counters = len(self.own_steps or ())


class _NormOverCaches:
    """The clip norm of a step whose groups all run from caches confirmed or built this step: one norm
    table over their grads, in order, at the addresses the caches hold (``_GroupCache.grad_ptrs``,
    confirmed or validated this step), with the element counts and dtypes they confirmed. Rebuilt
    when the caches change; its address column uploaded again when a cache's grads moved
    (``grad_version``). None of ``mechgpu.clip``'s per-tensor grouping runs: ~550 µs of host time a
    step at 148 tensors."""

    def __init__(self, caches: list[_GroupCache]) -> None:
        self.caches = caches
        self.versions = [cache.grad_version for cache in caches]
        numels = [n for cache in caches for n in cache.param_where[1]]
        self.plan = MultiTensorPlan(numels, caches[0].device, clip_kernels.TABLE)
        codes = clip_kernels.DTYPE_CODES
        self.plan.set_rows([clip_kernels.TABLE.row(address=int(ptr), numel=n, dtype_code=codes[meta[0]])
                            for cache in caches
                            for ptr, n, meta in zip(cache.grad_ptrs, cache.param_where[1], cache.meta)])

    def serves(self, caches: list[_GroupCache]) -> bool:
        return len(caches) == len(self.caches) and all(map(operator.is_, caches, self.caches))

    def launch(self, out: torch.Tensor, max_norm: float, grad_scale: torch.Tensor | None) -> None:
        """The L2 norm of the caches' grads and the clip coefficient into ``out``."""
        versions = [cache.grad_version for cache in self.caches]
        if versions != self.versions:
            columns = [torch.as_tensor(cache.grad_ptrs, dtype=torch.int64) for cache in self.caches]
            self.plan.upload_column("address", columns[0] if len(columns) == 1 else torch.cat(columns))
            self.versions = versions
        workspace = clip_kernels.plan_workspace(self.plan, clip_kernels.norm_kind(2.0))
        clip_kernels.grad_norm(self.plan, workspace, out, norm_type=2.0, max_norm=max_norm, aligned=True,
                               grad_scale=grad_scale)


class FusedOptimizer:
    """Mixin placed before the torch optimizer class in the MRO; a subclass names its record
    (``_spec``, an ``OptimizerSpec``) and gets its constructor, state keys, hyperparameters and
    launch from it. mechgpu's keyword-only options are ``options.Options``.

    State follows torch: an empty state is created on a param's first step; a state that
    lacks an entry its options need (amsgrad, centered or RMSprop momentum switched on
    after a step) raises ``StateKeyError`` (a KeyError, as in torch) before anything is
    written; SGD creates a missing momentum buffer from the grad, as torch does. A state
    entry replaced by the user is used from the next step on; one of another dtype,
    device or layout is copied into a new tensor of the state's dtype on p's device.
    """

    _spec: OptimizerSpec
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "_spec" in cls.__dict__:
            cls.__init__ = _constructor(cls._spec)

    @property
    def _torch_name(self) -> str:
        return self._spec.name

    def _state_keys(self, group: dict) -> tuple[str | None, ...]:
        return self._spec.state_keys(group)

    @property
    def _step_keys(self) -> tuple[str, ...]:
        """The state entry the kernel counts steps in; none where the optimizer counts privately."""
        key = self._spec.step_key
        return () if key is None else (key,)

    def _entry_keys(self, group: dict) -> tuple[str, ...]:
        """The state entries the group's options make: the step counter, then the states."""
        return (*self._step_keys, *(k for k in self._state_keys(group) if k is not None))

    def _required_keys(self, group: dict) -> tuple[str, ...]:
        """Entries a started state must have (torch raises KeyError without them)."""
        return () if self._spec.makes_missing_states else self._entry_keys(group)

    def _launch(self, plan: MultiTensorPlan, dtype: torch.dtype, group: dict, aligned: bool,
                control: StepControl, precision: Precision, hypers: dict) -> None:
        spec = self._spec
        optim_kernels.launch(plan, dtype, spec.rule, aligned=aligned, states=spec.states_used(group),
                             flags=spec.kernel_flags(group), control=control, precision=precision, **hypers)

    def _init_mechgpu(self, options: _options.Options) -> None:
        for name in _options.NAMES:
            setattr(self, name, getattr(options, name))
        self._rounding_seed = int(torch.randint(0, 2**30, ())) if options.stochastic_rounding else 0
        self._check_options()
        self._reset_buffers()
        for group in self.param_groups:  # states torch's constructor made (Adagrad's), in the param's dtype
            for p in group["params"]:
                if p.dtype not in SUPPORTED_DTYPES:  # stepped by torch, in torch's state
                    continue
                for key in list(self.state.get(p, ())):
                    fill = key in ELEMENT_KEYS and self._spec.fill_of(key)
                    if fill:  # made again from the exact fill value, in mechgpu's state dtype
                        self._new_state(p, key, group[fill])

    def _options(self) -> _options.Options:
        return _options.Options(**{name: getattr(self, name) for name in _options.NAMES})

    def _check_options(self) -> tuple:
        """mechgpu's options, checked at construction and again at every step (they are plain
        attributes a user may set), and their values. Values equal to the last ones that passed are
        not checked again: ``Options.check`` reads nothing but them."""
        values = tuple(getattr(self, name) for name in _options.NAMES)
        if values != self.__dict__.get("_checked_options"):
            self._options().check()
            self._checked_options = values
        return values

    def _hypers(self, group_index: int, group: dict, device: torch.device) -> dict:
        """The group's hyperparameters as the launch's keyword arguments (the spec's ``hypers``),
        each checked: a real number, or a one-element real tensor on the CPU (passed as a number:
        no device synchronisation) or on the params' ``device`` (read by the kernel)."""
        arguments = {}
        for key, names in self._spec.hypers.items():
            value = group[key]
            if type(names) is not tuple:
                arguments[names] = value if type(value) is float else self._hyper(group_index, key, value, device)
                continue
            if len(value) != len(names):
                raise self._error(f"group {group_index}'s {key} must hold {len(names)} values, not {value!r}",
                                  ValueError)
            for name, item in zip(names, value):
                arguments[name] = item if type(item) is float else self._hyper(group_index, key, item, device)
        return arguments

    def _reset_buffers(self) -> None:
        """Drop every cache and device buffer the optimizer owns; the next step remakes them."""
        self._clip_out: torch.Tensor | None = None
        self._telemetry: torch.Tensor | None = None  # fp64 [groups, TELEMETRY_FIELDS.width] of the last step
        self._group_caches: dict[int, _GroupCache] = {}
        self._norm_plans: dict = {}
        self._norm_over_caches: _NormOverCaches | None = None

    def __repr__(self) -> str:
        """torch's repr (each param group's hyperparameters), then every one of mechgpu's options."""
        options = "".join(f"    {name}: {getattr(self, name)}\n" for name in _options.NAMES)
        return f"{super().__repr__().removesuffix(')')}mechgpu options\n{options})"

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """torch's state plus mechgpu's options; caches and device buffers are remade."""
        state = super().__getstate__()
        state.update((name, getattr(self, name, getattr(_options.DEFAULTS, name))) for name in _options.NAMES)
        state.update((name, self.__dict__[name]) for name in _PICKLED if name in self.__dict__)
        return state

    def __setstate__(self, state: dict) -> None:
        if "_sgd_steps" in state:  # pickled by mechgpu before its counters' generic name
            state["_own_steps"] = state.pop("_sgd_steps")
        super().__setstate__(state)
        for name in _options.NAMES:  # an optimizer pickled by an older mechgpu
            self.__dict__.setdefault(name, getattr(_options.DEFAULTS, name))
        self.__dict__.setdefault("_rounding_seed", 0)
        self._reset_buffers()

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global grad norm of the last step, before clipping (with max_grad_norm set).

        A 0-d view of a device buffer that each step overwrites; reading it is the only sync.
        """
        return None if self._clip_out is None else self._clip_out[0]

    @property
    def last_update_norm(self) -> torch.Tensor | None:
        """||p_after - p_before|| of the last step (with track_update_norm or telemetry), as a device tensor."""
        if self._telemetry is None or not (self.track_update_norm or self.telemetry):
            return None
        return self._telemetry[:, TELEMETRY_FIELDS.index("update_sq")].sum().sqrt().float()

    @property
    def last_telemetry(self) -> list[dict[str, torch.Tensor]] | None:
        """Per param group, the last step's telemetry (with telemetry=True): ``telemetry_from_sums``
        of the group's sums, 0-d device tensors read on demand (reading one is the only sync).
        A group with no grads this step reads 0 throughout."""
        if self._telemetry is None or not self.telemetry:
            return None
        return [telemetry_from_sums(row) for row in self._telemetry]

    @property
    def can_lose_updates(self) -> bool:
        """Whether telemetry's ``lost_update_fraction`` can be non-zero: some param is stored in
        bf16/fp16 without an fp32 master copy, so rounding the updated value back to the param's
        dtype can leave it unchanged. False for fp32 params and with ``master_weights``."""
        return any(p.dtype in (torch.bfloat16, torch.float16) and not self._uses_master(p)
                   for group in self.param_groups for p in group["params"])

    @property
    def last_telemetry_sums(self) -> torch.Tensor | None:
        """The last step's telemetry sums over every group, fp64 ``[TELEMETRY_FIELDS.width]``, to add
        across ranks (FSDP2 shards) before ``telemetry_from_sums``."""
        if self._telemetry is None or not self.telemetry:
            return None
        return self._telemetry.sum(0)

    # ------------------------------------------------------------------ validation
    def _error(self, message: str, exc=RuntimeError):
        return exc(f"mechgpu.optim.{self._torch_name}: {message}")

    def _check_group(self, group_index: int, group: dict, params: list[torch.Tensor]) -> None:
        """Every check of params and grads that can fail, before anything is written."""
        if self.state_dtype == STATE_8BIT:
            for name, why in self._spec.not_8bit.items():
                flag = self._spec._flag(name)
                if flag.of(group):
                    raise ValueError(f"mechgpu.optim.{self._torch_name}: group {group_index} has {flag.meaning}, "
                                     f"which state_dtype={STATE_8BIT!r} does not support: {why}")
        device = _local(params[0]).device
        for i, param in enumerate(params):
            p, g = _local(param), _local(param.grad)
            where = f"param {i} of group {group_index}"
            if g.is_sparse:
                raise RuntimeError(self._spec.sparse_message)
            if p.device != device:
                raise self._error(f"all params of a group must be on one device; {where} is on "
                                  f"{p.device}, the group's first param on {device}")
            if g.dtype != p.dtype:
                raise self._error(f"the grad of {where} has dtype {g.dtype}, its param {p.dtype}")
            if g.shape != p.shape:
                raise self._error(f"the grad of {where} has shape {tuple(g.shape)}, its param {tuple(p.shape)}")
            if g.device != p.device:
                raise self._error(f"the grad of {where} is on {g.device}, its param on {p.device}")
            if not is_dense(p):
                raise self._error(f"{where} is not contiguous (shape {tuple(p.shape)}, stride {p.stride()}); "
                                  "pass contiguous parameters")
            if g.stride() != p.stride():
                raise self._error(f"the grad of {where} has stride {g.stride()}, its param {p.stride()}; "
                                  "grads must share their param's memory layout")
            for what, t in (("", p), ("the grad of ", g)):
                if not storage_holds(t):
                    raise self._error(f"{what}{where} has {t.numel()} elements but its storage holds "
                                      f"{t.untyped_storage().nbytes()} bytes (was the storage resized or freed?)")

    def _check_state(self, group_index: int, group: dict, params: list[torch.Tensor]) -> None:
        """Every check of the params' existing states, before anything is written."""
        required = self._required_keys(group)
        for i, p in enumerate(params):
            state = self.state.get(p)
            if not state:
                continue  # made on this step, as torch does
            where = f"param {i} of group {group_index}"
            for key in required:
                if state.get(key) is None:
                    needed_by = self._spec.needed_by(key)
                    reason = f", which {needed_by} needs" if needed_by else ""
                    raise StateKeyError(
                        f"mechgpu.optim.{self._torch_name}: the state of {where} has no {key!r}{reason} "
                        f"(torch.optim.{self._torch_name} raises KeyError here too). Options that add a "
                        "state entry can only be switched on before a param's first step, or after "
                        "clearing its state (optimizer.state[p].clear())")
            problem = state_problem(state, p, local=True)
            if problem is not None:
                raise self._error(f"the state of {where} does not fit it: {problem}")
        self._check_no_aliasing(group_index, params)

    def _check_no_aliasing(self, group_index: int, params: list[torch.Tensor]) -> None:
        """No two tensors the kernel writes (params, states, step counters) share memory: one
        launch updates them all at once, so an alias would be a race, not torch's sequence."""
        owners: dict[int, str] = {}
        for i, p in enumerate(params):
            tensors = [("the param", p)] + [(f"state {k!r}", v) for k, v in self.state.get(p, {}).items()
                                            if torch.is_tensor(v) and k in _WRITTEN_KEYS]
            for what, t in tensors:
                local = _local(t)
                if local.numel() == 0 or local.device.type == "meta":
                    continue
                name = f"{what} of param {i} of group {group_index}"
                other = owners.setdefault(local.data_ptr(), name)
                if other != name:
                    raise self._error(f"{name} shares its memory with {other}; give each its own tensor")

    # ------------------------------------------------------------------ state
    def _step_counter(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 device scalar the kernel counts p's steps in: torch's state['step'], or where
        torch keeps none (SGD) a private count, since the kernel must know a first step (SGD's
        momentum buffer <- grad) even when GradScaler skipped the last one."""
        if not self._step_keys:
            counters = self.__dict__.setdefault("_own_steps", {})
            counter = counters.get(p)
            if counter is None:  # a state loaded from a state_dict has started
                started = any(self.state[p].get(s.key) is not None for s in self._spec.states)
                counter = counters[p] = torch.full((), float(started), dtype=torch.float32, device=_local(p).device)
            return counter
        state = self.state[p]
        step = state.get("step")
        if step is None:
            step = torch.zeros((), dtype=torch.float32, device=_local(p).device)
        elif not torch.is_tensor(step):
            step = torch.tensor(float(step), dtype=torch.float32, device=_local(p).device)
        elif step.device != _local(p).device or step.dtype != torch.float32 or step.dim() != 0:
            step = step.to(device=_local(p).device, dtype=torch.float32).reshape(())
        state["step"] = step
        return step

    def _uses_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype != torch.float32

    def _quantized(self, p: torch.Tensor) -> bool:
        """Whether p's states are 8-bit: ``state_dtype="8bit"`` and at least MIN_8BIT_NUMEL elements in
        the whole param (a DTensor's global numel: every rank decides alike, whatever its shard's size)."""
        return self.state_dtype == STATE_8BIT and p.numel() >= MIN_8BIT_NUMEL

    def _float_state_dtype(self) -> torch.dtype:
        """The dtype of states that are not 8-bit (those of small tensors under ``"8bit"``: fp32)."""
        return torch.float32 if self.state_dtype == STATE_8BIT else self.state_dtype

    def _new_state(self, p: torch.Tensor, key: str, value: float | torch.Tensor) -> None:
        """Set state ``key`` of p to ``value`` (a fill, or a tensor of p's shape), in p's layout and on
        its device: 8-bit codes and block maxima where p's states are 8-bit, else the state dtype."""
        state = self.state[p]
        state.pop(key + ABSMAX_SUFFIX, None)
        if self._quantized(p):
            if isinstance(value, torch.Tensor):  # in p's layout, so that its blocks are the kernel's
                value = _local(torch.empty_like(p, dtype=torch.float32,
                                                memory_format=torch.preserve_format).copy_(value))
            state[key], state[key + ABSMAX_SUFFIX] = quantize(value, key in NONNEGATIVE_KEYS, like=_local(p))
            return
        dtype = self._float_state_dtype()
        if isinstance(value, torch.Tensor):
            state[key] = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(value)
        else:
            state[key] = torch.full_like(p, value, dtype=dtype, memory_format=torch.preserve_format)

    def _fits_kernel(self, p: torch.Tensor, key: str) -> bool:
        """Whether state ``key`` of p is in the form the kernel reads: its dtype (uint8 codes beside
        fp32 block maxima for 8-bit states), p's device and layout."""
        state, local = self.state[p], _local(p)
        buf = _local(state[key])
        if buf.device != local.device or buf.stride() != local.stride():
            return False
        if not self._quantized(p):
            return buf.dtype == self._float_state_dtype() and key + ABSMAX_SUFFIX not in state
        absmax = state.get(key + ABSMAX_SUFFIX)
        return (buf.dtype == torch.uint8 and absmax is not None and _local(absmax).device == local.device
                and absmax.dtype == torch.float32 and _local(absmax).is_contiguous())

    def _float_state(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """State ``key`` of p as stored values: 8-bit codes dequantized (fp32), else as it is."""
        state = self.state[p]
        buf, absmax = state[key], state.get(key + ABSMAX_SUFFIX)
        if buf.dtype == torch.uint8 and absmax is not None:
            return dequantize(_local(buf), _local(absmax), key in NONNEGATIVE_KEYS)
        return buf

    def _ensure_state(self, p: torch.Tensor, group: dict) -> None:
        """Create p's state (zeros, or the spec's fill), or repair it for the kernel (state dtype,
        8-bit codes or not, p's device and layout)."""
        keys = [k for k in self._state_keys(group) if k is not None]
        state = self.state[p]
        if not self._step_keys and any(state.get(k) is None for k in keys):
            self.__dict__.get("_own_steps", {}).pop(p, None)  # a new state starts a new count
        self._step_counter(p)  # first, so the state's keys come in torch's order
        local = _local(p)
        for key in keys:
            buf = state.get(key)
            if buf is None:
                fill = self._spec.fill_of(key)
                self._new_state(p, key, 0.0 if fill is None else group[fill])
            elif not self._fits_kernel(p, key):
                self._new_state(p, key, self._float_state(p, key))
        if self._uses_master(p):
            master = state.get(MASTER_KEY)
            if master is None:
                state[MASTER_KEY] = torch.empty_like(p, dtype=torch.float32,
                                                     memory_format=torch.preserve_format).copy_(p)
            elif (master.dtype != torch.float32 or _local(master).device != local.device
                  or _local(master).stride() != local.stride()):
                fixed = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state[MASTER_KEY] = fixed.copy_(master)

    def _kernel_keys(self, p: torch.Tensor, group: dict) -> tuple[str, ...]:
        """The state entries of p whose addresses its table row holds."""
        keys = self._entry_keys(group)
        if self._quantized(p):
            keys = (*keys, *(k + ABSMAX_SUFFIX for k in self._state_keys(group) if k is not None))
        return (*keys, MASTER_KEY) if self._uses_master(p) else keys

    def _own_counters(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Step counters the optimizer keeps outside ``state`` (where torch's state has none), or None."""
        if self._step_keys:
            return None
        counters = self.__dict__.get("_own_steps", {})
        return [counters.get(p) for p in params]

    def _signature(self, group: dict, options: tuple | None = None) -> tuple:
        """Everything besides the tensors that decides a group's table rows and kernels (``options``:
        the option values ``_check_options`` gave this step, else read now)."""
        if options is None:
            options = tuple(getattr(self, name) for name in _options.NAMES)
        return (self._state_keys(group), *options, self._rounding_seed)

    def _hyper(self, group_index: int, key: str, value, device: torch.device):
        """One hyperparameter that is not a float, checked (``_hypers``): an int as it is, a tensor on
        the params' device as it is (read by the kernel), a CPU tensor as a float."""
        if isinstance(value, torch.Tensor):
            if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
                if value.device == device:
                    return value
                if value.device.type == "cpu":
                    return float(value)
                raise self._error(f"group {group_index}'s tensor {key} is on {value.device}, its params "
                                  f"on {device}; put it on one of them (or the CPU)")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        shown = f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else repr(value)
        raise self._error(f"group {group_index}'s {key} must be a real number or a one-element "
                          f"real tensor, not {shown}", TypeError)

    # ------------------------------------------------------------------ step
    @_hooked_step
    def step(self, closure: Callable[[], float] | None = None):
        """One optimisation step: one kernel launch per (param group, dtype), plus one norm
        launch with ``max_grad_norm``. Never synchronises with the host.

        Every group is checked before the first write: a step that raises has changed no
        param, state or step count.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        caches = self._group_caches
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad(), without its ~1.3 µs of context manager
        try:
            return self._step(caches, loss)
        finally:
            torch._C._set_grad_enabled(grad_enabled)
            for cache in caches.values():
                cache.held = []

    def _step(self, caches: dict[int, _GroupCache], loss):
        # 1. confirm or validate every group; nothing is written
        options = self._check_options()
        host = _host.loader.get()  # the compiled confirmation, once built
        work, fallback_groups, hypers = [], [], {}
        for group_index, group in enumerate(self.param_groups):
            cache = caches.get(group_index)
            if (cache is not None and cache.fast is not None
                    and cache.confirm_fast(host, self, self._signature(group, options), group["params"])):
                hypers[group_index] = self._hypers(group_index, group, cache.device)
                work.append((group_index, group, None, cache))  # params: read again only if needed
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            hypers[group_index] = self._hypers(group_index, group, _local(params[0]).device)
            grads = [p.grad for p in params]
            if cache is not None:
                cache.fast, cache.moved = None, False  # made again once this step is confirmed
            if cache is not None and cache.confirm(self, self._signature(group, options), params, grads):
                work.append((group_index, group, params, cache))
                continue
            self._check_group(group_index, group, params)
            self._check_state(group_index, group, params)
            if kernels_run_on(_local(params[0]).device) and all(_local(p).dtype in SUPPORTED_DTYPES for p in params):
                work.append((group_index, group, params, None))
            else:
                fallback_groups.append(group)
        work_devices = [cache.device if params is None else _local(params[0]).device for _, _, params, cache in work]
        devices = set(work_devices)
        if self.max_grad_norm is not None and len(devices) > 1:
            raise self._error(f"max_grad_norm needs all params on one device; they are on {sorted(map(str, devices))}")

        # 2. write: states made or repaired, tables built or re-pointed, then the launches
        telemetry = None
        if (self.track_update_norm or self.telemetry) and (work or fallback_groups):
            telemetry = self._telemetry_buffer(work_devices[0] if work else _local(next(
                p for g in fallback_groups for p in g["params"] if p.grad is not None)).device)
        found_inf = self.__dict__.get("found_inf")  # set by torch.amp.GradScaler.step
        if found_inf is not None and self._makes_state(work) and found_inf.item():
            # GradScaler found inf/NaN on a step that would make optimizer state: torch's step is
            # skipped before it makes any (one host read, only on steps that make state)
            if telemetry is not None:
                self._count_nonfinite(telemetry, [group for _, group, _, _ in work] + fallback_groups)
            return loss
        device = devices.pop() if work else None
        grad_scale = self._amp_tensor("grad_scale", device) if work else None
        clip = None
        if self.max_grad_norm is not None and work:  # one norm over every grad, torch's groups' too
            if self._clip_out is None or self._clip_out.device != device:
                self._clip_out = torch.zeros(2, dtype=torch.float32, device=device)
            clip = self._clip_out
            if fallback_groups:  # torch's step of those groups reads the coefficient: the norm comes first
                self._general_norm(clip, work, fallback_groups, grad_scale)
        if fallback_groups:
            for cpu in {not kernels_run_on(_local(g["params"][0]).device) for g in fallback_groups}:
                _warn_fallback(self._torch_name, cpu)
            self._torch_step(fallback_groups, telemetry, clip)
        if not work:
            return loss
        for index, (group_index, group, params, cache) in enumerate(work):
            if cache is None:
                cache = caches[group_index] = self._build_cache(group_index, group, params)
                work[index] = (group_index, group, params, cache)
            cache.upload_grads()
        if clip is not None and not fallback_groups:
            self._norm_of_caches(clip, work, grad_scale)

        control = StepControl(clip=clip, skip_nonfinite=self.skip_nonfinite and clip is not None,
                              grad_scale=grad_scale, found_inf=self._amp_tensor("found_inf", device))
        for group_index, group, _, cache in work:
            if telemetry is not None:  # on the kernels' device
                control = dataclasses.replace(control, telemetry=telemetry[group_index])
            for bucket in cache.buckets:
                self._launch(bucket.plan, bucket.dtype, group, bucket.aligned, control, bucket.precision,
                             hypers[group_index])
        if host is not None:
            self._record_fast(host, work)
        return loss

    def _general_norm(self, clip: torch.Tensor, work: list, fallback_groups: list[dict],
                      grad_scale: torch.Tensor | None) -> None:
        """The clip norm over every group's grads, torch's groups' too, through ``mechgpu.clip``."""
        from ..clip import total_norm_into

        grads = [p.grad for _, group, params, _ in work
                 for p in (params if params is not None else group["params"]) if p.grad is not None]
        grads += [p.grad for g in fallback_groups for p in g["params"] if p.grad is not None]
        total_norm_into(clip, grads, 2.0, float(self.max_grad_norm), grad_scale, plans=self._norm_plans)

    def _norm_of_caches(self, clip: torch.Tensor, work: list, grad_scale: torch.Tensor | None) -> None:
        """The clip norm of a step whose groups the kernels step, all confirmed or built this step: over
        the grads their caches hold (``_NormOverCaches``, made on the step that builds the caches, so
        a step captured after one warm-up step uploads nothing), or the general norm where a cache
        cannot say (DTensors, an unaligned bucket)."""
        caches_now = [cache for *_, cache in work]
        if not all(cache.norm_ready for cache in caches_now):
            self._general_norm(clip, work, [], grad_scale)
            return
        norm = self._norm_over_caches
        if norm is None or not norm.serves(caches_now):
            norm = self._norm_over_caches = _NormOverCaches(caches_now)
        norm.launch(clip, float(self.max_grad_norm), grad_scale)

    def _record_fast(self, host, work: list) -> None:
        """The compiled path's record of each group the Python path confirmed this step."""
        for _, group, params, cache in work:
            if params is not None:
                cache.record_fast(host, self, group["params"], params)

    def _telemetry_buffer(self, device: torch.device) -> torch.Tensor:
        """The fp64 [groups, TELEMETRY_FIELDS.width] this step's telemetry is summed into, zeroed."""
        shape = (len(self.param_groups), TELEMETRY_FIELDS.width)
        if self._telemetry is None or self._telemetry.device != device or self._telemetry.shape != shape:
            self._telemetry = torch.zeros(shape, dtype=torch.float64, device=device)
        else:
            self._telemetry.zero_()
        return self._telemetry

    def _amp_tensor(self, name: str, device: torch.device) -> torch.Tensor | None:
        value = getattr(self, name, None)  # set by torch.amp.GradScaler.step
        if value is None:
            return None
        return value.to(device=device, dtype=torch.float32, non_blocking=True)

    def _build_cache(self, group_index: int, group: dict, params: list[torch.Tensor]) -> _GroupCache:
        """States made or repaired, params sorted into (dtype, alignment) buckets, tables built."""
        state_keys = self._state_keys(group)
        by_bucket: dict[tuple[torch.dtype, bool, bool], list[int]] = {}
        rows, keys, states = [], [], []
        for index, p in enumerate(params):
            self._ensure_state(p, group)
            state = self.state[p]
            step = self._step_counter(p)
            local = _local(p)
            quantized = self._quantized(p)
            row = optim_kernels.table_row(
                param=local.data_ptr(), grad=_local(p.grad).data_ptr(),
                states=[_local(state[k]).data_ptr() if k is not None else 0 for k in state_keys],
                step=step.data_ptr(), numel=local.numel(),
                master=_local(state[MASTER_KEY]).data_ptr() if self._uses_master(p) else 0,
                absmax=[_local(state[k + ABSMAX_SUFFIX]).data_ptr() if k is not None and quantized else 0
                        for k in state_keys])
            aligned = optim_kernels.row_is_aligned(row)
            rows.append(row)
            by_bucket.setdefault((p.dtype, aligned, quantized), []).append(index)
            kernel_keys = self._kernel_keys(p, group)
            keys.append(kernel_keys)
            states += [state[k] for k in kernel_keys]
        counters = self._own_counters(params)

        device = _local(params[0]).device
        old = self._group_caches.get(group_index)
        old_plans = {} if old is None else {(b.dtype, b.aligned, b.precision.state_dtype): b.plan
                                            for b in old.buckets}
        buckets = []
        for (dtype, aligned, quantized), indices in by_bucket.items():
            numels = [_local(params[i]).numel() for i in indices]
            state_dtype = torch.uint8 if quantized else self._float_state_dtype()
            plan = old_plans.get((dtype, aligned, state_dtype))
            if plan is None or plan.numels != numels or plan.device != device:
                plan = MultiTensorPlan(numels, device, optim_kernels.TABLE,
                                       optim_kernels.QUANTIZED_MAX_BLOCK if quantized else None)
            precision = Precision(state_dtype=state_dtype, master=self._uses_master(params[indices[0]]),
                                  stochastic=self.stochastic_rounding and dtype == torch.bfloat16,
                                  seed=self._rounding_seed)
            plan.set_rows([rows[i] for i in indices])
            buckets.append(_Bucket(plan, dtype, aligned, precision, indices))
        buckets[0].whole = len(buckets) == 1
        return _GroupCache(self._signature(group), params, [p.grad for p in params], keys, states, counters,
                           buckets)

    def _torch_step(self, groups: list[dict], telemetry: torch.Tensor | None, clip: torch.Tensor | None) -> None:
        """torch.optim's own step, for groups the kernels cannot step: CPU params without the
        interpreter, or params in a dtype the kernels do not take (float64, complex).

        As in the kernels, the user's grads are never written: AMP's unscaling and the clip
        coefficient (``clip[1]``, from the norm over every group's grads; torch's own norm over
        these groups' grads when no group runs the kernels) go into copies that torch's step
        reads in their place."""
        torch_cls = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.optim"))
        fn = torch_cls.step
        if getattr(fn, "hooked", False):  # torch's profiling/hook wrapper: our own step already ran the hooks
            fn = fn.__wrapped__
        amp = {name: self.__dict__[name] for name in ("grad_scale", "found_inf") if name in self.__dict__}
        grad_scale, found_inf = amp.get("grad_scale"), amp.get("found_inf")
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        for p in params:  # torch's step reads float states: 8-bit ones are dequantized for it
            state = self.state.get(p, {})
            for key in [k for k in state if k + ABSMAX_SUFFIX in state]:
                state[key] = self._float_state(p, key)
                del state[key + ABSMAX_SUFFIX]
        rows = [next(i for i, pg in enumerate(self.param_groups) if pg is g) for g in groups]
        field = TELEMETRY_FIELDS.index
        if telemetry is not None:  # non-finite grads are counted even when the step is then skipped
            self._count_nonfinite(telemetry, groups)
        grads = [p.grad for p in params]
        factor = None if grad_scale is None else 1.0 / grad_scale.double()  # what torch's step gets: g * factor
        if self.max_grad_norm is not None:
            if clip is None:  # only torch's groups have grads: torch's norm over them
                unscaled = grads if factor is None else [g * factor.to(g.device) for g in grads]
                norm = torch.nn.utils.get_total_norm(unscaled, 2.0)
                coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
                self._clip_out = clip = torch.stack([norm.float(), coef.float()])
            coef = clip[1].double()
            factor = coef if factor is None else factor.to(coef.device) * coef
        if found_inf is not None and found_inf.item():  # GradScaler found inf/NaN: skip, like fused torch
            return
        if self.max_grad_norm is not None and self.skip_nonfinite and not torch.isfinite(clip[0]):
            return
        before = [[p.detach().clone() for p in g["params"] if p.grad is not None] for g in groups] \
            if telemetry is not None else None
        saved_groups = self.param_groups
        saved_capturable = [g.get("capturable") for g in groups]
        try:
            if factor is not None:  # torch's step reads scaled copies; the user's grads stay as they are
                for p, g in zip(params, grads):
                    p.grad = g * factor.to(g.device).to(g.real.dtype)
            self.param_groups = groups
            for g in groups:
                if "capturable" in g:
                    g["capturable"] = False  # torch's capturable path rejects CPU tensors
            for name in amp:
                del self.__dict__[name]  # torch's own step must not apply them again
            fn(self)
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            self.param_groups = saved_groups
            for g, c in zip(groups, saved_capturable):
                if c is not None:
                    g["capturable"] = c
            self.__dict__.update(amp)  # GradScaler deletes them after the step
        if before is not None:  # torch's step: its updates are not seen in fp32, so none counts as lost
            for row, g, olds in zip(rows, groups, before):
                news = [p.detach() for p in g["params"] if p.grad is not None]
                sums = {"param_sq": sum(b.double().abs().square().sum() for b in olds),
                        "update_sq": sum((p - b).double().abs().square().sum() for p, b in zip(news, olds)),
                        "changed": sum((p != b).sum().double() for p, b in zip(news, olds))}
                for name, value in sums.items():
                    telemetry[row, field(name)] += value.to(telemetry.device)

    def _makes_state(self, work: list) -> bool:
        """Whether stepping ``work`` would make a state entry torch's step makes (a param's first
        step, or momentum switched on): torch leaves none behind when GradScaler skips the step."""
        for _, group, params, cache in work:
            if cache is not None:
                continue  # confirmed: every entry exists
            keys = self._entry_keys(group)
            for p in params:
                state = self.state.get(p)
                if not state or any(state.get(k) is None for k in keys):
                    return True
        return False

    def _count_nonfinite(self, telemetry: torch.Tensor, groups: list[dict]) -> None:
        """Add each group's inf and NaN grad elements to its telemetry row, with torch ops."""
        column = TELEMETRY_FIELDS.index("nonfinite_grads")
        for g in groups:
            row = next(i for i, pg in enumerate(self.param_groups) if pg is g)
            telemetry[row, column] += sum((~torch.isfinite(p.grad)).sum().double().to(telemetry.device)
                                          for p in g["params"] if p.grad is not None)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, after checking every state against its param; states keep
        their saved dtype (torch casts them to the param's)."""
        check_state_dict(self, state_dict)
        saved_state = state_dict["state"]
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)  # ends in __setstate__, which drops the caches
        self.__dict__.pop("_own_steps", None)  # counters of the old state: remade from the loaded one
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            for key, value in saved_state[saved_id].items():
                if key != "step" and torch.is_tensor(value) and value.dtype != p.dtype:
                    self.state[p][key] = value.to(device=_local(p).device)


def _constructor(spec: OptimizerSpec) -> Callable:
    """The ``__init__`` of the optimizer of ``spec``: torch's twin's arguments, in its order and with
    its defaults and validation, then mechgpu's keyword-only ``options.Options``."""
    torch_init = spec.torch_class.__init__
    torch_signature = inspect.signature(torch_init)
    ours = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(_options.DEFAULTS, name))
            for name in _options.NAMES]

    def __init__(self, params, *args, **kwargs) -> None:
        options = _options.Options(**{name: kwargs.pop(name) for name in _options.NAMES if name in kwargs})
        bound = torch_signature.bind(self, params, *args, **kwargs)  # TypeError for an unknown argument
        if bound.arguments.get("differentiable"):
            raise NotImplementedError(
                f"mechgpu.optim.{spec.name} does not support differentiable=True (differentiating through the "
                f"optimizer step); use torch.optim.{spec.name}(..., differentiable=True) for that")
        torch_init(*bound.args, **bound.kwargs)
        self._init_mechgpu(options)

    __init__.__signature__ = torch_signature.replace(parameters=[*torch_signature.parameters.values(), *ours])
    __init__.__qualname__ = f"{spec.name}.__init__"
    return __init__
