"""The engine's guarantees in every precision a user runs, on the CPU, through both attention paths (torch's CPU
flash kernel, and the plain products other devices use, forced here): prefix-cache hits read in place (never
copied), rows sharing a prefix (cascade attention), speculation, a KV pool small enough to preempt.

fp32 answers are those of ``model.generate``, token for token. In bfloat16 and float16 an answer may leave the
reference only where two tokens were a near tie (their float32 logits closer than the dtype's rounding can
move them): a batch, a shared prefix read in place and a verify step add in another order than one plain pass,
and half precision keeps ~3 decimal digits. Past that point both continue from different tokens, so the check
stops there."""

import asyncio

import pytest
import torch

from executor import attention
from executor.engine import Engine, EngineConfig
from executor.kv_cache import probe_layer_shapes
from executor.model import encode_prompt
from executor.validation import Limits, fit_to_context, parse_gen_conf
from tiny_models import build_tokenizer, new_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SYSTEM = ("You answer questions about the passages below. Passage one: the river runs north past the old mill. "
          "Passage two: the mill was built of stone in a dry summer. Passage three: the town grew around it. ")
QUESTIONS = ["What does passage one say?", "Who built the mill?", "Numbers: 1 2 3 1 2 3 1 2", "Hello, how are you?",
             "The quick brown fox jumps over the lazy dog.", "Where does the river run?"]
NEW_TOKENS = 80  # past the 64 answer tokens admission sets aside: rows outgrow the pool


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def reference_model(tokenizer):
    """A 2-layer Llama with grouped-query attention, in float32: the truth near ties are judged by."""
    model = new_llama(vocab_size=len(tokenizer), seed=3)
    with torch.no_grad():  # logits spread like a trained model's (random ones are nearly flat: all near ties)
        model.lm_head.weight.mul_(40)
    return model


@pytest.fixture(params=[True, False], ids=["cpu-kernel", "matmul"])
def attention_path(request, monkeypatch):
    monkeypatch.setattr(attention, "CPU_KERNEL", request.param)
    return request.param


def model_in(reference_model, dtype):
    import copy

    model = copy.deepcopy(reference_model).to(dtype)
    model.set_attn_implementation("sdpa")
    return model


def prompts(tokenizer) -> list:
    return [encode_prompt(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in QUESTIONS]


def engine_answers(engine, prompt_ids: list) -> list:
    """Every prompt at once through ``engine``: the token ids of each answer."""
    limits = Limits(context_length=engine.max_context)

    async def one(ids):
        settings = fit_to_context(parse_gen_conf({"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}, limits),
                                  len(ids), limits)
        return [t for event in [e async for e in engine.stream(ids, settings)] for t in event.token_ids]

    async def everyone():
        return await asyncio.gather(*(one(ids) for ids in prompt_ids))

    return asyncio.run(everyone())


@torch.inference_mode()
def generate(model, ids: list) -> list:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def first_difference_is_a_near_tie(reference_model, dtype, prompt: list, answer: list, expected: list) -> bool:
    """True when ``answer`` equals ``expected``, or first leaves it where the two tokens' float32 logits are
    closer than a few roundings of ``dtype`` (relative to the largest logit)."""
    for position, (got, want) in enumerate(zip(answer, expected)):
        if got != want:
            logits = reference_model(torch.tensor([prompt + expected[:position]])).logits[0, -1]
            gap = abs(logits[got] - logits[want]).item()
            return gap <= 8 * torch.finfo(dtype).eps * logits.abs().max().item()
    return len(answer) == len(expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_hits_read_in_place_speculation_and_preemption_hold_in_every_precision(reference_model, tokenizer, dtype,
                                                                               attention_path):
    model = model_in(reference_model, dtype)
    prompt_ids = prompts(tokenizer)
    expected = [generate(model, ids) for ids in prompt_ids]
    per_token = sum(s.bytes_per_token for s in probe_layer_shapes(model, torch.device("cpu")))
    # 280 tokens of keys and values: six rows (the passages read in place, ~20 own tokens + 24) outgrow them.
    engine = Engine(model, tokenizer, [tokenizer.eos_token_id],
                    EngineConfig(max_batch_size=8, prefill_chunk=32, speculate=4, kv_cache_memory=432 * per_token))
    assert engine.kv.sharing, "hits are read in place in this precision and attention path"
    shared_pass, rows_read_in_place = engine.kv.shared_pass, []

    def counting(shared):
        rows_read_in_place.append(sum(prefix is not None for prefix in shared))
        return shared_pass(shared)

    engine.kv.shared_pass = counting
    engine.start()
    try:
        warm = engine_answers(engine, prompt_ids[:1])  # a first answer: its prompt's blocks are cached
        answers = engine_answers(engine, prompt_ids)
    finally:
        engine.shutdown()
    assert all(len(answer) == NEW_TOKENS for answer in answers)
    if dtype == torch.float32:
        assert answers == expected and warm[0] == expected[0]
    else:
        for ids, answer, want in zip(prompt_ids, answers, expected):
            assert first_difference_is_a_near_tie(reference_model, dtype, ids, answer, want), (answer, want)
        assert sum(answer == want for answer, want in zip(answers, expected)) >= len(answers) // 2
    assert max(rows_read_in_place) >= 2, "rows sharing the passages read them in place together"
    # A row alone in the engine copies its hit once instead (kv_manager.stage): the last one to resume may.
    assert engine.kv.batch.copied_bytes["hit"] <= 144 * engine.kv.batch.token_bytes
    assert engine.preemptions > 0, "the pool was short: rows waited again"
    assert engine.kv.prefix.pinned_blocks == 0


def test_a_request_no_row_can_hold_is_refused_at_once(reference_model, tokenizer):
    """The Executor's limits keep such requests out (they follow the engine's max_context); a caller of the
    engine itself gets the error too, where it spun in admission for good before (a prompt longer than a row of
    this 200-token pool)."""
    model = model_in(reference_model, torch.float32)
    per_token = sum(s.bytes_per_token for s in probe_layer_shapes(model, torch.device("cpu")))
    engine = Engine(model, tokenizer, [tokenizer.eos_token_id],
                    EngineConfig(max_batch_size=8, prefill_chunk=32, speculate=4, kv_cache_memory=200 * per_token))
    engine.start()
    limits = Limits(context_length=256)  # the model's, not the pool's: as a caller that skipped the engine's
    prompt_ids = prompts(tokenizer)[0]

    async def ask():
        settings = fit_to_context(parse_gen_conf({"max_new_tokens": 24}, limits), len(prompt_ids), limits)
        return [event async for event in engine.stream(prompt_ids, settings)]

    try:
        assert len(prompt_ids) + 24 > engine.max_context
        with pytest.raises(ValueError, match=f"= {len(prompt_ids) + 24} does not fit the KV cache's rows"):
            asyncio.run(asyncio.wait_for(ask(), 30))
    finally:
        engine.shutdown()
