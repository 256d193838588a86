"""mechgpu inside other libraries: Hugging Face transformers (and timm) activations in
``swap_activations``, HF ``Trainer``, Accelerate and Lightning, and the README's Integrations
section, run as written.

Models are built from tiny configs (nothing is downloaded); on CPU the kernels run in triton's
interpreter. The activation oracles are the originals themselves, evaluated in float64, with the
case database's fp32 tolerances (``mechgpu.testing``).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from mechgpu.kernels import activation as kernels

import mechgpu.nn as mnn
import mechgpu.optim as mo
from mechgpu.testing import activation_cases, compare
from mechgpu.train import ActivationMeter

# The test extra installs these three; CI must run these tests, while a machine without a package
# registry (the lent GPU box) skips them with importorskip's reason.
_need = importlib.import_module if os.environ.get("CI") else pytest.importorskip
transformers = _need("transformers")
L = _need("lightning")
_need("accelerate")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state (HF Trainer makes an Accelerator too): reset it
    around each test, so each sets up its own precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------------
# activation modules: each original against its mechgpu twin
# ----------------------------------------------------------------------------------
DB = {a.name: a for a in activation_cases.ACTIVATIONS}
OURS_IN_DB = {mnn.SiLU: "silu", mnn.ReLU: "relu", mnn.LeakyReLU: "leaky_relu", mnn.Sigmoid: "sigmoid",
              mnn.Tanh: "tanh"}
# the originals' float64 evaluations cancel in their tails (1 + erf, 1 + tanh) to about 1e-15
ORACLE_ATOL = 1e-14


def database_activation(module: torch.nn.Module) -> activation_cases.Activation:
    """The case database's entry for one of our modules: its fp32 tolerances apply."""
    if isinstance(module, mnn.GELU):
        return DB["gelu" if module.approximate == "none" else "gelu_tanh"]
    return DB[OURS_IN_DB[type(module)]]


def float64_value_and_grad(module: torch.nn.Module, x64: torch.Tensor, g64: torch.Tensor):
    x64 = x64.detach().clone().requires_grad_()
    y = module(x64)
    (dx,) = torch.autograd.grad(y, x64, g64)
    return y.detach(), dx


