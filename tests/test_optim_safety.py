"""Memory safety of the fused optimizers under every torch-legal use, against torch.optim.

Users clear state, replace state tensors, swap ``.data``, switch options on from a
scheduler, load old checkpoints, deepcopy and pickle. After each mutation mechgpu must
give torch's results where torch works, and where torch raises it must raise a clear
error with every param, state and step count bit-for-bit unchanged. The kernels read raw
addresses from cached tables, so a missed mutation is a wild write: every case runs in a
child process, so a segfault or heap corruption fails the test instead of killing the run.
"""

from __future__ import annotations

import copy
import io
import multiprocessing
import pickle
import traceback
from collections import defaultdict

import pytest
import torch
from conftest import HAS_CUDA, KERNEL_DEVICE, run_without_interpreter

import mechgpu.optim as mo
from mechgpu.testing.optim_cases import MUTATED

CHILD_TIMEOUT_S = 600


def _child(conn, fn, args):
    torch.set_num_threads(1)
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", traceback.format_exc()))
    conn.close()


def isolated(fn, *args):
    """fn(*args) in a child process (forked on CPU, spawned with CUDA); its result, or a
    failed test that names a crash by its exit code."""
    ctx = multiprocessing.get_context("spawn" if HAS_CUDA else "fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args))
    proc.start()
    sender.close()
    message = None
    try:
        if receiver.poll(CHILD_TIMEOUT_S):
            message = receiver.recv()
    except EOFError:  # the child died without answering
        pass
    proc.join(30)
    if message is None:
        proc.kill()
        proc.join(30)
        pytest.fail(f"the child process died with exit code {proc.exitcode} (a negative code is a signal: "
                    "-11 is a segfault, -6 an abort such as heap corruption) or timed out")
    status, value = message
    if status == "error":
        pytest.fail("in the child process:\n" + value)
    if proc.exitcode not in (0, None):
        pytest.fail(f"the child process exited with code {proc.exitcode} after answering")
    return value


# ----------------------------------------------------------------------------------
# a pair of optimizers, mechgpu's and torch's, stepped alike
# ----------------------------------------------------------------------------------
SIZES = ((0, 1, 3, 1000), (4097, 5))  # two groups: empty, tiny, odd, more than one block (and 8-bit states)
#: With 8-bit states, a param's distance from torch's, as a fraction of lr times the steps (Adam's
#: per-step bound), and a state's, as a fraction of its largest value: a few quantization steps
QUANTIZED_STEP_ERROR = 0.2
QUANTIZED_STATE_ERROR = 0.15
#: the configurations whose mutations also run with 8-bit states: one per rule (interpreter time)
EIGHT_BIT_CONFIGS = ("Adam-amsgrad", "AdamW", "RMSprop", "SGD-momentum", "Adagrad")  # (8-bit refuses centered)
CONFIGS = {c.name: c for c in MUTATED}  # the case database's configurations to mutate, by name


def with_option(option: str) -> list[str]:
    """The configurations with ``option`` on."""
    return [c.name for c in MUTATED if c.has(option)]


def without_option(option: str) -> list[str]:
    """The configurations with ``option`` off whose optimizer takes it."""
    return [c.name for c in MUTATED if c.accepts(option) and not c.has(option)]


class Pair:
    """mechgpu's optimizer and torch's twin over equal params, in two groups."""

    def __init__(self, config: str, seed: int = 0, **mechgpu_options) -> None:
        case = CONFIGS[config]
        self.name, self.opts, self.lr = case.optimizer, case.options, case.lr
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        self.ours_p = [torch.randn(n, generator=gen).to(KERNEL_DEVICE).requires_grad_() for g in SIZES for n in g]
        self.ref_p = [p.detach().clone().requires_grad_() for p in self.ours_p]
        self.ours = getattr(mo, self.name)(self._groups(self.ours_p), lr=self.lr, **self.opts,
                                           **mechgpu_options)
        self.ref = getattr(torch.optim, self.name)(self._groups(self.ref_p), lr=self.lr, **self.opts)
        self.steps = 0

    def _groups(self, params):
        k = len(SIZES[0])
        return [{"params": params[:k]}, {"params": params[k:], "lr": self.lr * 0.5}]

    def grads(self):
        """New grad tensors on even steps, the same grad tensors refilled on odd ones."""
        for a, b in zip(self.ours_p, self.ref_p):
            g = torch.randn(a.shape, generator=self.gen).to(KERNEL_DEVICE)
            if self.steps % 2 == 0 or a.grad is None:
                a.grad, b.grad = g.clone(), g.clone()
            else:
                a.grad.copy_(g)
                b.grad.copy_(g)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.grads()
            self.ours.step()
            self.ref.step()
            self.steps += 1

    def both(self, mutate) -> None:
        mutate(self.ours, self.ours_p)
        mutate(self.ref, self.ref_p)

    def assert_close(self) -> None:
        """torch's params and states to fp32 rounding; where the states are 8-bit (``state_dtype="8bit"``,
        tensors of MIN_8BIT_NUMEL elements or more), to what quantization allows: each param within
        QUANTIZED_STEP_ERROR of the distance ``lr`` moves it in all the steps, each state within
        QUANTIZED_STATE_ERROR of its largest value. A wild write or a wrong address is far outside both."""
        for i, (a, b) in enumerate(zip(self.ours_p, self.ref_p)):
            quantized = self.ours._quantized(a)
            atol = QUANTIZED_STEP_ERROR * self.lr * self.steps if quantized else 1e-6
            torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=0 if quantized else 1e-5, atol=atol,
                                       msg=lambda m, i=i: f"param {i}: {m}")
        for i, (a, b) in enumerate(zip(self.ours_p, self.ref_p)):
            s_ours, s_ref = self.ours.state.get(a, {}), self.ref.state.get(b, {})
            assert set(s_ref) <= set(s_ours), (i, set(s_ours), set(s_ref))
            for key, expected in s_ref.items():
                expected = expected.detach().cpu().float() if expected is not None else expected
                ours = s_ours[key]
                if expected is None or ours is None:
                    assert ours is expected, (i, key)
                    continue
                quantized = self.ours._quantized(a) and key != "step"
                scale = expected.abs().max().item() if expected.numel() else 0.0
                if quantized:
                    ours = self.ours._float_state(a, key)
                atol = (QUANTIZED_STATE_ERROR if quantized else 1e-6) * scale
                torch.testing.assert_close(ours.detach().cpu().float(), expected, rtol=0 if quantized else 1e-5,
                                           atol=atol, msg=lambda m, i=i, k=key: f"state {k} of param {i}: {m}")


