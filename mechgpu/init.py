"""Weight initialisation with fused Triton fills: torch.nn.init's functions, plus ``init_model``.

``uniform_``, ``normal_``, ``trunc_normal_``, ``xavier_uniform_``, ``xavier_normal_``,
``kaiming_uniform_``, ``kaiming_normal_`` and ``calculate_gain`` take exactly the parameters
of their ``torch.nn.init`` twins, compute the same fans, gains and bounds, and raise
torch's errors (fewer than 2 dimensions, unknown mode, unknown nonlinearity, bad ranges).
How they differ from torch:

* the values come from a Triton kernel (``kernels/init.py``): counter-based Philox, math in
  fp32, stored in the tensor's dtype (fp32, bf16 or fp16). They are not the numbers torch
  would draw, but they have the same distribution;
* the kernel's seed is drawn from ``generator``, or from torch's default CPU generator when
  it is None, so ``torch.manual_seed`` makes a run repeatable and each call advances the
  generator. A CUDA ``generator`` costs one host synchronisation per call;
* ``trunc_normal_`` inverts the normal CDF (torch 2.13 rejects and redraws); the
  distribution is the same, in fp32 for every dtype;
* ``calculate_gain`` also knows ``'gelu'`` and ``'silu'`` (and so do the kaiming functions);
* tensors the kernels cannot fill run torch's own implementation: float64 and other
  dtypes, tensor subclasses (DTensor, ...), meta tensors, and CPU tensors unless
  ``TRITON_INTERPRET=1`` was set before triton was imported (with a one-time warning).

``init_model(model)`` initialises every Linear and Conv weight (transformers' Conv1D too) for
the activation that follows it, every Embedding for unit-norm rows, tied weights once, and
zeroes the biases, in one launch per (device, dtype); it returns a table of its choices and
lists what it did not understand and left alone.
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.init import _calculate_correct_fan, _calculate_fan_in_and_fan_out

from ._backend import is_dense, kernels_run_on, warn_fallback_once
from ._text import text_table
from .kernels import init as init_kernels
from .nn import _is_activation, twin

__all__ = [
    "calculate_gain", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
    "kaiming_uniform_", "kaiming_normal_", "init_model", "InitTable", "LayerInit",
    "GELU_GAIN", "SILU_GAIN",
]

#: Gains that preserve the second moment through a layer followed by GELU (exact, erf
#: form) or SiLU: ``gain = 1 / sqrt(E[f(z)^2])`` for ``z ~ N(0, 1)``.
#:
#: Why: a layer ``y = W f(x)`` with ``fan_in`` inputs and weights of variance ``s^2``
#: gives ``E[y_i^2] = fan_in s^2 E[f(x)^2]``. With ``s = gain / sqrt(fan_in)`` (He's rule)
#: and inputs ``x ~ N(0, 1)``, ``E[y^2] = 1`` exactly when ``gain^2 E[f(z)^2] = 1``, so
#: unit-variance pre-activations stay unit-variance layer after layer. For ReLU this
#: gives torch's ``sqrt(2)`` (``E[relu(z)^2] = 1/2``) and for ``f(z) = z`` gives 1. GELU and
#: SiLU are not positively homogeneous, so their gain depends on the variance it is
#: computed at; we take the unit-variance fixed point.
#:
#: ``E[gelu(z)^2] = E[z^2 Phi(z)^2] = 0.425221482570299`` and
#: ``E[silu(z)^2] = E[z^2 sigmoid(z)^2] = 0.355775519817352`` (numerical integration
#: against the normal density, to 1e-15; ``tests/test_init.py`` recomputes both).
GELU_GAIN = 1.5335304411955352
SILU_GAIN = 1.6765324703310912

# ----------------------------------------------------------------------------------
# the kernel path and its fallback
# ----------------------------------------------------------------------------------
def _use_kernels(tensor: Tensor, caller: str) -> bool:
    """True when a Triton kernel can fill ``tensor``; otherwise torch's implementation runs."""
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        return False  # subclasses (DTensor, ...) sample through their own uniform_/normal_
    if tensor.is_meta or tensor.dtype not in init_kernels.SUPPORTED_DTYPES:
        return False
    if kernels_run_on(tensor.device):
        return True
    warn_fallback_once(
        "init",
        f"mechgpu.init.{caller}: the tensor is on {tensor.device.type} and the Triton kernels "
        f"cannot run there (on a CPU they need TRITON_INTERPRET=1 set before triton is imported), "
        f"so torch.nn.init's own sampling runs instead.",
        stacklevel=4,
    )
    return False