def assert_same_function(ours: torch.nn.Module, original: torch.nn.Module) -> None:
    """ours in fp32 against the original in float64, forward and backward, on [-20, 20] and
    N(0, 9) samples: within the database's fp32 ulps for our activation, plus how much the
    original's value moves when x moves by one fp32 ulp (the input rounding that fp32
    intermediates carry, as the database allows where it is ill-conditioned). Sigmoid's and
    tanh's backward, which read the saved output, as the database checks them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-20, 20, 2001), 3 * torch.randn(2000, generator=gen)]).to(KERNEL_DEVICE)
    g = torch.randn(x.shape, generator=gen).to(KERNEL_DEVICE)
    x.requires_grad_()
    y = ours(x)
    (dx,) = torch.autograd.grad(y, x, g)
    reference = copy.deepcopy(original).double()
    x64, g64 = x.detach().double(), g.double()
    y64, dx64 = float64_value_and_grad(reference, x64, g64)
    moved = [float64_value_and_grad(reference, x64 * (1 + sign * compare.FP32_ULP), g64) for sign in (1, -1)]
    act = database_activation(ours)
    if act.name in kernels.OUTPUT_KINDS:  # the backward reads the saved output, rounded as torch's does
        dx64 = act.backward64(g64, x64, y.detach().double())
    for direction, got, want, allowance in (("forward", y, y64, sum((m[0] - y64).abs() for m in moved)),
                                            ("backward", dx, dx64, sum((m[1] - dx64).abs() for m in moved))):
        rtol = activation_cases.activation_ulps(act, torch.float32, direction) * compare.eps(torch.float32)
        err = compare.measure(got, want, rtol=rtol, atol=ORACLE_ATOL, dtype=torch.float32, extra=allowance,
                            what=f"{type(original).__name__} {direction}")
        assert err.passed, err.failures


# every ACT2FN entry that has a twin: (our class, approximate); the others must be left alone
HF_TWINS = {
    "gelu": (mnn.GELU, "none"), "gelu_python": (mnn.GELU, "none"),
    "gelu_new": (mnn.GELU, "tanh"), "gelu_fast": (mnn.GELU, "tanh"), "gelu_accurate": (mnn.GELU, "tanh"),
    "gelu_pytorch_tanh": (mnn.GELU, "tanh"), "gelu_python_tanh": (mnn.GELU, "tanh"),
    "silu": (mnn.SiLU, None), "swish": (mnn.SiLU, None), "relu": (mnn.ReLU, None),
    "leaky_relu": (mnn.LeakyReLU, None), "sigmoid": (mnn.Sigmoid, None), "tanh": (mnn.Tanh, None),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter overflow in exp of large arguments
@pytest.mark.parametrize("key", sorted(ACT2FN))
def test_every_act2fn_entry_is_swapped_exactly_or_reported(key):
    original = ACT2FN[key]  # a new module on each lookup
    model = torch.nn.Sequential(copy.deepcopy(original)).to(KERNEL_DEVICE)
    report = mnn.swap_activations(model)
    if key not in HF_TWINS:
        assert dict(report) == {} and report.left_alone == {"0": type(original).__name__}
        assert type(model[0]) is type(original)
        return
    cls, approximate = HF_TWINS[key]
    assert set(report) == {"0"} and report.left_alone == {} and type(model[0]) is cls
    if approximate is not None:
        assert model[0].approximate == approximate
    if type(original).__module__ != "transformers.activations":
        return  # torch's own classes: their twins' numerics are tests/test_activations.py's
    assert_same_function(model[0], original.to(KERNEL_DEVICE))


def test_act2fn_covers_the_transformers_classes():
    """The entries above reach the transformers classes that swap_activations names."""
    names = {type(ACT2FN[key]).__name__ for key in HF_TWINS if key in ACT2FN}
    assert {"GELUActivation", "NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation"} <= names
    assert names & {"GELUTanh", "PytorchGELUTanh"} and "QuickGELUActivation" not in names


class _MyReLU(torch.nn.ReLU):
    pass


def test_left_alone_lists_activations_without_a_twin():
    from transformers.activations import ClippedGELUActivation, QuickGELUActivation

    quick = QuickGELUActivation()
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), quick, torch.nn.Sequential(torch.nn.Hardswish(), _MyReLU(), mnn.ReLU()), quick,
        ClippedGELUActivation(-10, 10), torch.nn.Softmax(dim=-1), torch.nn.Mish(), torch.nn.GELU(),
    )
    report = mnn.swap_activations(model)
    assert set(report) == {"7"} and type(model[7]) is mnn.GELU
    assert report.left_alone == {"1": "QuickGELUActivation", "2.0": "Hardswish", "2.1": "_MyReLU",
                                 "3": "QuickGELUActivation", "4": "ClippedGELUActivation", "6": "Mish"}
    assert model[1] is model[3] is quick
    assert "left_alone={'1': 'QuickGELUActivation'" in repr(report)


def test_timm_activations():
    timm_acts = pytest.importorskip("timm.layers.activations")  # not in the test extra: it needs torchvision
    model = torch.nn.Sequential(
        timm_acts.GELU(), timm_acts.GELUTanh(), timm_acts.Swish(inplace=True), timm_acts.Sigmoid(),
        timm_acts.Tanh(), timm_acts.Sigmoid(inplace=True), timm_acts.QuickGELU(), timm_acts.HardSwish(),
    )
    originals = copy.deepcopy(model)
    report = mnn.swap_activations(model)
    assert [type(m) for m in model[:5]] == [mnn.GELU, mnn.GELU, mnn.SiLU, mnn.Sigmoid, mnn.Tanh]
    assert model[0].approximate == "none" and model[1].approximate == "tanh" and model[2].inplace
    assert report.left_alone == {"5": "Sigmoid", "6": "QuickGELU", "7": "HardSwish"}
    for ours, original in zip(model[:5], originals[:5]):
        if isinstance(ours, mnn.SiLU):
            ours, original = mnn.SiLU(), timm_acts.Swish()  # their in-place forms write into x
        assert_same_function(ours.to(KERNEL_DEVICE), original)


# ----------------------------------------------------------------------------------
# Hugging Face models: the swapped model computes what the original does
# ----------------------------------------------------------------------------------
INIT_STD = 0.3  # pre-activations of order 1, where erf and tanh GELU differ (at 0.02 they agree to 1e-7)


def tiny_gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
        initializer_range=INIT_STD))


def tiny_bert(hidden_act="gelu"):
    return transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=32, hidden_act=hidden_act, initializer_range=INIT_STD))


def tiny_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=32, initializer_range=INIT_STD))


def tiny_t5():
    """T5's feed-forward with dense_act_fn="relu": Linear, ReLU, dropout, Linear."""
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.1,
        feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0))