def _copy(v):
    """A copy of a state entry; a tensor whose storage was freed under it (unreadable) by identity."""
    if not torch.is_tensor(v):
        return v
    return v.clone() if v.untyped_storage().nbytes() >= v.nbytes else ("storage freed", id(v))


def snapshot(opt, params):
    """Everything a step may write: params, every state entry, SGD's own step counters."""
    states = [{k: _copy(v) for k, v in opt.state.get(p, {}).items()} for p in params]
    counters = {id(p): c.clone() for p, c in opt.__dict__.get("_own_steps", {}).items()}
    return [p.detach().clone() for p in params], states, counters


def assert_unchanged(before, opt, params):
    old_params, old_states, old_counters = before
    now_params, now_states, now_counters = snapshot(opt, params)
    for i, (a, b) in enumerate(zip(old_params, now_params)):
        assert a.shape == b.shape and torch.equal(a, b), f"param {i} was written"
    for i, (a, b) in enumerate(zip(old_states, now_states)):
        assert set(a) == set(b), f"state of param {i}: {set(a)} became {set(b)}"
        for key in a:
            same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
            assert same, f"state {key} of param {i} was written"
    assert old_counters.keys() == now_counters.keys()
    assert all(torch.equal(old_counters[k], now_counters[k]) for k in old_counters)


# ----------------------------------------------------------------------------------
# mutations torch allows: mechgpu must then match torch
# ----------------------------------------------------------------------------------
def _first_key(opt, p):
    """The first per-element entry of p's state, or None when p has none yet."""
    return next((k for k in opt.state.get(p, {}) if k != "step"), None)


def state_cleared(opt, params):
    opt.state.clear()


def state_dict_replaced(opt, params):
    opt.state = defaultdict(dict)


def one_state_cleared(opt, params):
    opt.state[params[4]].clear()


def state_tensor_replaced(opt, params):
    for p in params[1::2]:
        if _first_key(opt, p) is not None:
            opt.state[p][_first_key(opt, p)] = torch.full_like(p, 0.25)


def step_replaced(opt, params):
    for p in params[1:]:
        if opt.state.get(p):
            opt.state[p]["step"] = torch.tensor(100.0)


def state_data_swapped(opt, params):
    for p in params[3:5]:
        if _first_key(opt, p) is not None:
            opt.state[p][_first_key(opt, p)].data = torch.full_like(p, 0.5)


def param_data_swapped(opt, params):
    for p in params[2:5]:
        p.data = p.data.clone()