def _draw_seed(generator: torch.Generator | None) -> int:
    """A Philox key from torch's generator; always >= 2^31 so the kernel sees an int64."""
    gen = generator if generator is not None else torch.default_generator
    return int(torch.randint(2**31, 2**63 - 1, (), generator=gen, device=gen.device))


def _dense_view(tensor: Tensor) -> Tensor | None:
    """A contiguous view of the same memory when ``tensor`` is dense in some order, else None."""
    if not is_dense(tensor) or any(s < 0 for s in tensor.stride()):
        return None
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
    view = tensor.permute(order)
    return view if view.is_contiguous() else None


def _fill(tensor: Tensor, fill: init_kernels.Fill, generator: torch.Generator | None) -> Tensor:
    """Run the fill kernel on ``tensor`` in place, through a temporary if it is not dense."""
    if tensor.numel() == 0:
        return tensor
    seed = _draw_seed(generator)
    with torch.no_grad():
        view = _dense_view(tensor)
        if view is not None:
            init_kernels.fill_(view, fill, seed)
            torch.autograd.graph.increment_version(tensor)  # what an in-place torch op would do
        else:
            tmp = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
            init_kernels.fill_(tmp, fill, seed)
            tensor.copy_(tmp)
    return tensor


def _draw(tensor: Tensor, method: str, args: tuple, fill, generator, caller: str) -> Tensor:
    """``tensor.<method>(*args)``: torch's own where the kernels do not run, else ``fill`` after
    torch's checks and messages."""
    if not _use_kernels(tensor, caller):
        with torch.no_grad():
            return getattr(tensor, method)(*args, generator=generator)
    getattr(torch.empty(0, dtype=tensor.dtype), method)(*args)  # torch's own checks and messages
    return _fill(tensor, fill, generator)


def _uniform(tensor: Tensor, a: float, b: float, generator, caller: str) -> Tensor:
    return _draw(tensor, "uniform_", (a, b), init_kernels.Fill.uniform(a, b), generator, caller)


def _normal(tensor: Tensor, mean: float, std: float, generator, caller: str) -> Tensor:
    return _draw(tensor, "normal_", (mean, std), init_kernels.Fill.normal(mean, std), generator, caller)


# ----------------------------------------------------------------------------------
# torch.nn.init's functions
# ----------------------------------------------------------------------------------
def calculate_gain(nonlinearity: str, param: int | float | None = None) -> float:
    """torch.nn.init.calculate_gain, plus ``'gelu'`` (1.5335) and ``'silu'`` (1.6765).

    The two extra gains preserve the second moment of unit-variance pre-activations;
    see ``GELU_GAIN`` for the derivation. Every other name, value and error is torch's.
    """
    if nonlinearity == "gelu":
        return GELU_GAIN
    if nonlinearity == "silu":
        return SILU_GAIN
    return torch.nn.init.calculate_gain(nonlinearity, param)


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:
    """torch.nn.init.uniform_: values from U[a, b) (see the module docstring for the differences)."""
    return _uniform(tensor, a, b, generator, "uniform_")


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0,
            generator: torch.Generator | None = None) -> Tensor:
    """torch.nn.init.normal_: values from N(mean, std^2) (see the module docstring)."""
    return _normal(tensor, mean, std, generator, "normal_")


def trunc_normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """torch.nn.init.trunc_normal_: N(mean, std^2) restricted to [a, b] (absolute bounds).

    Sampled by inverting the normal CDF from both ends of the interval (``kernels/init.py``),
    exact for any [a, b] within about 13 std of the mean, then clamped to [a, b] as torch
    does. torch's warning (mean more than 2 std from [a, b]) and errors (std == 0, a > b)
    are kept.
    """
    if not _use_kernels(tensor, "trunc_normal_"):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator)
    if (mean < a - 2 * std) or (mean > b + 2 * std):
        warnings.warn(
            "mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
            "The distribution of values may be incorrect.",
            stacklevel=2,
        )
    _ = (b - mean) / std  # ZeroDivisionError for std == 0, as torch raises
    if a > b:
        torch.empty(0).uniform_(a, b)  # torch's error for an empty interval
    return _fill(tensor, init_kernels.Fill.trunc_normal(mean, std, a, b), generator)


