"""8-bit optimizer states (``state_dtype="8bit"``) against a float64 reference of the same scheme.

The reference is torch.optim's own step in float64 between mechgpu.optim.quant8's float64
quantize and dequantize (the code books written as tables of values, not the kernel's bit
operations). Step for step, the kernel's codes must equal the reference's but at rounding ties,
where fp32 and float64 may land on neighbouring codes: those are counted and bounded.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import KERNEL_DEVICE, run_without_interpreter
from mechgpu.kernels.optim_spec import NONNEGATIVE_KEYS

import mechgpu.optim as mo
from mechgpu import traffic
from mechgpu.optim.quant8 import (
    ABSMAX_SUFFIX,
    MIN_8BIT_NUMEL,
    QUANT_BLOCK,
    absmax_count,
    dequantized_state_dict,
    quantize,
)
from mechgpu.testing.compare import QUANT8_CODE_DISTANCE, STATE_ATOL_SCALE, STATE_RTOL, code_errors
from mechgpu.testing.oracles import quant8_initial_state, quant8_reference_step
from mechgpu.testing.parity import PARITY, parity_loss

#: over the 8-bit threshold: odd, a partial last absmax block, a 2-D param; and one that stays fp32
SHAPES = ((MIN_8BIT_NUMEL + 129,), (70, 64 + 3), (100,))
#: each rule with every state it can keep (momentum on), at a learning rate that moves the states
CONFIGS = {
    "AdamW": {"weight_decay": 0.1},
    "Adam-amsgrad": {"amsgrad": True},
    "RMSprop-momentum": {"momentum": 0.9, "alpha": 0.9},
    "SGD-momentum": {"momentum": 0.9, "nesterov": True},
    "Adagrad": {"initial_accumulator_value": 0.1, "lr_decay": 0.01},
}
STEPS = 4


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(KERNEL_DEVICE).requires_grad_() for shape in SHAPES]


@pytest.mark.parametrize("config", CONFIGS)
def test_step_matches_float64_reference_of_the_scheme(config):
    _compare_with_float64_reference(config)


#: the QUANT_BLOCK-element block (in memory order) that ``test_all_zero_block_...`` keeps at zero
ZERO_BLOCK = 3


# under the interpreter a lane dividing by a zero scale is numpy's "divide by zero" warning: an error here
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("config", ["AdamW", "SGD-momentum"])
def test_all_zero_block_matches_float64_reference(config):
    """One block whose grads (and so, from zero, its signed states) stay zero at every step, beside
    nonzero blocks: its absmax is 0 and its codes 0 (the kernel divides by no zero scale), and the
    rest of the tensor still matches the float64 reference of the scheme."""
    def zero_one_block(grads: list[torch.Tensor]) -> None:
        flat = grads[0].view(-1)  # SHAPES[0] is 1-D and contiguous: memory order is index order
        flat[ZERO_BLOCK * QUANT_BLOCK:(ZERO_BLOCK + 1) * QUANT_BLOCK] = 0.0

    opt, params = _compare_with_float64_reference(config, zero_one_block)
    block = slice(ZERO_BLOCK * QUANT_BLOCK, (ZERO_BLOCK + 1) * QUANT_BLOCK)
    signed = [k for k in opt.state[params[0]] if k in ("exp_avg", "momentum_buffer")]
    assert signed, opt.state[params[0]].keys()
    for key in signed:
        assert float(opt.state[params[0]][key + ABSMAX_SUFFIX][ZERO_BLOCK]) == 0.0
        assert not opt.state[params[0]][key].view(-1)[block].any()
        assert (opt.state[params[0]][key + ABSMAX_SUFFIX] > 0).sum() == absmax_count(params[0].numel()) - 1


def _compare_with_float64_reference(config: str, edit_grads=None) -> tuple[torch.optim.Optimizer, list]:
    """STEPS steps of ``config`` with 8-bit states, each against the float64 reference; ``edit_grads``
    may change each step's fresh grads in place before they are used. Returns the optimizer and params."""
    name, options = config.split("-")[0], CONFIGS[config]
    lr = 1e-2
    params = _params(0)
    opt = getattr(mo, name)(params, lr=lr, state_dtype="8bit", **options)
    gen = torch.Generator().manual_seed(1)
    pairs = []
    for step in range(STEPS):
        grads = [torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE) for p in params]
        if edit_grads is not None:
            edit_grads(grads)
        before = [({k: v.clone() for k, v in opt.state[p].items()}, p.detach().clone()) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g, (state, old) in zip(params, grads, before):
            new = opt.state[p]
            if p.numel() < MIN_8BIT_NUMEL:  # fp32 states: torch's own step, exactly as for fp32
                assert all(v.dtype == torch.float32 for v in new.values() if torch.is_tensor(v))
                continue
            if step == 0 and not state:  # the first step starts from zero (or the fill's) states
                state = quant8_initial_state(name, options, old)
            ref = quant8_reference_step(name, options, old, g, state, lr)
            torch.testing.assert_close(p.detach().cpu().double(), ref["param"], rtol=1e-5, atol=1e-6)
            for key in (k for k in new if k != "step" and not k.endswith(ABSMAX_SUFFIX)):
                assert new[key].dtype == torch.uint8 and new[key].shape == p.shape
                absmax = new[key + ABSMAX_SUFFIX]
                assert absmax.dtype == torch.float32 and absmax.shape == (absmax_count(p.numel()),)
                ref_absmax = ref[key + ABSMAX_SUFFIX]  # each block's max |state|: the fp32 state tolerance
                torch.testing.assert_close(absmax.cpu(), ref_absmax, rtol=STATE_RTOL,
                                           atol=STATE_ATOL_SCALE * float(ref_absmax.abs().max()))
                pairs.append((new[key].clone(), ref[key], key in NONNEGATIVE_KEYS, f"step {step} {key}"))
    assert pairs
    codes = code_errors(pairs)
    assert codes.passed, codes.failures
    return opt, params


def test_kernel_codec_matches_the_float64_code_books():
    """Awkward values (zeros, subnormal codes, the block maximum, signs, a partial last block)
    through one step's encode: the kernel's codes are the float64 reference's."""
    p = torch.zeros(MIN_8BIT_NUMEL + 77, device=KERNEL_DEVICE, requires_grad=True)
    opt = mo.SGD([p], lr=0.0, momentum=0.5, state_dtype="8bit")
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(p.shape, generator=gen) * torch.exp(torch.randn(p.shape, generator=gen) * 6)
    g[:QUANT_BLOCK] = 0.0  # an all-zero block
    g[QUANT_BLOCK + 5] = -1e-30  # far below its block's max: the smallest codes
    p.grad = g.to(KERNEL_DEVICE)
    opt.step()  # the first SGD step sets the buffer to the grad, exactly
    codes, absmax = opt.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer" + ABSMAX_SUFFIX]
    ref_codes, ref_absmax = quantize(g, unsigned=False)
    assert torch.equal(absmax.cpu(), ref_absmax)
    errs = code_errors([(codes, ref_codes, False, "momentum_buffer")])
    assert errs.passed, errs.failures
    assert int(codes[:QUANT_BLOCK].max()) == 0


def test_centered_rmsprop_is_refused_before_any_write():
    """centered=True needs square_avg - grad_avg^2 >= 0, which two independently rounded 8-bit states
    do not keep (a NaN update; bitsandbytes refuses it too): a clear error, nothing written."""
    p = torch.randn(MIN_8BIT_NUMEL, device=KERNEL_DEVICE, requires_grad=True)
    opt = mo.RMSprop([p], lr=1e-3, state_dtype="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match=r"group 0 has centered=True, which state_dtype='8bit' does not support"):
        opt.step()
    assert torch.equal(p, before[0]) and all(torch.equal(v, opt.state[p][k]) for k, v in before[1].items())


def test_unknown_state_dtype_is_refused():
    p = torch.zeros(3, requires_grad=True)
    for bad in ("int8", torch.float16, 8):
        with pytest.raises(ValueError, match="Invalid state_dtype"):
            mo.AdamW([p], state_dtype=bad)


def test_small_tensors_keep_fp32_states_and_the_state_bytes_are_the_models():
    big = torch.zeros(64 * QUANT_BLOCK, device=KERNEL_DEVICE, requires_grad=True)
    small = torch.zeros(MIN_8BIT_NUMEL - 1, device=KERNEL_DEVICE, requires_grad=True)
    opt = mo.AdamW([big, small], state_dtype="8bit")
    for p in (big, small):
        p.grad = torch.ones_like(p)
    opt.step()
    state_bytes = sum(v.numel() * v.element_size() for k, v in opt.state[big].items() if k != "step")
    assert state_bytes == traffic.optimizer_state_bytes("AdamW", traffic.STATE_8BIT) * big.numel()
    assert all(v.dtype == torch.float32 for v in opt.state[small].values())


def _train(opt_factory, params, steps: int, seed: int = 5) -> list[torch.Tensor]:
    opt = opt_factory(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE)
        opt.step()
    return opt


def test_resume_from_state_dict_is_bit_for_bit():
    options = dict(lr=1e-2, weight_decay=0.1, state_dtype="8bit")
    params = _params(0)
    opt = _train(lambda ps: mo.AdamW(ps, **options), params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    sd = opt.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):  # compact: codes and block maxima, nothing else
        assert sd["state"][0][key].dtype == torch.uint8
        assert sd["state"][0][key + ABSMAX_SUFFIX].dtype == torch.float32
    assert buffer.tell() < 1.2 * sum(traffic.optimizer_state_bytes("AdamW", traffic.STATE_8BIT) * p.numel()
                                     for p in params[:2]) + 4 * 2 * 4 * params[2].numel() + 20000
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = mo.AdamW(resumed_params, **options)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):
        for p, q in zip(params, resumed_params):
            p.grad = torch.randn(p.shape, generator=gen_a).to(KERNEL_DEVICE)
            q.grad = torch.randn(q.shape, generator=gen_b).to(KERNEL_DEVICE)
        opt.step()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_torch_state_dict_round_trip():
    """A torch fp32 state_dict loads into 8-bit states (quantized at the next step), and
    ``dequantized_state_dict`` gives torch's layout back, which torch.optim loads."""
    params = _params(0)
    ref = [p.detach().clone().requires_grad_() for p in params]
    torch_opt = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-2), ref, 2)
    opt = mo.AdamW(params, lr=1e-2, state_dtype="8bit")
    with torch.no_grad():
        for p, r in zip(params, ref):
            p.copy_(r)
    opt.load_state_dict(torch_opt.state_dict())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # quantizes the loaded fp32 states, then steps
    big = params[0]
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    back = dequantized_state_dict(opt.state_dict())
    assert set(back["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    for key in ("exp_avg", "exp_avg_sq"):
        expected = torch_opt.state[ref[0]][key] * (0.9 if key == "exp_avg" else 0.999)  # one step of zero grad
        scale = float(expected.abs().max())
        torch.testing.assert_close(back["state"][0][key], expected.cpu(), rtol=0.07, atol=1e-3 * scale)
    torch.optim.AdamW([r.detach().clone().requires_grad_() for r in ref], lr=1e-2).load_state_dict(back)


def test_state_dict_whose_codes_do_not_fit_is_refused_and_changes_nothing():
    params = _params(0)
    opt = _train(lambda ps: mo.AdamW(ps, lr=1e-2, state_dtype="8bit"), params, 1)
    before = copy.deepcopy(opt.state_dict())
    for corrupt in (lambda s: s.__setitem__("exp_avg", s["exp_avg"][:-1]),
                    lambda s: s.__setitem__("exp_avg_absmax", s["exp_avg_absmax"][:-1]),
                    lambda s: s.pop("exp_avg_sq_absmax"),
                    lambda s: s.__setitem__("exp_avg_absmax", s["exp_avg_absmax"].double())):
        sd = copy.deepcopy(before)
        corrupt(sd["state"][0])
        with pytest.raises(ValueError, match="does not fit param 0"):
            opt.load_state_dict(sd)
        after = opt.state_dict()
        for key, value in before["state"][0].items():
            assert torch.equal(after["state"][0][key], value), key


@pytest.mark.parametrize("optimizer", PARITY["mlp"])
def test_training_parity_with_fp32_states(optimizer):
    """A short run: 8-bit states end within 10% of fp32 states' loss (bench/quant8_parity.py runs
    longer and prints the figures)."""
    options = PARITY["mlp"][optimizer]
    fp32 = parity_loss(optimizer, options, steps=60, device=KERNEL_DEVICE)
    eight = parity_loss(optimizer, {**options, "state_dtype": "8bit"}, steps=60, device=KERNEL_DEVICE)
    start = parity_loss(optimizer, {**options, "lr": 0.0}, steps=1, device=KERNEL_DEVICE)
    assert fp32 < 0.7 * start, "the run must learn for the comparison to mean anything"
    assert abs(eight / fp32 - 1) < 0.10, f"8-bit {eight:.5f} against fp32 {fp32:.5f}"


def test_training_parity_on_the_character_gpt():
    """The tour's character GPT, 10 AdamW steps: the held-out loss falls by over 30%, and 8-bit
    states end within 2% of fp32 states' (bench/quant8_parity.py --task gpt runs all three
    optimizers longer and prints the figures)."""
    options = PARITY["gpt"]["AdamW"]
    fp32 = parity_loss("AdamW", options, steps=10, device=KERNEL_DEVICE, task="gpt")
    eight = parity_loss("AdamW", {**options, "state_dtype": "8bit"}, steps=10, device=KERNEL_DEVICE, task="gpt")
    start = parity_loss("AdamW", options, steps=0, device=KERNEL_DEVICE, task="gpt")
    assert fp32 < 0.7 * start, "the run must learn for the comparison to mean anything"
    assert abs(eight / fp32 - 1) < 0.02, f"8-bit {eight:.5f} against fp32 {fp32:.5f}"


def test_composes_with_clipping_grad_scale_and_telemetry():
    """8-bit AdamW clipping in the step, with GradScaler's scale and telemetry, against 8-bit AdamW
    stepping grads that torch unscaled and clipped first: the same codes but at ties, the same params
    to fp32 rounding, and the telemetry's update norm that of the params it wrote."""
    params, plain = _params(0), _params(0)
    clipped = mo.AdamW(params, lr=1e-2, state_dtype="8bit", max_grad_norm=0.5, telemetry=True)
    reference = mo.AdamW(plain, lr=1e-2, state_dtype="8bit")
    gen = torch.Generator().manual_seed(4)
    scale = 1024.0
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE) for p in params]
        for p, q, g in zip(params, plain, grads):
            p.grad = g * scale
            q.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(plain, 0.5)
        clipped.grad_scale = torch.tensor(scale, device=KERNEL_DEVICE)  # as GradScaler.step sets it
        before = [p.detach().clone() for p in params]
        clipped.step()
        del clipped.grad_scale
        reference.step()
        update = torch.sqrt(sum(((p.detach() - b).double() ** 2).sum() for p, b in zip(params, before)))
        torch.testing.assert_close(clipped.last_update_norm.double().cpu(), update.cpu(), rtol=1e-5, atol=0)
    for p, q in zip(params, plain):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        for key, value in reference.state[q].items():
            if value.dtype == torch.uint8:
                # two 8-bit runs, each within a code of the exact scheme: their codes within a code
                errs = code_errors([(clipped.state[p][key], value, key in NONNEGATIVE_KEYS, key)])
                assert errs.max_abs <= QUANT8_CODE_DISTANCE, key