def grads_set_to_none(opt, params):
    opt.zero_grad(set_to_none=True)


def torch_state_dict_loaded(opt, params):
    """Both load the torch optimizer's state_dict (a torch.save round trip)."""
    buffer = io.BytesIO()
    torch.save(_REF_STATE["sd"], buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer))


_REF_STATE: dict = {}


def option_flipped(key, value):
    def mutate(opt, params):
        for group in opt.param_groups:
            group[key] = value
    mutate.__name__ = f"{key}={value}"
    return mutate


def param_group_added(opt, params):
    extra = _EXTRA[id(params)]
    opt.add_param_group({"params": extra, "lr": 3e-3})
    params.extend(extra)


_EXTRA: dict = {}


def momentum_buffer_none(opt, params):
    """torch's SGD reads a None buffer as none yet: the next step starts it from the grad."""
    for p in params[1::2]:
        if p in opt.state:
            opt.state[p]["momentum_buffer"] = None


def tensor_beta1(opt, params):
    opt.param_groups[1]["betas"] = (torch.tensor(0.8), 0.99)  # a tensor beside a float


def cpu_tensor_hypers(opt, params):
    """Group 1's scalar hyperparameters as CPU tensors, as torch takes them (with CUDA params the
    kernel must not read their host addresses)."""
    group = opt.param_groups[1]
    for key in ("eps", "weight_decay", "alpha", "momentum", "dampening"):
        if key in group:
            group[key] = torch.tensor(float(group[key]) or 0.05 * (key == "weight_decay"))

LEGAL = {  # mutation -> configs it applies to (None: all)
    "state_cleared": (state_cleared, None),
    "state_dict_replaced": (state_dict_replaced, None),
    "one_state_cleared": (one_state_cleared, None),
    "state_tensor_replaced": (state_tensor_replaced, ["Adam", "Adam-amsgrad", "AdamW", "RMSprop",
                                                       "RMSprop-centered-momentum", "SGD-momentum"]),
    "step_replaced": (step_replaced, ["Adam", "AdamW", "RMSprop"]),
    "state_data_swapped": (state_data_swapped, ["Adam", "RMSprop-centered-momentum", "SGD-momentum"]),
    "param_data_swapped": (param_data_swapped, None),
    "grads_set_to_none": (grads_set_to_none, None),
    "torch_state_dict_loaded": (torch_state_dict_loaded, None),
    "momentum_on": (option_flipped("momentum", 0.9), ["SGD"]),
    "momentum_off": (option_flipped("momentum", 0.0), with_option("momentum")),
    "amsgrad_off": (option_flipped("amsgrad", False), with_option("amsgrad")),
    "centered_off": (option_flipped("centered", False), with_option("centered")),
    "nesterov_off": (option_flipped("nesterov", False), with_option("nesterov")),
    "param_group_added": (param_group_added, ["Adam", "RMSprop", "SGD-momentum"]),
    "momentum_buffer_none": (momentum_buffer_none, ["SGD-momentum"]),
    "tensor_beta1": (tensor_beta1, ["Adam", "AdamW"]),
    "cpu_tensor_hypers": (cpu_tensor_hypers, None),
}
LEGAL_CASES = [(m, c) for m, (_, configs) in LEGAL.items() for c in (configs or CONFIGS)]


def run_legal(mutation: str, config: str, state_dtype=torch.float32) -> str:
    pair = Pair(config, state_dtype=state_dtype)
    pair.step(2)
    mutate = LEGAL[mutation][0]
    if mutation == "torch_state_dict_loaded":
        _REF_STATE["sd"] = pair.ref.state_dict()
    if mutation == "param_group_added":
        gen = torch.Generator().manual_seed(9)
        extra = [torch.randn(n, generator=gen).to(KERNEL_DEVICE).requires_grad_() for n in (17, 600)]
        _EXTRA[id(pair.ours_p)] = extra
        _EXTRA[id(pair.ref_p)] = [p.detach().clone().requires_grad_() for p in extra]
    pair.both(mutate)
    pair.step(3)
    pair.assert_close()
    return "ok"


@pytest.mark.parametrize("mutation,config", LEGAL_CASES, ids=[f"{m}-{c}" for m, c in LEGAL_CASES])
def test_legal_mutation_matches_torch(mutation, config):
    assert isolated(run_legal, mutation, config) == "ok"


LEGAL_8BIT_CASES = [(m, c) for m, c in LEGAL_CASES if c in EIGHT_BIT_CONFIGS]


