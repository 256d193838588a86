"""init_model on tiny Hugging Face models (GPT-2, Llama, BERT, T5): the rule each layer gets,
each weight's sample moments against that rule (5 standard errors, as in test_init.py), tied
weights initialised once by their owner and still shared, everything else listed and left as
it was, and a finite forward. torch.fx cannot trace these models, so the module structure
decides what follows each layer.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import mechgpu.init as mi
from mechgpu.testing import compare, oracles

transformers = pytest.importorskip("transformers", reason="transformers is not installed: no Hugging Face models")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, DIM, FF = 256, 64, 128
SILU, GELU = ("silu", "kaiming"), ("gelu", "kaiming")
LINEAR, EMBEDDING = ("linear", "xavier"), ("linear", "embedding")


def gpt2(**kwargs):
    config = transformers.GPT2Config(n_layer=2, n_embd=DIM, n_head=4, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, **kwargs)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=DIM, intermediate_size=FF,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(config)


def bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=DIM, intermediate_size=FF,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


def t5(feed_forward_proj):
    config = transformers.T5Config(num_layers=2, d_model=DIM, d_ff=FF, num_heads=4, d_kv=16, vocab_size=VOCAB,
                                   feed_forward_proj=feed_forward_proj, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


# model -> (build, [(layer name pattern, (followed by, rule))] (first match wins), {tied: owner})
MODELS = {
    "gpt2": (gpt2, [(r"\.wte$|\.wpe$", EMBEDDING), (r"mlp\.c_fc$", GELU), (r"c_attn$|c_proj$", LINEAR)],
             {"lm_head": "transformer.wte"}),
    "llama": (llama, [(r"embed_tokens$", EMBEDDING), (r"gate_proj$", SILU),
                      (r"(up|down|[qkvo])_proj$|lm_head$", LINEAR)], {}),
    "bert": (bert, [(r"_embeddings$", EMBEDDING), (r"intermediate\.dense$|transform\.dense$", GELU),
                    (r"query$|key$|value$|output\.dense$", LINEAR)],
             {"cls.predictions.decoder": "bert.embeddings.word_embeddings"}),
    "t5-gated-gelu": (lambda: t5("gated-gelu"), [(r"^shared$|relative_attention_bias$", EMBEDDING),
                                                 (r"wi_0$", GELU), (r"wi_1$|wo$|\.[qkvo]$", LINEAR)],
                      {"encoder.embed_tokens": "shared", "decoder.embed_tokens": "shared", "lm_head": "shared"}),
    "t5-relu": (lambda: t5("relu"), [(r"^shared$|relative_attention_bias$", EMBEDDING),
                                     (r"wi$", ("relu", "kaiming")), (r"wo$|\.[qkvo]$", LINEAR)],
                {"encoder.embed_tokens": "shared", "decoder.embed_tokens": "shared", "lm_head": "shared"}),
}


def expected_role(patterns, name):
    return next((role for pattern, role in patterns if re.search(pattern, name)), None)


def rule_std(module, activation: str, rule: str) -> float:
    """The rule's std from the module's true fans: Conv1D stores its weight [in, out]."""
    if isinstance(module, torch.nn.Embedding):
        return 1 / math.sqrt(module.embedding_dim)
    fan_in, fan_out = module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1]
    gain = mi.calculate_gain(activation)
    return gain / math.sqrt(fan_in) if rule == "kaiming" else gain * math.sqrt(2 / (fan_in + fan_out))


def forward(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    if isinstance(model, transformers.T5ForConditionalGeneration):
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_init_model_on_hugging_face_models(name):
    build, patterns, tied = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    table = mi.init_model(model, generator=torch.Generator().manual_seed(1))

    assert table.tied == tied
    for layer, owner in tied.items():
        assert model.get_submodule(layer).weight is model.get_submodule(owner).weight
    assert table.left_alone == {}
    claimed = {row.name for row in table}
    weight_modules = {n for n, m in model.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, Conv1D)) and n not in tied}
    assert claimed == weight_modules
    for row in table:
        module = model.get_submodule(row.name)
        assert (row.activation, row.rule) == expected_role(patterns, row.name), row.name
        std = rule_std(module, row.activation, row.rule)
        assert row.std == pytest.approx(std), row.name
        weight = module.weight
        padding = getattr(module, "padding_idx", None)
        if padding is not None:
            assert (weight[padding] == 0).all()
            weight = torch.cat([weight[:padding], weight[padding + 1:]])
        errs = compare.sample_errors(weight, oracles.Target(0.0, std, oracles.NORMAL_KURTOSIS), row.name)
        assert errs.passed, "; ".join(errs.failures)
        if getattr(module, "bias", None) is not None:
            assert (module.bias == 0).all(), row.name

    # what it did not fill is exactly what it says it left: the norms, still poisoned
    for n, p in model.named_parameters():
        assert torch.isnan(p).all() == (n in table.untouched), n
    assert table.untouched and all("Norm" in type(model.get_submodule(n.rpartition(".")[0])).__name__
                                   for n in table.untouched)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in table.untouched:
                p.fill_(0.0 if n.endswith("bias") else 1.0)
        assert torch.isfinite(forward(model)).all()


def test_gpt2_tied_embedding_is_initialised_once_by_its_owner():
    """The issue: only the tied lm_head was re-initialised (by its own rule, through the shared
    weight, so wte's std moved from 0.02), and the Conv1D layers were left alone."""
    model = gpt2()
    wte = model.transformer.wte.weight
    conv1d = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}
    table = mi.init_model(model, generator=torch.Generator().manual_seed(2))
    assert model.lm_head.weight is wte and model.transformer.wte.weight is wte
    assert "lm_head" not in {row.name for row in table} and table.tied == {"lm_head": "transformer.wte"}
    std = 1 / math.sqrt(DIM)  # the embedding rule; lm_head's Xavier would give sqrt(2 / (VOCAB + DIM))
    errs = compare.sample_errors(wte, oracles.Target(0.0, std, oracles.NORMAL_KURTOSIS), "wte")
    assert errs.passed, "; ".join(errs.failures)
    assert len(conv1d) == 8
    for n, before in conv1d.items():
        assert not torch.equal(before, model.get_submodule(n).weight), f"{n} left as it was"


def test_activation_without_a_known_gain_is_left_alone_and_listed():
    model = gpt2(activation_function="quick_gelu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = mi.init_model(model)
    c_fc = [f"transformer.h.{i}.mlp.c_fc" for i in range(2)]
    assert table.left_alone == {n: "followed by QuickGELUActivation, an activation with no known gain" for n in c_fc}
    for n in c_fc:
        assert torch.equal(before[f"{n}.weight"], model.get_submodule(n).weight)
        assert torch.equal(before[f"{n}.bias"], model.get_submodule(n).bias)
        assert f"{n}.weight" in table.untouched
    assert {row.name: row.activation for row in table}["transformer.h.0.mlp.c_proj"] == "linear"
    assert "left alone: transformer.h.0.mlp.c_fc: followed by QuickGELUActivation" in str(table)
