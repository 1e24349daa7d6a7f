"""Log-probabilities (gen_conf.logprobs / top_logprobs) from the engine on a tiny model."""

import asyncio

import pytest
import torch

from executor.engine import Engine, EngineConfig
from executor.model import encode_prompt, load
from executor.errors import RequestError
from executor.validation import Limits, fit_to_context, parse_gen_conf

LIMITS = Limits(context_length=512)


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["chat"]))


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_batch_size=4)).start()
    yield engine
    engine.shutdown()


def request(lm, text, gen_conf):
    prompt_ids = encode_prompt(lm.tokenizer, [{"role": "user", "content": text}])
    return prompt_ids, fit_to_context(parse_gen_conf(gen_conf, LIMITS), len(prompt_ids), LIMITS)


def test_greedy_logprobs_equal_an_in_process_forward_pass(engine, lm):
    gen_conf = {"max_new_tokens": 16, "min_new_tokens": 16, "logprobs": True, "top_logprobs": 3}
    requests = [request(lm, text, gen_conf) for text in ("Hello there", "A longer question about rivers?")]
    answers = asyncio.run(engine.complete(requests))  # batched: two rows of different lengths
    for (prompt_ids, _), (_, last) in zip(requests, answers):
        # min_new_tokens: the scores chosen from have EOS at -inf, as the forward pass below must too
        tokens = [entry.token_id for entry in last.logprobs]
        assert len(tokens) == 16
        with torch.inference_mode():
            logits = lm.model(torch.tensor([list(prompt_ids) + tokens])).logits[0, len(prompt_ids) - 1:-1].float()
        logits = logits.clone()
        logits[:, list(lm.eos_token_ids)] = float("-inf")
        expected = torch.log_softmax(logits, dim=-1)
        for step, entry in enumerate(last.logprobs):
            assert entry.token_id == int(expected[step].argmax()), "greedy: the most likely token"
            assert abs(entry.logprob - float(expected[step, entry.token_id])) < 1e-4
            top = torch.topk(expected[step], 3)
            assert [token for token, _ in entry.top] == top.indices.tolist()
            assert torch.allclose(torch.tensor([value for _, value in entry.top]), top.values, atol=1e-4)


def test_streamed_pieces_carry_the_logprobs_of_their_tokens(engine, lm):
    prompt_ids, settings = request(lm, "Stream it", {"max_new_tokens": 12, "logprobs": True})

    async def pieces():
        return [event async for event in engine.stream(prompt_ids, settings)]

    events = asyncio.run(pieces())
    streamed = [entry for event in events for entry in event.logprobs]
    [(_, last)] = asyncio.run(engine.complete([(prompt_ids, settings)]))
    assert [e.token_id for e in streamed] == [e.token_id for e in last.logprobs]
    assert len(streamed) == events[-1].completion_tokens
    assert all(entry.top == [] for entry in streamed), "top_logprobs 0: no alternatives listed"


def test_without_logprobs_nothing_is_computed_and_top_logprobs_needs_logprobs(engine, lm):
    [(_, last)] = asyncio.run(engine.complete([request(lm, "Plain", {"max_new_tokens": 4})]))
    assert last.logprobs is None
    with pytest.raises(RequestError, match="gen_conf.top_logprobs"):
        parse_gen_conf({"top_logprobs": 2}, LIMITS)
    with pytest.raises(RequestError, match="gen_conf.top_logprobs"):
        parse_gen_conf({"logprobs": True, "top_logprobs": 21}, LIMITS)


def test_sampled_logprobs_are_of_the_scores_after_temperature_and_top_k(engine, lm):
    gen_conf = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": True, "seed": 3, "temperature": 0.7,
                "top_k": 5, "logprobs": True, "top_logprobs": 5}
    prompt_ids, settings = request(lm, "Sample something", gen_conf)
    [(_, last)] = asyncio.run(engine.complete([(prompt_ids, settings)]))
    tokens = [entry.token_id for entry in last.logprobs]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([list(prompt_ids) + tokens])).logits[0, len(prompt_ids) - 1:-1].float()
    scores = logits.clone()
    scores[:, list(lm.eos_token_ids)] = float("-inf")
    scores = scores / 0.7
    kept = torch.topk(scores, 5).indices
    masked = torch.full_like(scores, float("-inf")).scatter(1, kept, scores.gather(1, kept))
    expected = torch.log_softmax(masked, dim=-1)
    for step, entry in enumerate(last.logprobs):
        assert entry.token_id in kept[step].tolist(), "sampled among the top 5"
        assert abs(entry.logprob - float(expected[step, entry.token_id])) < 1e-4
        assert abs(sum(torch.tensor([v for _, v in entry.top]).exp().tolist()) - 1) < 1e-4, "the 5 kept share all"