@pytest.mark.parametrize("mutation,config", LEGAL_8BIT_CASES, ids=[f"{m}-{c}" for m, c in LEGAL_8BIT_CASES])
def test_legal_mutation_with_8bit_states_matches_torch(mutation, config):
    """The same mutations with ``state_dtype="8bit"``: fp32 states a mutation puts in are quantized,
    cleared ones start again, and torch's results hold to quantization's tolerance."""
    assert isolated(run_legal, mutation, config, "8bit") == "ok"


# ----------------------------------------------------------------------------------
# mutations torch rejects: mechgpu raises a clear error and writes nothing
# ----------------------------------------------------------------------------------
def _bad_shape(opt, params):
    p = params[5]
    opt.state[p][_first_key(opt, p)] = torch.zeros(3, device=p.device)


def _bad_step(opt, params):
    opt.state[params[5]]["step"] = torch.zeros(3)


def _not_a_tensor(opt, params):
    p = params[5]
    opt.state[p][_first_key(opt, p)] = 0.5


def _int_state(opt, params):
    p = params[5]
    opt.state[p][_first_key(opt, p)] = torch.zeros(p.shape, dtype=torch.int32, device=p.device)


def _param_reshaped(opt, params):
    p = params[5]  # group 1: group 0 must not be stepped either
    p.data = torch.randn(7, device=p.device)


def _param_view_shrunk(opt, params):
    p = params[5]
    p.data = p.data[:2]


def _eps_none(opt, params):
    opt.param_groups[1]["eps"] = None


def _betas_one_value(opt, params):  # torch's step: "not enough values to unpack (expected 2, got 1)"
    opt.param_groups[1]["betas"] = (0.9,)


def _storage_freed(opt, params):
    p = params[5]
    opt.state[p][_first_key(opt, p)].untyped_storage().resize_(0)  # as FSDP frees storage


def _shared_step(opt, params):
    opt.state[params[5]]["step"] = opt.state[params[4]]["step"]


def _state_dtype_fp16(opt, params):
    opt.state_dtype = torch.float16


def _meta_weight_decay(opt, params):
    opt.param_groups[1]["weight_decay"] = torch.tensor(0.1, device="meta")  # group 0 must not be stepped either


REJECTED = {  # mutation -> (configs, exception, message)
    "amsgrad_on": (option_flipped("amsgrad", True), without_option("amsgrad"), KeyError,
                   "has no 'max_exp_avg_sq', which amsgrad=True needs"),
    "centered_on": (option_flipped("centered", True), without_option("centered"), KeyError,
                    "has no 'grad_avg', which centered=True needs"),
    "rmsprop_momentum_on": (option_flipped("momentum", 0.9), ["RMSprop"], KeyError,
                            "has no 'momentum_buffer', which momentum > 0 needs"),
    "state_wrong_shape": (_bad_shape, ["Adam", "RMSprop", "SGD-momentum"], RuntimeError,
                          r"the state of param 1 of group 1 does not fit it: '\w+' has shape \(3,\), the param \(5,\)"),
    "step_not_a_scalar": (_bad_step, ["Adam", "RMSprop"], RuntimeError, "'step' must be a number or a one-element"),
    "state_not_a_tensor": (_not_a_tensor, ["AdamW", "SGD-momentum"], RuntimeError, "is a float, not a tensor"),
    "state_int_dtype": (_int_state, ["Adam"], RuntimeError, "has dtype torch.int32; it must be a floating-point"),
    "param_reshaped": (_param_reshaped, None, RuntimeError,
                       r"the grad of param 1 of group 1 has shape \(5,\), its param \(7,\)"),
    "param_view_shrunk": (_param_view_shrunk, None, RuntimeError,
                          r"the grad of param 1 of group 1 has shape \(5,\), its param \(2,\)"),
    "eps_none": (_eps_none, ["Adam", "RMSprop"], TypeError,
                 "group 1's eps must be a real number or a one-element real tensor, not None"),
    "betas_one_value": (_betas_one_value, ["Adam"], ValueError, r"group 1's betas must hold 2 values, not \(0\.9,\)"),
    "state_storage_freed": (_storage_freed, ["Adam", "SGD-momentum"], RuntimeError,
                            r"'\w+''s storage holds 0 bytes, too few for its elements"),
    "shared_step": (_shared_step, ["Adam", "RMSprop"], RuntimeError,
                    "state 'step' of param 1 of group 1 shares its memory with state 'step' of param 0 of group 1"),
    "state_dtype_fp16": (_state_dtype_fp16, ["AdamW"], ValueError, "Invalid state_dtype: torch.float16"),
    "meta_weight_decay": (_meta_weight_decay, ["Adam", "RMSprop", "SGD"], RuntimeError,
                          "group 1's tensor weight_decay is on meta, its params on"),
}
REJECTED_CASES = [(m, c) for m, (_, configs, _, _) in REJECTED.items() for c in (configs or CONFIGS)]


