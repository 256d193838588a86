"""The optimizer rules, declared once: one record per torch optimizer that mechgpu steps.

A record (``OptimizerSpec``) says everything the rest of mechgpu derives from: the torch
twin, the state entries in table-column order with the option that makes each exist, the
group entries passed to the kernel and under which argument names, the kernel's feature
flags and how a param group sets them. ``mechgpu.optim`` builds its classes, validation and
messages from it; ``optim.py`` its launch and AOT variants; ``mechgpu.traffic`` its bytes per
element; the check cases their option variants. The update formula itself lives in the kernel
(``optim.py``), one ``*_update`` function per rule, reading the state columns in this order.

How to extend it:

* a rule (a torch optimizer): a record here (``SPECS``); in ``optim.py`` its ``*_update``
  formula and its ``RULE`` branch in ``_rule_block`` (plus, if it needs a per-tensor scalar, its
  branch in ``step_prologue_kernel``); one ``OptimInfo`` in ``mechgpu/testing/optim_cases.py``
  (every conformance, safety, byte and telemetry test reads that table); its row in
  ``mechgpu.traffic.TABLE`` for the README;
* a feature flag of a rule (an option torch's twin accepts that changes the code): a ``Flag`` in
  the record (and a ``State`` if it makes a state entry); in ``optim.py`` its bit constant beside
  ``_MAXIMIZE`` and ``if _NAME & FLAGS:`` in the rule's formula (the launch packs every flag into
  the one FLAGS constexpr); a variant in the rule's ``OptimInfo`` (variants are passed to
  torch's constructor too). mechgpu's constructors take torch's arguments only, so a flag torch
  lacks could be set only as a param-group entry, checked by a test of its own, and torch's
  fallback step would ignore it;
* a hyperparameter (a runtime number): group entry -> kernel argument in the record's ``hypers``;
  in ``optim.py`` the argument of ``kernel_arguments`` and of ``optimizer_kernel``, the
  ``hypers`` tuple the kernel passes to ``_rule_block``, and its use in the formula;
* one of mechgpu's own options (``max_grad_norm``, ``telemetry``, ...): a field of
  ``mechgpu.optim.options.Options``, its line in that docstring and its check in
  ``Options.check``, and its name in ``mechgpu/optim/__init__.py``'s docstring and the README;
  constructors (``inspect.signature`` included), pickling, deepcopy, the per-step check and the
  cache signature follow. What acts on it is new code on both paths of ``FusedOptimizer.step``:
  ``_torch_step``'s (CPU without the interpreter, float64 and complex params) and the kernel's:
  a ``StepControl`` field set in ``FusedOptimizer._step`` (or a ``Precision`` field, set in
  ``_build_cache``), turned into kernel arguments in ``kernel_arguments``, added to
  ``optimizer_kernel``'s signature, to both of its ``_rule_block`` calls and to ``_rule_block``'s
  signature, with the new code after the rule's branch there; and a case in
  ``mechgpu/testing/optim_cases.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

#: The kernel's RULE constexpr: which update formula a launch runs
ADAM, RMSPROP, SGD, ADAGRAD = range(4)
#: State columns per table row: the most any rule keeps
STATE_COLUMNS = 3


def _truthy(value) -> bool:
    return bool(value)


def _positive(value) -> bool:
    return value is not None and value > 0


@dataclass(frozen=True)
class Flag:
    """A kernel feature flag (a constexpr) and the group option that sets it."""

    name: str  # the kernel's constexpr, e.g. "AMSGRAD"
    option: str  # the param group entry it is read from
    meaning: str  # how a message names it: "amsgrad=True"
    test: Callable[[object], bool] = _truthy  # the entry's value -> the flag

    def of(self, group: dict) -> bool:
        return self.test(group.get(self.option))


@dataclass(frozen=True)
class State:
    """One per-element state entry (torch's key) and the flag that makes it exist (None: always)."""

    key: str
    flag: str | None = None
    fill: str | None = None  # the group entry a new state is filled with (None: zeros)
    #: never negative (a sum of squares): 8-bit states keep its square root, unsigned (``quant8.py``)
    nonnegative: bool = False


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything mechgpu knows about one torch optimizer, bar its update formula."""

    name: str  # torch.optim's class name, and ours
    rule: int  # the kernel's RULE
    states: tuple[State, ...]  # in the table's state-column order
    #: group entry -> kernel argument(s): ``launch``'s keyword, or a tuple of them for a tuple entry
    hypers: dict[str, str | tuple[str, ...]]
    flags: tuple[Flag, ...]
    #: the state entry the step is counted in (None: torch keeps none, the optimizer counts privately)
    step_key: str | None = "step"
    #: torch's step makes a missing state entry (SGD's momentum buffer, from the grad)
    makes_missing_states: bool = False
    #: the group options of the "everything on" variant that the AOT report compiles
    aot_options: dict = field(default_factory=dict)
    #: flags whose math 8-bit states cannot carry (``state_dtype="8bit"`` refuses them), and why
    not_8bit: dict[str, str] = field(default_factory=dict)

    @property
    def torch_class(self) -> type[torch.optim.Optimizer]:
        return getattr(torch.optim, self.name)

    @property
    def sparse_message(self) -> str:
        return f"mechgpu.optim.{self.name} does not support sparse gradients"

    def kernel_flags(self, group: dict) -> dict[str, bool]:
        return {flag.name: flag.of(group) for flag in self.flags}

    def _flag(self, name: str) -> Flag:
        return self._flags_by_name[name]

    @property
    def _flags_by_name(self) -> dict[str, Flag]:
        """``flags`` by name, made once (``state_keys`` runs at every step)."""
        table = self.__dict__.get("_flag_table")
        if table is None:
            table = {f.name: f for f in self.flags}
            object.__setattr__(self, "_flag_table", table)  # a cache of a frozen record's own field
        return table

    def state_keys(self, group: dict) -> tuple[str | None, ...]:
        """Per state column, the state entry the group's options make, or None."""
        return tuple(s.key if s.flag is None or self._flag(s.flag).of(group) else None for s in self.states)

    def takes_8bit(self, group: dict) -> bool:
        """Whether the group's options allow 8-bit states (none of ``not_8bit``'s flags set)."""
        return not any(self._flag(name).of(group) for name in self.not_8bit)

    def needed_by(self, key: str) -> str | None:
        """The option that makes state ``key`` exist, for messages ("amsgrad=True"), or None."""
        state = next((s for s in self.states if s.key == key), None)
        return None if state is None or state.flag is None else self._flag(state.flag).meaning

    def fill_of(self, key: str) -> str | None:
        return next((s.fill for s in self.states if s.key == key), None)

    def states_used(self, group: dict) -> tuple[bool, ...]:
        """Per state column, whether the group's options use it: the kernel's STATE0..2."""
        return tuple(k is not None for k in self.state_keys(group))

    def state_count(self, options: dict) -> int:
        """State buffers a step with these torch options reads and writes (each the state dtype)."""
        return sum(self.states_used(options))


_MAXIMIZE = Flag("MAXIMIZE", "maximize", "maximize=True")
_ADAM = OptimizerSpec(
    "Adam", ADAM,
    states=(State("exp_avg"), State("exp_avg_sq", nonnegative=True),
            State("max_exp_avg_sq", flag="AMSGRAD", nonnegative=True)),
    hypers={"lr": "lr", "betas": ("beta1", "beta2"), "eps": "eps", "weight_decay": "weight_decay"},
    flags=(Flag("AMSGRAD", "amsgrad", "amsgrad=True"), _MAXIMIZE,
           Flag("DECOUPLED_WD", "decoupled_weight_decay", "decoupled_weight_decay=True")),
    aot_options={"amsgrad": True, "decoupled_weight_decay": True},
)
_HAS_MOMENTUM = "HAS_MOMENTUM"
#: Every optimizer mechgpu steps, by torch's class name
SPECS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    _ADAM,
    replace(_ADAM, name="AdamW"),
    OptimizerSpec(
        "RMSprop", RMSPROP,
        states=(State("square_avg", nonnegative=True), State("momentum_buffer", flag=_HAS_MOMENTUM),
                State("grad_avg", flag="CENTERED")),
        hypers={"lr": "lr", "alpha": "beta2", "eps": "eps", "weight_decay": "weight_decay",
                "momentum": "momentum"},
        flags=(Flag("CENTERED", "centered", "centered=True"),
               Flag(_HAS_MOMENTUM, "momentum", "momentum > 0", _positive), _MAXIMIZE),
        aot_options={"centered": True, "momentum": 0.9},
        not_8bit={"CENTERED": "its variance square_avg - grad_avg^2 is a difference of two quantized states, "
                              "which their rounding can make negative (a NaN update); bitsandbytes' RMSprop8bit "
                              "refuses it too"},
    ),
    OptimizerSpec(
        "SGD", SGD,
        states=(State("momentum_buffer", flag=_HAS_MOMENTUM),),
        hypers={"lr": "lr", "momentum": "momentum", "dampening": "dampening", "weight_decay": "weight_decay"},
        flags=(Flag(_HAS_MOMENTUM, "momentum", "momentum != 0"), Flag("NESTEROV", "nesterov", "nesterov=True"),
               _MAXIMIZE),
        step_key=None, makes_missing_states=True,
        aot_options={"momentum": 0.9, "nesterov": True},
    ),
    OptimizerSpec(
        "Adagrad", ADAGRAD,
        states=(State("sum", fill="initial_accumulator_value", nonnegative=True),),
        hypers={"lr": "lr", "lr_decay": "lr_decay", "eps": "eps", "weight_decay": "weight_decay"},
        flags=(_MAXIMIZE,),
        aot_options={"maximize": True},
    ),
)}
#: Every flag some rule sets, each False for the rules that do not
ALL_FLAGS = tuple(dict.fromkeys(f.name for spec in SPECS.values() for f in spec.flags))
#: Each flag's bit in the kernel's one FLAGS constexpr
FLAG_BITS = {name: 1 << i for i, name in enumerate(ALL_FLAGS)}
#: Every per-element state entry a rule keeps (torch's keys)
STATE_KEYS = tuple(dict.fromkeys(s.key for spec in SPECS.values() for s in spec.states))
#: The state entries that are never negative (each key means the same in every rule that keeps it)
NONNEGATIVE_KEYS = frozenset(s.key for spec in SPECS.values() for s in spec.states if s.nonnegative)
