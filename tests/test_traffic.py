"""The byte model (mechgpu.traffic) against the bytes the kernels really load and store.

Under triton's interpreter every load and store of a kernel goes through its builder, so
counting the active lanes of each block access, times the element size, gives the bytes a
kernel moves. Scalar accesses (table rows, step counters, hyperparameters) are per program,
not per element, and are left out; so are the accesses of the per-tensor step prologue and
of a reduction's partials, when the test names the tensors whose bytes it counts (the
params, grads and states). Interpreter only: on a GPU the kernels are compiled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA
from mechgpu.kernels.optim_spec import SPECS

import mechgpu
import mechgpu.init as mi
import mechgpu.nn.functional as MF
import mechgpu.optim as mo
from mechgpu import traffic
from mechgpu.optim.quant8 import ABSMAX_SUFFIX, MIN_8BIT_NUMEL, QUANT_BLOCK
from mechgpu.testing.optim_cases import MUTATED, VARIANTS, first_of_each

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="counts loads and stores in triton's interpreter, which a GPU "
                                                 "host does not use; CI counts them on CPU")

SIZES = (1000, 4097, 3, 32 * 129)  # odd, over one block, tiny, whole mask words
NUMEL = sum(SIZES)
DTYPE_SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class Bytes:
    """Bytes moved by block loads and stores of interpreted kernels, while active."""

    def __init__(self, monkeypatch, within: list[torch.Tensor] | None = None) -> None:
        from triton.runtime.interpreter import InterpreterBuilder

        self.read = self.written = 0
        load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in within or ()]

        def counted_bytes(ptrs, mask) -> int:
            """Distinct addresses of the active lanes (inside ``within``'s tensors, when given) times the
            element size: lanes of one access that read the same address (an 8-bit state's block
            absmax, which every lane of the block loads) are one read of memory."""
            if ptrs.data.size <= 1:
                return 0
            active = mask.data.astype(bool)
            addresses = ptrs.data.astype(np.int64)
            if spans:
                active = active & np.any([(addresses >= lo) & (addresses < hi) for lo, hi in spans], axis=0)
            return int(np.unique(addresses[active]).size) * (ptrs.get_element_ty().primitive_bitwidth // 8)

        def counting_load(builder, ptrs, mask, *args, **kwargs):
            self.read += counted_bytes(ptrs, mask)
            return load(builder, ptrs, mask, *args, **kwargs)

        def counting_store(builder, ptrs, value, mask, *args, **kwargs):
            self.written += counted_bytes(ptrs, mask)
            return store(builder, ptrs, value, mask, *args, **kwargs)

        monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
        monkeypatch.setattr(InterpreterBuilder, "create_masked_store", counting_store)

    def reset(self) -> None:
        self.read = self.written = 0

    def per_element(self, numel: int) -> float:
        return (self.read + self.written) / numel


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    params = [torch.randn(n, dtype=dtype, requires_grad=True) for n in SIZES]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _streams(opt) -> list[torch.Tensor]:
    """An optimizer's per-element tensors: params, grads and every state but the step counter."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return params + [p.grad for p in params] + [
        v for p in params for k, v in opt.state[p].items() if k != "step" and v.numel() == p.numel()]


# Every state layout of every optimizer: the case database's configurations, the first of each
# (optimizer, state entries its options make).
OPTIMIZER_CASES = first_of_each(VARIANTS + MUTATED, lambda c: (c.optimizer, SPECS[c.optimizer].state_keys(c.options)))
PRECISIONS = [  # (param dtype, mechgpu options)
    (torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, {"state_dtype": torch.bfloat16}),
    (torch.bfloat16, {"master_weights": True}), (torch.float16, {"master_weights": True}),
]