def run_rejected(mutation: str, config: str, state_dtype=torch.float32) -> str:
    pair = Pair(config, state_dtype=state_dtype)
    pair.step(2)
    mutate, _, exc, message = REJECTED[mutation]
    pair.grads()
    mutate(pair.ours, pair.ours_p)
    before = snapshot(pair.ours, pair.ours_p)
    with pytest.raises(exc, match=message):
        pair.ours.step()
    assert_unchanged(before, pair.ours, pair.ours_p)
    with pytest.raises(exc, match=message):  # and again: a failed step leaves nothing half-built
        pair.ours.step()
    assert_unchanged(before, pair.ours, pair.ours_p)
    if exc is KeyError:  # torch raises a KeyError as well
        mutate(pair.ref, pair.ref_p)
        with pytest.raises(KeyError):
            pair.ref.step()
    return "ok"


@pytest.mark.parametrize("mutation,config", REJECTED_CASES, ids=[f"{m}-{c}" for m, c in REJECTED_CASES])
def test_rejected_mutation_raises_and_writes_nothing(mutation, config):
    assert isolated(run_rejected, mutation, config) == "ok"


def _absmax_truncated(opt, params):
    p = params[4]  # 4,097 elements: 8-bit states
    key = _first_key(opt, p)
    opt.state[p][key + "_absmax"] = opt.state[p][key + "_absmax"][:-1].clone()


def _codes_without_absmax(opt, params):
    p = params[4]
    del opt.state[p][_first_key(opt, p) + "_absmax"]


def _absmax_storage_freed(opt, params):
    p = params[4]
    opt.state[p][_first_key(opt, p) + "_absmax"].untyped_storage().resize_(0)


REJECTED_8BIT = {  # mutation -> (what it does, the message's tail): each a RuntimeError naming the param
    "absmax_truncated": (_absmax_truncated, r"'\w+_absmax' is a torch.float32 tensor of shape \(32,\); 8-bit codes "
                                            r"of 4097 elements need float32 \(33,\)"),
    "codes_without_absmax": (_codes_without_absmax, r"'\w+' holds uint8 codes but there is no '\w+_absmax'"),
    "absmax_storage_freed": (_absmax_storage_freed,
                             r"'\w+_absmax' must be a contiguous tensor with data, holding all its elements"),
}
REJECTED_8BIT_CASES = [(m, c) for m in REJECTED_8BIT for c in EIGHT_BIT_CONFIGS]


def run_rejected_8bit(mutation: str, config: str) -> str:
    pair = Pair(config, state_dtype="8bit")
    pair.step(2)
    mutate, message = REJECTED_8BIT[mutation]
    pair.grads()
    mutate(pair.ours, pair.ours_p)
    before = snapshot(pair.ours, pair.ours_p)
    for _ in range(2):  # and again: a failed step leaves nothing half-built
        with pytest.raises(RuntimeError, match="the state of param 0 of group 1 does not fit it: " + message):
            pair.ours.step()
        assert_unchanged(before, pair.ours, pair.ours_p)
    return "ok"


@pytest.mark.parametrize("mutation,config", REJECTED_8BIT_CASES, ids=[f"{m}-{c}" for m, c in REJECTED_8BIT_CASES])
def test_rejected_8bit_state_raises_and_writes_nothing(mutation, config):
    """8-bit codes whose block maxima are missing, of the wrong size or freed: a clear error before any write."""
    assert isolated(run_rejected_8bit, mutation, config) == "ok"


