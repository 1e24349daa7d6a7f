"""--quantize int4 (executor/int4.py): a GGUF file's 4-bit blocks kept as they are, multiplied by ATen's int4
CPU kernel; the default model's perplexity and facts kept; the default chosen for a GGUF of 4-bit blocks."""


import pytest
import torch
from torch import nn

from executor.gguf_model import default_model_file
from executor.int4 import (GROUP, Int4Linear, Int8RowsLinear, exact_gguf_grid, four_bit_groups, gguf_linear_kinds,
                           quantize_int4)
from executor.model import load
from executor.quantize import choose_quantize
from test_quantize import greedy_answer, held_out_text, perplexity

# Measured 2026-12-07 (AMD EPYC, AVX2): +0.08% against the float32 copy of the same file (the 4-bit levels are
# the file's; what differs is bfloat16 inputs and scales, and the head's 8-bit rows). int8's bound is 3%.
PERPLEXITY_BOUND = 1.01


def gguf_blocks(out_features: int, in_features: int, symmetric: bool, seed: int = 0) -> torch.Tensor:
    """A weight as llama.cpp's reference quantizer leaves it (dequantized): per block of 32, fp16 scales and
    levels 0..15 that include the block's ends (Q4_1: min and max; Q4_0: the signed peak at level 0)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = out_features * in_features // GROUP
    levels = torch.randint(0, 16, (blocks, GROUP), generator=generator).float()
    levels[:, 0], levels[:, 1] = 0, 15
    scales = (torch.rand(blocks, 1, generator=generator) * 0.02 + 1e-3).half().float()
    if symmetric:
        levels[:, 1] = torch.randint(1, 16, (blocks,), generator=generator).float()  # only -8 is sure to appear
        weight = (levels - 8) * scales
    else:
        minimums = (torch.randn(blocks, 1, generator=generator) * 0.05).half().float()
        weight = levels * scales + minimums
    return weight.reshape(out_features, in_features)


@pytest.mark.parametrize("symmetric", [False, True], ids=["Q4_1", "Q4_0"])
def test_a_gguf_blocks_levels_come_back_exactly_and_the_layer_multiplies_by_them(symmetric):
    weight = gguf_blocks(64, 128, symmetric)
    levels, scales, zeros = four_bit_groups(weight, symmetric)
    rebuilt = ((levels.float().reshape(64, -1, GROUP) - 8) * scales[..., None] + zeros[..., None]).reshape(64, 128)
    assert (rebuilt - weight).abs().max() <= 1e-6 * weight.abs().max()
    layer = Int4Linear(_linear(weight), symmetric)
    # bfloat16 scales and zeros: within bfloat16's rounding of each group's ends
    assert (layer.weight_as_float() - weight).abs().max() <= 2 ** -8 * weight.abs().max() * 2
    x = torch.randn(5, 128)
    expected = x @ weight.t()
    assert torch.allclose(layer(x), expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@pytest.mark.parametrize("make", [lambda linear: Int4Linear(linear), Int8RowsLinear], ids=["int4", "int8 rows"])
def test_a_row_computes_the_same_numbers_alone_and_beside_any_other_rows(make):
    torch.manual_seed(0)
    layer = make(_linear(torch.randn(96, 64) * 0.1, torch.randn(96)))
    rows = torch.randn(23, 64)
    together = layer(rows)
    assert all(torch.equal(layer(rows[i:i + 1]), together[i:i + 1]) for i in range(len(rows)))
    assert torch.equal(layer(rows[:7]), together[:7])
    assert layer(rows[None]).shape == (1, 23, 96)


def test_a_layer_the_int4_layout_cannot_hold_keeps_float32():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=136, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.inference_mode():
        before = model(ids).logits
        replaced = quantize_int4(model)
        after = model(ids).logits
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    assert kinds["model.layers.0.mlp.gate_proj"] == "Linear"  # 136 outputs: not in sixteens
    assert kinds["model.layers.0.mlp.down_proj"] == "Linear"  # 136 inputs: not in groups of 32
    assert kinds["model.layers.0.self_attn.q_proj"] == "SharedInputSlice" and kinds["lm_head"] == "Int8RowsLinear"
    assert kinds["model.layers.0.self_attn.q_proj.stack.layer"] == "Int4Linear"
    assert replaced == 5
    print(((after - before).norm() / before.norm()).item())
    assert ((after - before).norm() / before.norm()).item() < 0.15  # 4-bit noise on random weights, not garbage


@pytest.fixture(scope="module")
def models():
    return load(None, quantize="none"), load(None, device="cpu", quantize="int4")


def test_the_default_model_in_int4_keeps_its_perplexity_and_its_facts(models):
    fp32, int4 = models
    text = held_out_text()
    base, quantized = perplexity(fp32, text), perplexity(int4, text)
    assert quantized <= PERPLEXITY_BOUND * base, (base, quantized)
    assert "Paris" in greedy_answer(int4, "What is the capital of France?")
    kinds = {type(module).__name__ for module in int4.model.modules()}
    assert "Linear" not in kinds and {"Int4Linear", "Int8RowsLinear"} <= kinds


def test_auto_keeps_the_default_gguf_in_4_bits_and_says_why(models):
    fp32, _ = models
    kinds = gguf_linear_kinds(default_model_file())
    assert kinds == {"Q4_1": 210}
    assert exact_gguf_grid(kinds) is False and exact_gguf_grid({"Q4_0": 3}) is True
    assert exact_gguf_grid({"Q4_K": 100, "Q6_K": 20}) is None and exact_gguf_grid({"Q4_0": 1, "Q4_1": 1}) is None
    choice, why = choose_quantize(fp32.model, "auto", exact_gguf_grid(kinds))
    assert choice == "int4" and "Q4_1 blocks" in why
    assert choose_quantize(fp32.model, "float32", False)[0] == "none"


def test_layers_that_read_one_input_are_stacked_and_answer_as_they_would_alone():
    """q/k/v and gate/up become one 4-bit matmul each (int4.SharedInput); the logits are those of the same
    layers packed one by one."""
    import copy

    from executor.int4 import SharedInputSlice
    from tiny_models import new_llama

    stacked, separate = new_llama(vocab_size=1024), new_llama(vocab_size=1024)
    quantize_int4(stacked)
    for name, module in list(separate.named_modules()):
        if type(module) is nn.Linear and module is not separate.get_output_embeddings():
            parent, _, child = name.rpartition(".")
            setattr(separate.get_submodule(parent), child, Int4Linear(module))
    separate.lm_head = Int8RowsLinear(copy.deepcopy(separate.lm_head))
    layer = stacked.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    assert {type(m) for m in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj)} \
        == {SharedInputSlice}
    assert attention.q_proj.stack is attention.v_proj.stack and mlp.gate_proj.stack is mlp.up_proj.stack
    assert type(attention.o_proj) is Int4Linear and type(mlp.down_proj) is Int4Linear
    ids = torch.randint(0, 1024, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(stacked(input_ids=ids).logits, separate(input_ids=ids).logits)


def test_the_default_model_in_int4_reads_prefix_cache_hits_in_place(models):
    """int4's layers read bfloat16, so the shared-prefix check allows bfloat16's two roundings (its logits moved
    0.25 of 31 here with a one-block prefix; float32's 1e-3 made every hit a copy)."""
    from executor.attention import NAME, enable_shared_prefix
    from executor.int4 import matmul_input_dtype
    from executor.model_runner import cache_kwarg

    fp32, int4 = models
    assert matmul_input_dtype(int4.model) == torch.bfloat16 and matmul_input_dtype(fp32.model) == torch.float32
    try:
        assert enable_shared_prefix(int4.model, cache_kwarg(int4.model), "cpu", 16) is None
        assert int4.model.config._attn_implementation == NAME
    finally:
        int4.model.set_attn_implementation("sdpa")