def xavier_uniform_(tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """torch.nn.init.xavier_uniform_: U(-a, a), a = gain sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    a = math.sqrt(3.0) * std
    return _uniform(tensor, -a, a, generator, "xavier_uniform_")


def xavier_normal_(tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """torch.nn.init.xavier_normal_: N(0, std^2), std = gain sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return _normal(tensor, 0.0, std, generator, "xavier_normal_")


def _kaiming_std(tensor: Tensor, a: float, mode: str, nonlinearity: str) -> float:
    fan = _calculate_correct_fan(tensor, mode)
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform_(tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                     generator: torch.Generator | None = None) -> Tensor:
    """torch.nn.init.kaiming_uniform_: U(-b, b), b = gain sqrt(3 / fan_mode); 'gelu'/'silu' allowed."""
    if 0 in tensor.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=2)
        return tensor
    bound = math.sqrt(3.0) * _kaiming_std(tensor, a, mode, nonlinearity)
    return _uniform(tensor, -bound, bound, generator, "kaiming_uniform_")


def kaiming_normal_(tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    generator: torch.Generator | None = None) -> Tensor:
    """torch.nn.init.kaiming_normal_: N(0, std^2), std = gain / sqrt(fan_mode); 'gelu'/'silu' allowed."""
    if 0 in tensor.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=2)
        return tensor
    std = _kaiming_std(tensor, a, mode, nonlinearity)
    return _normal(tensor, 0.0, std, generator, "kaiming_normal_")


# ----------------------------------------------------------------------------------
# init_model: which activation follows each weight layer
# ----------------------------------------------------------------------------------
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                 nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Activation modules by class name, so torch.nn's and mechgpu.nn's (or anyone's) match alike:
# name -> (calculate_gain's nonlinearity, a function of the module giving its param).
ACTIVATION_MODULES: dict[str, tuple[str, Callable[[nn.Module], float | None]]] = {
    "Tanh": ("tanh", lambda m: None),
    "Sigmoid": ("sigmoid", lambda m: None),
    "ReLU": ("relu", lambda m: None),
    "ReLU6": ("relu", lambda m: None),
    "LeakyReLU": ("leaky_relu", lambda m: float(getattr(m, "negative_slope", 0.01))),
    "PReLU": ("leaky_relu", lambda m: float(m.weight.detach().float().mean())),
    "RReLU": ("leaky_relu", lambda m: (m.lower + m.upper) / 2),
    "GELU": ("gelu", lambda m: None),
    "SiLU": ("silu", lambda m: None),
    "SELU": ("selu", lambda m: None),
}
# Functions and tensor methods, as torch.fx records them.
_ACTIVATION_FUNCTIONS: dict[object, str] = {
    torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.relu: "relu", torch.selu: "selu",
    nn.functional.tanh: "tanh", nn.functional.sigmoid: "sigmoid", nn.functional.relu: "relu",
    nn.functional.relu6: "relu", nn.functional.leaky_relu: "leaky_relu", nn.functional.gelu: "gelu",
    nn.functional.silu: "silu", nn.functional.selu: "selu",
}
_ACTIVATION_METHODS = {"tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "relu": "relu", "relu_": "relu"}
# Modules and ops between a weight layer and its activation that do not change which
# activation follows: shape changes, dropout and normalisation.
_PASS_THROUGH_MODULES = {"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                         "Flatten", "Unflatten", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                         "GroupNorm", "LayerNorm", "RMSNorm", "InstanceNorm1d", "InstanceNorm2d",
                         "InstanceNorm3d"}
_PASS_THROUGH_FUNCTIONS = {torch.flatten, torch.reshape, nn.functional.dropout, operator.getitem}
_PASS_THROUGH_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                         "unsqueeze", "float", "to"}


# What follows a weight layer: (calculate_gain's nonlinearity, its param), or a sentence
# saying why init_model leaves the layer alone.
_Follows = tuple[str, float | None] | str


def _transposed_layers() -> tuple[type, ...]:
    """Weight layers that store their weight [in, out]: transformers' Conv1D (GPT-2), if imported."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (cls,) if isinstance(cls, type) else ()


def _activation_of_module(module: nn.Module) -> tuple[str, float | None] | None:
    """By class name (torch.nn's, mechgpu.nn's, anyone's), else through the mechgpu twin that
    ``swap_activations`` would put in its place (transformers' and timm's classes)."""
    entry = ACTIVATION_MODULES.get(type(module).__name__)
    if entry is None:
        module = twin(module)
        if module is None:
            return None
        entry = ACTIVATION_MODULES[type(module).__name__]
    name, param = entry
    return name, param(module)


def _follows_module(module: nn.Module) -> _Follows | None:
    """What a layer feeding ``module`` is followed by: its activation, a sentence for an
    activation without a known gain, or None when ``module`` is not an activation."""
    act = _activation_of_module(module)
    if act is None and _is_activation(type(module)):
        return f"followed by {type(module).__name__}, an activation with no known gain"
    return act


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every activation module (mechgpu.nn's, transformers', ...) a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _follows_module(m) is not None or super().is_leaf_module(m, qualname)


def _traced_activations(model: nn.Module) -> dict[str, _Follows] | None:
    """Weight layer name -> activation that consumes its output, from a torch.fx trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # control flow on values, unsupported ops, ...: use module order instead
        return None
    modules = dict(model.named_modules())
    found: dict[str, _Follows] = {}
    layers = WEIGHT_LAYERS + _transposed_layers()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), layers):
            found[node.target] = _follow(node, modules)
    return found