def run_mismatched_state_dict(config: str) -> str:
    """A state saved for other sizes is refused at load_state_dict, naming the param."""
    name, opts = CONFIGS[config].optimizer, CONFIGS[config].options
    small = [torch.randn(10, device=KERNEL_DEVICE, requires_grad=True)]
    first = getattr(mo, name)(small, lr=0.1, **opts)
    small[0].grad = torch.randn_like(small[0])
    first.step()
    big = [torch.randn(5000, device=KERNEL_DEVICE, requires_grad=True)]
    second = getattr(mo, name)(big, lr=0.1, **opts)
    big[0].grad = torch.randn_like(big[0])
    second.step()
    before = snapshot(second, big)
    groups_before = copy.deepcopy(second.param_groups[0]["lr"])
    state_dict = first.state_dict()
    if any(state_dict["state"].values()):  # plain SGD keeps no state to mismatch
        with pytest.raises(ValueError, match=r"does not fit param 0 of group 0 \(shape \(5000,\)\): '\w+' has "
                                             r"shape \(10,\), the param \(5000,\)"):
            second.load_state_dict(state_dict)
    assert_unchanged(before, second, big)
    assert second.param_groups[0]["lr"] == groups_before
    second.step()  # still steps, within bounds
    with pytest.raises(ValueError, match="different number of parameter groups"):  # torch's own message
        second.load_state_dict({"state": {}, "param_groups": []})
    return "ok"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_mismatched_state_dict_is_refused(config):
    assert isolated(run_mismatched_state_dict, config) == "ok"


# ----------------------------------------------------------------------------------
# random sequences of legal mutations and steps, against torch
# ----------------------------------------------------------------------------------
RANDOM_MUTATIONS = ["state_cleared", "one_state_cleared", "state_tensor_replaced", "step_replaced",
                    "state_data_swapped", "param_data_swapped", "grads_set_to_none", "torch_state_dict_loaded"]


def run_random_sequences(config: str, max_examples: int) -> str:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    applicable = [m for m in RANDOM_MUTATIONS if LEGAL[m][1] is None or config in LEGAL[m][1]]

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])  # no shrinking:
    # a failing sequence is at most 8 actions, reported as found
    @given(st.lists(st.sampled_from(["step", *applicable]), min_size=1, max_size=8), st.integers(0, 2**16))
    def sequence(actions, seed):
        pair = Pair(config, seed=seed)
        pair.step()
        for action in actions:
            if action == "step":
                pair.step()
                continue
            if action == "torch_state_dict_loaded":
                _REF_STATE["sd"] = pair.ref.state_dict()
            pair.both(LEGAL[action][0])
        pair.step()
        pair.assert_close()

    sequence()
    return "ok"


@pytest.mark.parametrize("config", ["Adam-amsgrad", "RMSprop-centered-momentum", "SGD-momentum"])
def test_random_mutation_sequences_match_torch(config):
    assert isolated(run_random_sequences, config, 30) == "ok"


# ----------------------------------------------------------------------------------
# deepcopy and pickle
# ----------------------------------------------------------------------------------
def run_copies(config: str) -> str:
    case = CONFIGS[config]
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(n, generator=gen).to(KERNEL_DEVICE).requires_grad_() for n in (3, 1000)]
    opt = getattr(mo, case.optimizer)(params, lr=case.lr, max_grad_norm=0.5, track_update_norm=True, **case.options)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE)
    opt.step()
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    if "_own_steps" in opt.__dict__:  # as pickled by mechgpu before its private counters' generic name
        legacy = copy.deepcopy(opt)
        state = legacy.__getstate__()
        state["_sgd_steps"] = state.pop("_own_steps")
        del legacy.__dict__["_own_steps"]
        legacy.__setstate__(state)
        assert "_own_steps" in legacy.__dict__ and "_sgd_steps" not in legacy.__dict__
        copies.append(legacy)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE) for p in params]
        for o in (opt, *copies):
            for p, g in zip(o.param_groups[0]["params"], grads):
                p.grad = g.clone()
            o.step()
    for o in copies:
        assert o is not opt and o.max_grad_norm == 0.5 and o.track_update_norm
        for a, b in zip(params, o.param_groups[0]["params"]):
            assert a is not b and torch.equal(a.detach(), b.detach())
        assert torch.equal(o.last_grad_norm, opt.last_grad_norm)
        assert torch.equal(o.last_update_norm, opt.last_update_norm)
        for a, b in zip(params, o.param_groups[0]["params"]):
            for key, value in opt.state[a].items():
                assert torch.equal(o.state[b][key], value), key
    return "ok"


@pytest.mark.parametrize("config", {c.optimizer: c.name for c in MUTATED}.values())  # each optimizer's last
def test_deepcopy_and_pickle_step_identically(config):
    assert isolated(run_copies, config) == "ok"


# ----------------------------------------------------------------------------------
# bf16 params with fp32 masters: the masters follow torch's fp32 step through mutations
# ----------------------------------------------------------------------------------
def assert_masters_follow(ours, ours_p, ref_p) -> None:
    """Each fp32 master within fp32 rounding of torch's fp32 param, and its param its rounding."""
    for a, b in zip(ours_p, ref_p):
        master = ours.state[a]["master_param"]
        torch.testing.assert_close(master.cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)
        assert torch.equal(a.detach(), master.to(torch.bfloat16))