def test_torch_fallback_steps_dequantized_states():
    """Where torch.optim's own step runs (CPU without the interpreter), 8-bit states are dequantized
    for it: the step equals torch's from those values."""
    script = """
import warnings; warnings.simplefilter("ignore")
import torch, mechgpu.optim as mo
from mechgpu.optim.quant8 import quantize, dequantize
torch.manual_seed(0)
p = torch.randn(5000, requires_grad=True); q = p.detach().clone().requires_grad_()
ours, ref = mo.AdamW([p], lr=1e-2, state_dtype="8bit"), torch.optim.AdamW([q], lr=1e-2)
m, v = torch.randn(5000) * 0.1, torch.rand(5000) * 0.01
codes_m, absmax_m = quantize(m, False); codes_v, absmax_v = quantize(v, True)
ours.state[p] = {"step": torch.tensor(3.0), "exp_avg": codes_m, "exp_avg_absmax": absmax_m,
                 "exp_avg_sq": codes_v, "exp_avg_sq_absmax": absmax_v}
ref.state[q] = {"step": torch.tensor(3.0), "exp_avg": dequantize(codes_m, absmax_m, False),
                "exp_avg_sq": dequantize(codes_v, absmax_v, True)}
g = torch.randn(5000); p.grad, q.grad = g.clone(), g.clone()
ours.step(); ref.step()
assert torch.equal(p, q), (p - q).abs().max()
assert torch.equal(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"])
print("ok")
"""
    out = run_without_interpreter(script)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_switching_state_dtype_converts_the_states():
    """state_dtype set between steps: 8-bit states become their fp32 values and back (codes equal
    but at ties), and no stale block maxima stay behind."""
    params = _params(0)
    opt = _train(lambda ps: mo.AdamW(ps, lr=1e-2, state_dtype="8bit"), params, 2)
    big = params[0]
    codes = {k: v.clone() for k, v in opt.state[big].items()}
    values = {k: opt._float_state(big, k) for k in ("exp_avg", "exp_avg_sq")}
    opt.state_dtype = torch.float32
    opt.defaults["lr"] = 0.0
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # lr 0 and zero grads: the states decay by beta only
    assert set(opt.state[big]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(opt.state[big]["exp_avg"], values["exp_avg"] * 0.9, rtol=1e-6, atol=0)
    opt.state_dtype = "8bit"
    for group in opt.param_groups:
        group["betas"] = (0.0, 0.0)  # the next step keeps only g^2 and g: zeros
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8 and int(opt.state[big]["exp_avg"].max()) == 0
    assert codes["exp_avg"].shape == opt.state[big]["exp_avg"].shape