def _follow(node, modules: dict[str, nn.Module]) -> _Follows:
    """The activation applied to ``node``'s output, looking through pass-through ops."""
    while len(node.users) == 1:
        (node,) = node.users
        if node.op == "call_module":
            module = modules[node.target]
            act = _follows_module(module)
            if act is not None:
                return act
            if type(module).__name__ not in _PASS_THROUGH_MODULES:
                break
        elif node.op == "call_function":
            if node.target in _ACTIVATION_FUNCTIONS:
                name = _ACTIVATION_FUNCTIONS[node.target]
                if name == "leaky_relu":
                    slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
                    return name, float(slope)
                return name, None
            if node.target not in _PASS_THROUGH_FUNCTIONS:
                break
        elif node.op == "call_method":
            if node.target in _ACTIVATION_METHODS:
                return _ACTIVATION_METHODS[node.target], None
            if node.target not in _PASS_THROUGH_METHODS:
                break
        else:
            break
    return "linear", None


# Hugging Face MLP blocks, by the names of their children. Gated, (gate, up, down, act):
# down(act(gate(x)) * up(x)). Plain, (in, out, act): out(act(in(x))). Registration order
# misleads in all of them (the activation is registered after the output layer).
_GATED_MLPS = (("gate_proj", "up_proj", "down_proj", "act_fn"),  # Llama, Mistral, Qwen2, Gemma
               ("wi_0", "wi_1", "wo", "act"))  # T5's gated-gelu/gated-silu DenseReluDense
_PLAIN_MLPS = (("c_fc", "c_proj", "act"),  # GPT-2 (Conv1D layers)
               ("wi", "wo", "act"))  # T5's relu DenseReluDense


def _known_block(block: nn.Module, layers: tuple[type, ...]) -> dict[str, _Follows] | None:
    """Child name -> what follows it, for a known MLP block; None for any other module."""
    children = dict(block.named_children())
    for names in _GATED_MLPS + _PLAIN_MLPS:
        *inner, act_name = names
        if all(isinstance(children.get(n), layers) for n in inner) and act_name in children:
            act = _follows_module(children[act_name])
            if act is None:
                continue
            return {inner[0]: act, **{n: ("linear", None) for n in inner[1:]}}
    return None