def run_masters(mutation: str) -> str:
    gen = torch.Generator().manual_seed(8)
    values = [torch.randn(n, generator=gen) for n in (1, 1000, 33)]
    ours_p = [v.to(KERNEL_DEVICE, torch.bfloat16).requires_grad_() for v in values]
    ref_p = [p.detach().float().requires_grad_() for p in ours_p]  # torch on the bf16 values, in fp32
    ours = mo.AdamW(ours_p, lr=1e-2, master_weights=True)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    for step in range(5):
        if step == 2:
            LEGAL[mutation][0](ours, ours_p)
            LEGAL[mutation][0](ref, ref_p)
            if mutation == "state_cleared":  # ours restarts its masters from the bf16 params: so does torch
                with torch.no_grad():
                    for a, b in zip(ours_p, ref_p):
                        b.copy_(a.float())
        for a, b in zip(ours_p, ref_p):
            g = torch.randn(a.shape, generator=gen).to(KERNEL_DEVICE, torch.bfloat16)
            a.grad, b.grad = g, g.float()
        ours.step()
        ref.step()
    assert_masters_follow(ours, ours_p, ref_p)
    return "ok"


@pytest.mark.parametrize("mutation", ["state_cleared", "state_tensor_replaced", "param_data_swapped"])
def test_master_weights_through_mutations(mutation):
    assert isolated(run_masters, mutation) == "ok"


# ----------------------------------------------------------------------------------
# the CPU fallback (torch's own step, no interpreter): AMP with clipping, update norm
# ----------------------------------------------------------------------------------
FALLBACK_SCRIPT = r"""
import copy, math, torch, mechgpu
import mechgpu.optim as mo
from mechgpu.testing.optim_cases import MUTATED
from mechgpu import _backend
from mechgpu.train import Trainer
assert not _backend.INTERPRETED
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
ref_model = copy.deepcopy(model)
opt = mo.AdamW(model.parameters(), lr=1e-2, track_update_norm=True)
ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
runs = [(model, opt, torch.amp.GradScaler("cpu", init_scale=1024.0), mechgpu.clip_grad_norm_),
        (ref_model, ref, torch.amp.GradScaler("cpu", init_scale=1024.0), torch.nn.utils.clip_grad_norm_)]
for step in range(4):
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for m, o, scaler, clip in runs:  # the standard AMP-with-clipping recipe
        o.zero_grad()
        before = [p.detach().clone() for p in m.parameters()]
        scaler.scale(((m(x) - y) ** 2).mean()).backward()
        scaler.unscale_(o)
        clip(m.parameters(), 0.5)
        scaler.step(o)
        scaler.update()
    moved = math.sqrt(sum(float(((p.detach() - b).double() ** 2).sum()) for p, b in zip(model.parameters(), before)))
    assert moved > 0 and abs(opt.last_update_norm.item() - moved) <= 1e-5 * moved, (opt.last_update_norm, moved)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
for a, b in zip(model.parameters(), ref_model.parameters()):
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a - b).abs().max()
lin = torch.nn.Linear(4, 2)
trainer = Trainer(lin, torch.nn.MSELoss(reduction="sum"), mo.SGD(lin.parameters(), lr=0.1), warmup_steps=0)
out = trainer.train_step([(torch.randn(8, 4), torch.randn(8, 2))])
assert out["update_norm"].item() > 0, out
print("ok")
"""


def test_cpu_fallback_amp_with_clipping_and_update_norm():
    out = run_without_interpreter(FALLBACK_SCRIPT, timeout=CHILD_TIMEOUT_S)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# ----------------------------------------------------------------------------------
# torch.utils.swap_tensors: Module.to with swapping on, between steps, grads present
# ----------------------------------------------------------------------------------
def run_swapped_module(config: str) -> str:
    import weakref

    case = CONFIGS[config]
    torch.manual_seed(3)
    ours_m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 5)).to(KERNEL_DEVICE)
    ref_m = copy.deepcopy(ours_m)
    pairs = [(ours_m, getattr(mo, case.optimizer)(ours_m.parameters(), lr=case.lr, **case.options)),
             (ref_m, getattr(torch.optim, case.optimizer)(ref_m.parameters(), lr=case.lr, **case.options))]
    x = torch.randn(6, 3, 6, 6, device=KERNEL_DEVICE)

    def step(swap_after_backward: bool) -> None:
        for model, opt in pairs:
            opt.zero_grad()
            model(x).square().sum().backward()
            if swap_after_backward:  # grads exist: they are swapped too
                model.to(memory_format=torch.channels_last)
            opt.step()

    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        step(False)
        step(False)
        ours_opt = pairs[0][1]
        tensors = [*ours_m.parameters(), *(p.grad for p in ours_m.parameters()),
                   *(v for s in ours_opt.state.values() for v in s.values() if torch.is_tensor(v))]
        assert all(weakref.getweakrefcount(t) == 0 for t in tensors)
        step(True)  # raised "Couldn't swap ... has weakref" while the cache held weak references
        assert ours_m[0].weight.is_contiguous(memory_format=torch.channels_last)
        step(False)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6)
    return "ok"