HF_MODELS = {  # model, its activations' twin, and where they are (every one has a twin)
    "gpt2": (tiny_gpt2, mnn.GELU("tanh"), {"transformer.h.0.mlp.act", "transformer.h.1.mlp.act"}),
    "bert": (tiny_bert, mnn.GELU(), {"bert.encoder.layer.0.intermediate.intermediate_act_fn",
                                     "bert.encoder.layer.1.intermediate.intermediate_act_fn",
                                     "cls.predictions.transform.transform_act_fn"}),
    "llama": (tiny_llama, mnn.SiLU(), {"model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"}),
}


def loss_logits_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_model_outputs_and_grads_unchanged_by_the_swap(name):
    make, twin, where = HF_MODELS[name]
    torch.manual_seed(0)
    original = make().to(KERNEL_DEVICE).eval()  # eval: no dropout
    swapped = copy.deepcopy(original)
    report = mnn.swap_activations(swapped)
    assert set(report) == where and report.left_alone == {}
    assert all(repr(swapped.get_submodule(w)) == repr(twin) and type(swapped.get_submodule(w)) is type(twin)
               for w in where)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    logits, grads = loss_logits_and_grads(original, ids)
    logits_swapped, grads_swapped = loss_logits_and_grads(swapped, ids)
    # atol: 1e-5 of the largest logit or gradient (BERT's key biases get rounding noise only:
    # attention's softmax does not depend on them)
    torch.testing.assert_close(logits_swapped, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    assert grads_swapped.keys() == grads.keys()
    largest = max(grad.abs().max().item() for grad in grads.values())
    for key, grad in grads.items():
        torch.testing.assert_close(grads_swapped[key], grad, rtol=1e-5, atol=1e-5 * largest,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_hf_model_with_an_activation_without_a_twin_is_reported():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, activation_function="quick_gelu"))
    report = mnn.swap_activations(model)
    assert dict(report) == {}
    assert report.left_alone == {f"transformer.h.{i}.mlp.act": "QuickGELUActivation" for i in range(2)}


class _SubclassedLayerNorm(torch.nn.LayerNorm):
    pass


def edge_cases_model():
    """Where the rule's edges lie: a LayerNorm subclass under a plain name, RMSNorms named like a
    norm and not, "norm" inside a longer name, a bias-free norm, tied weights and a frozen bias."""
    model = torch.nn.ModuleDict({
        "ln": _SubclassedLayerNorm(4), "final_norm": torch.nn.RMSNorm(4), "scale": torch.nn.RMSNorm(4),
        "normalizer": torch.nn.Linear(4, 4), "blocks": torch.nn.Sequential(torch.nn.LayerNorm(4, bias=False)),
        "embed": torch.nn.Embedding(8, 4), "head": torch.nn.Linear(4, 8)})
    model["head"].weight = model["embed"].weight
    model["normalizer"].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert, tiny_llama, tiny_t5, edge_cases_model],
                         ids=["gpt2", "bert", "llama", "t5", "edge-cases"])