def _ordered_activations(model: nn.Module) -> dict[str, _Follows]:
    """Weight layer name -> what follows it, from the module structure alone.

    In a known MLP block (``_GATED_MLPS``, ``_PLAIN_MLPS``) each layer gets its role. In any
    other module, the children in registration order: a weight layer whose next sibling,
    looking through pass-through ones, is an activation module is followed by it; two or
    more weight layers in a row before one activation are ambiguous and left alone; a layer
    followed by anything else, or by nothing, is followed by nothing (``'linear'``).
    """
    layers = WEIGHT_LAYERS + _transposed_layers()
    found: dict[str, _Follows] = {}
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        known = _known_block(parent, layers)
        if known is not None:
            found.update({prefix + n: f for n, f in known.items()})
            continue
        run: list[str] = []  # weight layers since the last activation or other module
        for child_name, child in parent.named_children():
            act = _follows_module(child)
            if isinstance(child, layers):
                run.append(child_name)
            elif act is not None:
                if len(run) > 1:
                    act = f"one of {', '.join(run)} feeds {child_name} in {type(parent).__name__}: which is unknown"
                found.update({prefix + n: act for n in run})
                run = []
            elif type(child).__name__ not in _PASS_THROUGH_MODULES:
                found.update({prefix + n: ("linear", None) for n in run})
                run = []
        found.update({prefix + n: ("linear", None) for n in run})
    return found


# ----------------------------------------------------------------------------------
# init_model
# ----------------------------------------------------------------------------------
@dataclass
class LayerInit:
    """What ``init_model`` did to one weight layer."""

    name: str
    layer: str  # the module's class name
    shape: tuple[int, ...]
    activation: str  # what follows it: calculate_gain's name, or 'linear' for nothing
    rule: str  # 'xavier' (Glorot & Bengio 2010), 'kaiming' (He et al. 2015), 'lecun' (SELU), 'embedding'
    distribution: str  # 'normal' or 'uniform'
    gain: float
    fan_in: int
    fan_out: int
    std: float  # of the weights: gain / sqrt(fan_in), or gain sqrt(2 / (fan_in + fan_out)) for xavier
    bias: str  # 'zeroed' or 'none' ('padding row zeroed' for an Embedding with a padding_idx)