@pytest.mark.parametrize("config", ["AdamW", "SGD-momentum", "RMSprop-centered-momentum"])
def test_module_to_with_swapped_tensors_matches_torch(config):
    assert isolated(run_swapped_module, config) == "ok"


# ----------------------------------------------------------------------------------
# bf16 params with fp32 masters, edited between steps: torch's fp32 step honours an edit
# ----------------------------------------------------------------------------------
def run_master_edit(edit: str) -> str:
    """Each element of an edited param continues from its edited value, as in torch's fp32
    AdamW continued from the values the user left (an element the edit left as it was keeps
    its master's precision); before the fix, the stale master overwrote the edit."""
    gen = torch.Generator().manual_seed(11)
    ours_p = [torch.nn.Parameter(torch.randn(n, generator=gen).to(KERNEL_DEVICE, torch.bfloat16))
              for n in (1, 1000, 33)]
    ref_p = [torch.nn.Parameter(p.detach().float()) for p in ours_p]
    module = torch.nn.ParameterList(ours_p)
    assert all(a is b for a, b in zip(module, ours_p))
    lr = 5e-2
    ours = mo.AdamW(ours_p, lr=lr, master_weights=True)
    ref = torch.optim.AdamW(ref_p, lr=lr)
    changed: list[torch.Tensor] = []

    def clamp_hook(opt, args, kwargs):  # the common in-place edit of a hook, through .data
        changed.clear()
        for p in ours_p:
            before = p.detach().clone()
            p.data.clamp_(-0.5, 0.5)
            changed.append(p.detach() != before)

    if edit == "post_hook":
        hook = ours.register_step_post_hook(clamp_hook)
    seen = [p.detach().clone() for p in ours_p]  # the params as the user sees them
    for step in range(6):
        if edit == "load_state_dict" and step == 3:
            new = {str(i): torch.randn(p.shape, generator=gen).to(KERNEL_DEVICE, torch.bfloat16)
                   for i, p in enumerate(ours_p)}
            module.load_state_dict(new)
            changed[:] = [p.detach() != s for p, s in zip(ours_p, seen)]
        if edit == "toggle" and step == 2:
            ours.master_weights = False
            seen = [p.detach().clone() for p in ours_p]
            frozen = [q.detach().clone() for q in ref_p]
        if edit == "toggle" and step == 4:  # the bf16 steps made while they were off must not be lost
            ours.master_weights = True
            changed[:] = [p.detach() != s for p, s in zip(ours_p, seen)]
            assert sum(int(c.sum()) for c in changed) > 900
        with torch.no_grad():  # torch continues from the values the user left
            for q, p, c in zip(ref_p, ours_p, changed):
                q[c] = p.detach()[c].float()
        changed.clear()
        if edit == "post_hook" and step == 5:  # the last step reads the edits of the one before
            hook.remove()
        for a, b in zip(ours_p, ref_p):
            g = torch.randn(a.shape, generator=gen).to(KERNEL_DEVICE, torch.bfloat16)
            a.grad, b.grad = g, g.float()
        ours.step()
        ref.step()
        if edit == "post_hook":
            with torch.no_grad():
                for q, p, c in zip(ref_p, ours_p, changed):
                    q[c] = p.detach()[c].float()
            changed.clear()
        if not (edit == "toggle" and step in (2, 3)):  # the toggle compares with the params at switch-off
            seen = [p.detach().clone() for p in ours_p]
        if edit == "toggle" and 2 <= step < 4:  # no masters: the bf16 steps are the edit, read at step 4
            with torch.no_grad():
                for q, f in zip(ref_p, frozen):
                    q.copy_(f)
    assert_masters_follow(ours, ours_p, ref_p)
    return "ok"


@pytest.mark.parametrize("edit", ["post_hook", "load_state_dict", "toggle"])
def test_master_weights_honour_edits_of_the_param(edit):
    assert isolated(run_master_edit, edit) == "ok"