@pytest.mark.parametrize("dtype, precision", PRECISIONS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=lambda c: c.name)
def test_optimizer_step_moves_what_the_model_says(monkeypatch, case, dtype, precision):
    name, options = case.optimizer, case.options
    params = _params(dtype)
    opt = getattr(mo, name)(params, lr=1e-3, **options, **precision)
    opt.step()  # states made; SGD's first step sets the buffer without reading it
    counted = Bytes(monkeypatch, within=_streams(opt))
    opt.step()
    state_size = DTYPE_SIZE[precision.get("state_dtype", torch.float32)]
    expected = traffic.optimizer_step_bytes(name, DTYPE_SIZE[dtype], state_size,
                                            master=bool(precision.get("master_weights")), **options)
    assert counted.per_element(NUMEL) == expected
    assert traffic.optimizer_state_bytes(name, state_size, master=bool(precision.get("master_weights")),
                                         **options) * NUMEL == sum(
        v.numel() * v.element_size() for p in params for k, v in opt.state[p].items() if k != "step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_telemetry_adds_no_traffic(monkeypatch, dtype):
    """Telemetry sums what the update has in registers: the same bytes as a plain step."""
    params = _params(dtype)
    opt = mo.AdamW(params, telemetry=True)
    opt.step()
    counted = Bytes(monkeypatch, within=_streams(opt))
    opt.step()
    assert counted.per_element(NUMEL) == traffic.optimizer_step_bytes("AdamW", DTYPE_SIZE[dtype])
    assert opt.last_telemetry[0]["update_norm"].item() > 0


def test_step_prologue_moves_its_bytes_per_tensor(monkeypatch):
    """Beside the per-element stream, a step moves the prologue's bytes for each tensor."""
    params = _params(torch.float32)
    opt = mo.Adam(params)
    opt.step()
    everything = Bytes(monkeypatch)
    streams = Bytes(monkeypatch, within=_streams(opt))
    opt.step()
    beside = everything.read + everything.written - streams.read - streams.written
    assert beside == traffic.STEP_PROLOGUE_BYTES_PER_TENSOR * len(SIZES)


def test_clip_in_step_adds_one_read_of_the_grads(monkeypatch):
    params = _params(torch.float32)
    opt = mo.AdamW(params, max_grad_norm=1.0)
    opt.step()
    counted = Bytes(monkeypatch, within=_streams(opt))
    opt.step()
    assert counted.per_element(NUMEL) == traffic.optimizer_step_bytes("AdamW") + traffic.grad_norm_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_norm_reads_then_scales(monkeypatch, dtype):
    params = _params(dtype)
    counted = Bytes(monkeypatch, within=[p.grad for p in params])
    mechgpu.clip_grad_norm_(params, max_norm=1e-3)
    size = DTYPE_SIZE[dtype]
    assert counted.per_element(NUMEL) == traffic.grad_norm_bytes(size) + traffic.grad_scale_bytes(size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "gelu", "silu", "sigmoid", "tanh"])
def test_activation_moves_what_the_model_says(monkeypatch, kind, dtype):
    n = 32 * 129  # whole 32-bit mask words, so the mask is exactly 1/8 B per element
    x = torch.randn(n, dtype=dtype, requires_grad=True)
    fn = getattr(MF, kind)
    counted = Bytes(monkeypatch)
    y = fn(x)
    forward = counted.per_element(n)
    counted.reset()
    y.backward(torch.randn_like(y))
    backward = counted.per_element(n)
    size = DTYPE_SIZE[dtype]
    assert (forward, backward) == (traffic.activation_bytes(kind, "forward", size),
                                   traffic.activation_bytes(kind, "backward", size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fill_writes_each_element_once(monkeypatch, dtype):
    w = torch.empty(257, 129, dtype=dtype)
    counted = Bytes(monkeypatch)
    mi.kaiming_normal_(w)
    assert counted.read == 0 and counted.written == traffic.fill_bytes(DTYPE_SIZE[dtype]) * w.numel()


#: sizes that QUANT_BLOCK divides, each with 8-bit states (at least MIN_8BIT_NUMEL elements)
SIZES_8BIT = (MIN_8BIT_NUMEL, MIN_8BIT_NUMEL + 9 * QUANT_BLOCK)


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-master"])
@pytest.mark.parametrize("case", [c for c in OPTIMIZER_CASES if SPECS[c.optimizer].takes_8bit(c.options)],
                         ids=lambda c: c.name)
def test_8bit_step_moves_what_the_model_says(monkeypatch, case, dtype, master):
    """Codes and block maxima (each absmax read once per block and written by one lane) are what the
    model's ``STATE_8BIT`` counts, and the states kept are ``optimizer_state_bytes`` of it. (Options
    that refuse 8-bit states, RMSprop's centered, are not cases.)"""
    name, options = case.optimizer, case.options
    params = [torch.randn(n, dtype=dtype, requires_grad=True) for n in SIZES_8BIT]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = getattr(mo, name)(params, lr=1e-3, **options, state_dtype="8bit", master_weights=master)
    opt.step()
    streams = _streams(opt) + [v for p in params for k, v in opt.state[p].items() if k.endswith(ABSMAX_SUFFIX)]
    counted = Bytes(monkeypatch, within=streams)
    opt.step()
    numel = sum(SIZES_8BIT)
    assert counted.per_element(numel) == traffic.optimizer_step_bytes(name, DTYPE_SIZE[dtype], traffic.STATE_8BIT,
                                                                      master=master, **options)
    assert traffic.optimizer_state_bytes(name, traffic.STATE_8BIT, master=master, **options) * numel == sum(
        v.numel() * v.element_size() for p in params for k, v in opt.state[p].items() if k != "step")