def test_weight_decay_groups_are_transformers_trainers(make):
    """The groups transformers' Trainer.create_optimizer builds from get_decay_parameter_names."""
    model = make()
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    theirs = [[p for name, p in trainable if name in decay], [p for name, p in trainable if name not in decay]]
    ours = mo.weight_decay_groups(model, 0.1)
    assert [g["weight_decay"] for g in ours] == [0.1, 0.0]
    for group, expected in zip(ours, theirs):
        assert [id(p) for p in group["params"]] == [id(p) for p in expected]
    assert all(theirs), "each model has params in both groups"


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward over one training forward (parameters excluded)."""
    torch.manual_seed(1)  # the same dropout masks each time
    with ActivationMeter(model) as meter:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad()
    return meter.bytes


def mask_saving(numel: int) -> int:
    """fp32 bytes torch's ReLU saves minus those of our bit mask (whole int32 words)."""
    return 4 * numel - 4 * math.ceil(numel / 32)


def test_relu_mask_saves_memory_in_t5():
    """ReLU, then dropout: torch's ReLU saves its output, which nothing else keeps; ours saves
    1 bit per element. The README quotes these figures."""
    torch.manual_seed(0)
    model = tiny_t5().to(KERNEL_DEVICE).train()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    before = saved_activation_bytes(model, ids)
    report = mnn.swap_activations(model)
    after = saved_activation_bytes(model, ids)
    assert len(report) == 4 and all(type(m) is torch.nn.ReLU for m in report.values())  # 2 + 2 layers
    assert before - after == 4 * mask_saving(2 * 8 * 64)
    assert (before, after) == (200_836, 184_964)


def test_relu_mask_adds_to_memory_where_a_linear_follows():
    """BERT with ReLU: the next Linear (in the head: LayerNorm) saves the ReLU's output anyway,
    so the mask is extra."""
    torch.manual_seed(0)
    model = tiny_bert("relu").to(KERNEL_DEVICE).train()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    before = saved_activation_bytes(model, ids)
    report = mnn.swap_activations(model)
    after = saved_activation_bytes(model, ids)
    mask_bytes = [4 * math.ceil(2 * 8 * width / 32) for width in (64, 64, 32)]  # 2 layers' FFNs, the head
    assert len(report) == 3 and after - before == sum(mask_bytes)


# ----------------------------------------------------------------------------------
# Lightning mixed precision: clipping in the optimizer's step
# ----------------------------------------------------------------------------------
MAX_NORM = 0.05  # below every grad norm here, so each step clips
LR = 1e-2


class _Regressor(L.LightningModule):
    """A small regression whose every step is replayed by torch: the same grads (unscaled),
    torch's clip_grad_norm_ and torch's AdamW, on a shadow copy of the params."""

    def __init__(self, optimizer_options: dict):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), mnn.GELU(), torch.nn.Linear(32, 1))
        self.optimizer_options = optimizer_options
        self.shadow = [p.detach().clone().requires_grad_() for p in self.net.parameters()]  # not registered: CPU
        self.shadow_opt = torch.optim.AdamW(self.shadow, lr=LR, foreach=False)
        self.torch_norms, self.losses, self.output_dtypes = [], [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.output_dtypes.append(out.dtype)
        loss = F.mse_loss(out.float(), y)
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):
        scaler = self.trainer.precision_plugin.scaler
        scale = scaler.get_scale() if scaler is not None else 1.0  # 16-mixed: Lightning leaves them scaled
        for shadow, p in zip(self.shadow, self.net.parameters()):
            shadow.grad = (p.grad.detach() / scale).cpu()
        self.torch_norms.append(torch.nn.utils.clip_grad_norm_(self.shadow, MAX_NORM))
        self.shadow_opt.step()

    def configure_optimizers(self):
        return mo.AdamW(self.net.parameters(), lr=LR, **self.optimizer_options)


