"""--quantize int8 (executor/quantize.py): int8 Linear weights that keep the default model's perplexity."""

import math
from pathlib import Path

import pytest
import torch

from executor.errors import ModelLoadError
from executor.model import load
from executor.quantize import BODY_GRID, CALIBRATION_TEXT, HEAD_GRID, Int8Linear, check_quantize

README = Path(__file__).resolve().parents[2] / "README.md"


def held_out_text() -> str:
    """A README paragraph (about 660 tokens), never seen by the calibration."""
    readme = README.read_text()
    start = readme.index("Every request, `/chat` prompt or `/stream`, goes through one engine")
    return readme[start:readme.index("### Batch jobs")].strip()


@torch.inference_mode()
def perplexity(lm, text: str) -> float:
    """exp of the mean per-token negative log-likelihood of ``text``, one forward pass."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    logits = lm.model(input_ids=ids).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


@torch.inference_mode()
def greedy_answer(lm, question: str, new_tokens: int = 12) -> str:
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = lm.model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def models():
    return load(None), load(None, device="cpu", quantize="int8")


def test_the_default_model_in_int8_keeps_its_perplexity_and_its_facts(models):
    fp32, int8 = models
    text = held_out_text()
    assert text[:200] not in CALIBRATION_TEXT
    base, quantized = perplexity(fp32, text), perplexity(int8, text)
    assert quantized <= 1.02 * base, (base, quantized)  # measured: +1.0% (91.3 -> 92.2), head included
    assert "Paris" in greedy_answer(int8, "What is the capital of France?")


def test_every_linear_and_the_head_hold_int8_weights(models):
    _, int8 = models
    model = int8.model
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in model.modules() if isinstance(m, Int8Linear)]
    head = model.get_output_embeddings()
    assert len(quantized) == 30 * 7 + 1 and head in quantized and int8.vocab_size == 49152
    body = quantized[0].int8_weight()
    assert body.dtype == torch.int8 and body.shape == (quantized[0].out_features, quantized[0].in_features)
    assert body.abs().max() == 63 and not quantized[0].reduce_range  # each output channel uses its whole range
    assert head.int8_weight().abs().max() == 127 and head.reduce_range
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the prompt's embeddings stay exact


@pytest.mark.parametrize("grid", [BODY_GRID, HEAD_GRID])
def test_full_scale_products_do_not_saturate_on_any_cpu(grid):
    """fbgemm without VNNI adds pairs of uint8 x int8 products in 16 bits: 8-bit weights times 8-bit inputs
    at full scale come out at about half (32.4 for 64 here, on an AVX2 CPU); both grids give each pair 15 bits."""
    linear = torch.nn.Linear(64, 8, bias=False)
    torch.nn.init.ones_(linear.weight)
    layer = Int8Linear(linear, grid=grid)
    for rows in (torch.ones(1, 64), torch.ones(3, 64)):
        assert torch.allclose(layer(rows), linear(rows), rtol=0.01), layer(rows)


def test_int8_is_refused_on_cuda_and_bad_values_name_the_allowed_ones():
    check_quantize("none", "cuda")
    check_quantize("int8", "cpu")
    with pytest.raises(ValueError, match="quantize=int8 is for CPUs .* --dtype bfloat16 or float16"):
        check_quantize("int8", "cuda")
    with pytest.raises(ValueError, match=r"quantize='int4' is not allowed: use one of none, int8"):
        check_quantize("int4")


def test_load_refuses_int8_on_a_cuda_device_before_loading():
    with pytest.raises(ModelLoadError, match="quantize=int8 is for CPUs"):
        load("/no/such/model", device="cuda", quantize="int8")