class InitTable(list):
    """The rows (``LayerInit``) of an ``init_model`` call; ``str()`` gives a text table.

    ``launches`` is the number of fill kernels launched (0 where torch's sampling ran),
    ``found_by`` says how the activations were found ('torch.fx trace' or 'module order'),
    ``untouched`` lists the parameters it did not fill (norms' and the like), ``tied``
    maps each layer sharing an earlier module's weight to that owner (``{'lm_head':
    'transformer.wte'}``), and ``left_alone`` maps each module it did not understand to why.
    """

    def __init__(self, rows=(), *, found_by: str = "", launches: int = 0) -> None:
        super().__init__(rows)
        self.found_by = found_by
        self.launches = launches
        self.untouched: list[str] = []
        self.tied: dict[str, str] = {}
        self.left_alone: dict[str, str] = {}
        self._filler: _ModelFiller | None = None

    @torch.no_grad()
    def reinit(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh values for the same tensors with the same rules: no model analysis and
        no table building, one launch per (device, dtype) as before."""
        if self._filler is not None:
            self._filler.fill(generator)

    def __str__(self) -> str:
        header = ("layer", "type", "shape", "followed by", "rule", "dist", "gain", "fan_in", "fan_out",
                  "std", "bias")
        rows = [(r.name, r.layer, "x".join(map(str, r.shape)), r.activation, r.rule, r.distribution,
                 f"{r.gain:.4f}", str(r.fan_in), str(r.fan_out), f"{r.std:.4g}", r.bias) for r in self]
        footer = (f"{len(self)} weight layers, activations found by {self.found_by}; "
                  f"{self.launches} kernel launch{'es' if self.launches != 1 else ''}; "
                  f"{len(self.untouched)} other parameter tensors left as they were")
        lines = [f"tied: {name} shares {owner}'s weight, initialised once by {owner}"
                 for name, owner in self.tied.items()]
        lines += [f"left alone: {name}: {why}" for name, why in self.left_alone.items()]
        return "\n".join([text_table(header, rows), footer, *lines])


class _ModelFiller:
    """Fills a fixed list of (tensor, Fill): the dense tensors through one cached FillPlan,
    the others one by one (through a temporary) or by torch where no kernel can run."""

    def __init__(self, targets: list[tuple[Tensor, init_kernels.Fill]],
                 zero_rows: list[tuple[Tensor, int]]) -> None:
        self.targets = targets
        self.zero_rows = zero_rows  # (Embedding weight, padding_idx), zeroed after the fill
        self._build()

    def _build(self) -> None:
        self.ptrs = [t.data_ptr() if not t.is_meta else 0 for t, _ in self.targets]
        dense, self.scattered, self.on_torch = [], [], []
        for t, f in self.targets:
            if not _use_kernels(t, "init_model"):
                self.on_torch.append((t, f))
            elif (view := _dense_view(t)) is not None:
                dense.append((view, t, f))
            else:
                self.scattered.append((t, f))
        self.dense = [t for _, t, _ in dense]
        self.plan = init_kernels.FillPlan([v for v, _, _ in dense], [f for _, _, f in dense]) if dense else None

    def fill(self, generator: torch.Generator | None) -> int:
        """Fill every tensor; returns the number of kernel launches."""
        if [t.data_ptr() if not t.is_meta else 0 for t, _ in self.targets] != self.ptrs:
            self._build()  # parameters were re-allocated (moved, cast, reassigned)
        launches = 0
        if self.plan is not None:
            self.plan.launch(_draw_seed(generator))
            launches += self.plan.launches
            for t in self.dense:
                torch.autograd.graph.increment_version(t)
        for t, f in self.scattered:  # not dense in memory: through a temporary, one launch each
            _fill(t, f, generator)
            launches += 1
        for t, f in self.on_torch:
            if f.kind == init_kernels.KIND_CONSTANT:
                t.fill_(f.loc)
            elif f.kind == init_kernels.KIND_UNIFORM:
                t.uniform_(f.lo, f.hi, generator=generator)
            else:
                t.normal_(f.loc, f.scale, generator=generator)
        for t, row in self.zero_rows:
            t[row].zero_()
        return launches


SCHEMES = ("auto", "xavier", "kaiming")


def _choose(scheme: str, activation: str, param: float | None) -> tuple[str, float]:
    """(rule, gain) for a layer followed by ``activation``; see init_model."""
    if scheme == "xavier":
        return "xavier", 1.0
    if activation == "selu":
        return "lecun", 1.0
    if scheme == "kaiming" or activation in ("relu", "leaky_relu", "gelu", "silu"):
        return "kaiming", float(calculate_gain(activation, param))
    return "xavier", float(calculate_gain(activation, param))


def _fill_for(std: float, distribution: str) -> init_kernels.Fill:
    if distribution == "normal":
        return init_kernels.Fill.normal(0.0, std)
    bound = math.sqrt(3.0) * std
    return init_kernels.Fill.uniform(-bound, bound)


@torch.no_grad()
def init_model(model: nn.Module, scheme: str = "auto", *, distribution: str = "normal",
               generator: torch.Generator | None = None) -> InitTable:
    """Initialise every Linear/Conv weight for the activation that follows it and every
    Embedding for unit-norm rows; zero the biases.

    ``scheme="auto"`` (the rules of Glorot & Bengio 2010 and He et al. 2015):

    ==========================================  =========  ======================================
    followed by                                 rule       weights
    ==========================================  =========  ======================================
    nothing, tanh, sigmoid                      xavier     std = gain sqrt(2 / (fan_in + fan_out))
    ReLU, ReLU6, LeakyReLU, PReLU, RReLU,       kaiming    std = gain / sqrt(fan_in)
    GELU, SiLU
    SELU                                        lecun      std = 1 / sqrt(fan_in)
    (an Embedding, any scheme)                  embedding  std = 1 / sqrt(embedding_dim)
    ==========================================  =========  ======================================

    with ``gain = calculate_gain(activation)``: 1 for nothing and sigmoid, 5/3 for tanh,
    sqrt(2 / (1 + slope^2)) for the ReLU family, 1.5335 for GELU, 1.6765 for SiLU.
    ``scheme="xavier"`` uses Glorot's rule with gain 1 for every layer (the original
    recipe, which lets ReLU signals vanish); ``scheme="kaiming"`` He's rule with the
    activation's gain for every layer. ``distribution`` is ``"normal"`` or ``"uniform"``
    (bound sqrt(3) std). An Embedding's rows get unit expected norm, so a tied output
    head (logits = h W^T, unit-variance h) gives unit-variance logits; its padding row
    stays zero.

    Weight layers are torch's Linear and Conv*d and transformers' ``Conv1D`` (GPT-2's,
    weight [in, out]: fan_in is its first dimension). The activation that follows a layer
    is found in a torch.fx trace (modules, functions and tensor methods, looking through
    dropout, normalisation and reshapes), or, where the model cannot be traced (most
    Hugging Face models), from the module structure: known MLP blocks by their children's
    names (Llama's gate/up/down: gate -> the activation's gain, up and down -> nothing;
    GPT-2's c_fc/c_proj; T5's wi/wo and wi_0/wi_1/wo), else each module's children in
    registration order. Activation modules are matched by class name (``mechgpu.nn``'s
    like ``torch.nn``'s) or through ``swap_activations``' table (transformers' GELUs and
    SiLU). A weight shared by several modules (tied embeddings) is initialised once, by
    its first owner in module order, and stays shared.

    Never guessed, left as they are and listed in ``left_alone``: a layer followed by an
    activation without a known gain (QuickGELU, Mish, ...), layers whose order does not say
    which feeds an activation, and modules with parameters of other kinds (normalisation
    layers aside, which are listed only in ``untouched``). Weights and biases are filled by
    one kernel launch per (device, dtype). Returns an ``InitTable`` with one row per layer;
    its ``reinit()`` draws fresh values again without re-analysing the model.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} not supported, please use one of {list(SCHEMES)}")
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"distribution {distribution!r} not supported, please use 'normal' or 'uniform'")
    activations = _traced_activations(model)
    table = InitTable(found_by="torch.fx trace")
    if activations is None:
        activations = _ordered_activations(model)
        table.found_by = "module order"

    transposed = _transposed_layers()
    targets: list[tuple[Tensor, init_kernels.Fill]] = []
    zero_rows: list[tuple[Tensor, int]] = []
    owners: dict[int, str] = {}  # id(weight) -> the first module holding it
    done: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Embedding, *WEIGHT_LAYERS, *transposed)):
            continue
        weight, bias = module.weight, getattr(module, "bias", None)
        if id(weight) in owners:
            table.tied[name] = owners[id(weight)]
        else:
            owners[id(weight)] = name
            follows = ("linear", None) if isinstance(module, nn.Embedding) else activations.get(name, ("linear", None))
            if isinstance(follows, str):
                table.left_alone[name] = follows
                continue
            activation, param = follows
            fan_in, fan_out = _calculate_fan_in_and_fan_out(weight)
            if isinstance(module, transposed):
                fan_in, fan_out = fan_out, fan_in
            if isinstance(module, nn.Embedding):
                rule, gain, std = "embedding", 1.0, 1.0 / math.sqrt(fan_in)
            else:
                rule, gain = _choose(scheme, activation, param)
                std = gain / math.sqrt(fan_in if rule in ("kaiming", "lecun") else (fan_in + fan_out) / 2)
            targets.append((weight, _fill_for(std, distribution)))
            done.add(id(weight))
            padding_idx = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
            if padding_idx is not None:
                zero_rows.append((weight, padding_idx))
            bias_text = "padding row zeroed" if padding_idx is not None else "zeroed" if bias is not None else "none"
            table.append(LayerInit(name, type(module).__name__, tuple(weight.shape), activation, rule,
                                   distribution, gain, fan_in, fan_out, std, bias_text))
        if bias is not None and id(bias) not in done:
            targets.append((bias, init_kernels.Fill.constant(0.0)))
            done.add(id(bias))
    table.untouched = [n for n, p in model.named_parameters() if id(p) not in done]
    weight_holders = set(owners.values()) | set(table.tied)
    for name, module in model.named_modules():
        if (name not in weight_holders and "Norm" not in type(module).__name__
                and _follows_module(module) is None
                and any(id(p) not in done for p in module.parameters(recurse=False))):
            table.left_alone[name] = f"{type(module).__name__}: parameters init_model has no rule for"

    table._filler = _ModelFiller(targets, zero_rows)
    table.launches = table._filler.fill(generator)
    return table