def regression_data(batches: int = 6):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8 * batches, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen) + 0.5
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def lightning_trainer(tmp_path, **kwargs):
    return L.Trainer(accelerator="gpu" if KERNEL_DEVICE == "cuda" else "cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_mixed_precision_with_clipping_in_the_step(tmp_path, precision):
    """The README's recipe: max_grad_norm on the optimizer, no gradient_clip_val. Each step
    equals torch's clip_grad_norm_ then AdamW step on the same grads. Lightning's own
    MixedPrecision plugin runs it; Trainer(precision=...) builds the same plugin (on a CPU it
    turns 16-mixed into bf16-mixed, so the GradScaler is passed in here)."""
    scaler = torch.amp.GradScaler(KERNEL_DEVICE, init_scale=1024.0) if precision == "16-mixed" else None
    module = _Regressor({"max_grad_norm": MAX_NORM})
    trainer = lightning_trainer(tmp_path, max_steps=6, plugins=[MixedPrecision(precision, KERNEL_DEVICE, scaler)])
    trainer.fit(module, regression_data())
    opt = trainer.optimizers[0]
    assert type(opt) is mo.AdamW and len(module.torch_norms) == 6
    assert set(module.output_dtypes) == {torch.bfloat16 if precision == "bf16-mixed" else torch.float16}
    assert all(opt.state[p]["step"].item() == 6 for p in module.net.parameters())  # no step skipped
    assert all(norm > MAX_NORM for norm in module.torch_norms)  # every step clipped
    torch.testing.assert_close(opt.last_grad_norm.cpu(), module.torch_norms[-1], rtol=1e-5, atol=0)
    for ours, reference in zip(module.net.parameters(), module.shadow):
        torch.testing.assert_close(ours.detach().cpu(), reference.detach(), rtol=compare.FP32_PARAM_RTOL,
                                   atol=compare.FP32_PARAM_ATOL)
    assert module.losses[-1] < 0.8 * module.losses[0]


def test_lightning_refuses_gradient_clip_val_with_mixed_precision(tmp_path):
    """Why the recipe: Lightning refuses its own clipping for optimizers that unscale in their step."""
    trainer = lightning_trainer(tmp_path, max_steps=1, precision="bf16-mixed", gradient_clip_val=1.0)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        trainer.fit(_Regressor({}), regression_data())


# ----------------------------------------------------------------------------------
# the README's Integrations section runs as written
# ----------------------------------------------------------------------------------
def integrations_blocks() -> list[str]:
    text = README.read_text()
    section = re.search(r"^## Integrations\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Integrations' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def assert_decay_groups(opt, model, weight_decay: float, no_decay) -> None:
    """``weight_decay_groups``' two groups: the params named by ``no_decay(name)`` without decay."""
    decayed, plain = opt.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (weight_decay, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in plain["params"]) == sorted(n for n in names.values() if no_decay(n))
    assert len(decayed["params"]) + len(plain["params"]) == len(names)


def check_hf_trainer(ns):
    assert ns["report"].left_alone == {} and len(ns["report"]) == 2
    assert_decay_groups(ns["opt"], ns["model"], 0.1, lambda name: ".ln_" in name or name.endswith(".bias"))
    assert {type(m) for m in ns["model"].modules()} & {mnn.GELU}
    assert all(ns["opt"].state[p]["step"].item() == 4 for p in ns["model"].parameters())
    assert ns["opt"].last_grad_norm is not None and Path("out").is_dir()


def check_accelerate(ns):
    assert type(ns["opt"].optimizer) is mo.AdamW
    assert_decay_groups(ns["opt"].optimizer, ns["model"], 0.01, lambda name: name.endswith(".bias"))
    assert all(s["step"].item() == 4 for s in ns["opt"].optimizer.state.values())  # 8 batches, 2 per step


def check_lightning(ns):
    opt = ns["trainer"].optimizers[0]
    assert type(opt) is mo.AdamW and ns["trainer"].global_step == 8 and opt.last_grad_norm is not None
    assert_decay_groups(opt, ns["trainer"].lightning_module, 0.01, lambda name: name.endswith(".bias"))


README_CHECKS = [check_hf_trainer, check_accelerate, check_lightning]


@pytest.mark.parametrize("index", range(len(README_CHECKS)), ids=[c.__name__[6:] for c in README_CHECKS])
def test_readme_integrations_run_as_written(index, tmp_path, monkeypatch):
    blocks = integrations_blocks()
    assert len(blocks) == len(README_CHECKS)
    monkeypatch.chdir(tmp_path)  # whatever the blocks write lands here
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ns = {"__name__": "readme_integrations"}
    exec(compile(blocks[index], f"README.md Integrations block {index + 1}", "exec"), ns)
    README_CHECKS[index](ns)
