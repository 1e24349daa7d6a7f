"""Continuations (request migration): the engine takes an answer's token ids that another replica already sent
and sends exactly the pieces an uninterrupted run would have sent after them, on a tiny real model."""

import asyncio
import json
from dataclasses import replace

import pytest

from executor.detok import sent_text
from executor.engine import Engine, EngineConfig
from executor.errors import RequestError
from executor.grammar import Grammars
from executor.model import encode_prompt, load
from executor.validation import Limits, fit_to_context, parse_gen_conf

PROMPT = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["chat"]))


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_batch_size=4, prefill_chunk=16))
    yield engine.start()
    engine.shutdown()


def limits(lm):
    return Limits(context_length=lm.context_length, vocab_size=lm.vocab_size)


def grammars(lm):
    if not hasattr(lm, "grammars"):  # compiled once per model (the tokenizer's vocabulary for llguidance)
        lm.grammars = Grammars(lm.tokenizer, lm.vocab_size, lm.eos_token_ids)
    return lm.grammars


def events(engine, lm, prompt_ids, gen_conf):
    settings = fit_to_context(parse_gen_conf(gen_conf, limits(lm)), len(prompt_ids), limits(lm))
    if settings.response_format is not None:  # a fresh grammar per request, as the Executor compiles it
        settings = replace(settings, grammar=grammars(lm).row_grammar(settings.response_format))

    async def go():
        return [event async for event in engine.stream(prompt_ids, settings)]

    return asyncio.run(go())


def continued_at_every_piece(engine, lm, gen_conf):
    """(uninterrupted events, [(cut, sent text + the continuation's text, the continuation's last event)])."""
    prompt_ids = encode_prompt(lm.tokenizer, PROMPT)
    whole = events(engine, lm, prompt_ids, {**gen_conf, "continuation": []})
    results = []
    for cut in range(1, len(whole)):
        sent = whole[:cut]
        ids = [token for event in sent for token in event.token_ids]
        rest = events(engine, lm, prompt_ids, {**gen_conf, "continuation": ids})
        results.append((cut, "".join(e.text for e in sent + rest), rest[-1]))
    return whole, results


@pytest.mark.parametrize("gen_conf", [
    {"max_new_tokens": 30},
    {"max_new_tokens": 30, "min_new_tokens": 30, "repetition_penalty": 1.5},
    {"max_new_tokens": 30, "do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 7,
     "frequency_penalty": 0.5},
], ids=["greedy", "greedy-penalised", "seeded"])
def test_a_continuation_from_any_piece_sends_exactly_the_rest(engine, lm, gen_conf):
    whole, results = continued_at_every_piece(engine, lm, gen_conf)
    text = "".join(e.text for e in whole)
    assert len(whole) > 5 and text
    for cut, joined, last in results:
        assert joined == text, f"cut after piece {cut}"
        assert (last.finish_reason, last.completion_tokens) == (whole[-1].finish_reason, whole[-1].completion_tokens)


def test_a_continued_json_answer_resumes_its_grammar_where_it_was(engine, lm):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 130}},
              "required": ["name", "age"], "additionalProperties": False}
    gen_conf = {"max_new_tokens": 40, "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "person", "schema": schema}}}
    whole, results = continued_at_every_piece(engine, lm, gen_conf)
    text = "".join(e.text for e in whole)
    assert len(whole) > 3 and text.startswith("{")
    if whole[-1].finish_reason == "stop":
        json.loads(text)
    for cut, joined, last in results:
        assert joined == text, f"cut after piece {cut}"
        assert last.finish_reason == whole[-1].finish_reason


def test_a_stop_string_held_back_at_the_cut_is_found_by_the_continuation(engine, lm):
    prompt_ids = encode_prompt(lm.tokenizer, PROMPT)
    free_events = events(engine, lm, prompt_ids, {"max_new_tokens": 40})
    free = "".join(e.text for e in free_events)
    stop = straddling_stop([e.text for e in free_events])
    gen_conf = {"max_new_tokens": 40, "stop": [stop]}
    whole, results = continued_at_every_piece(engine, lm, gen_conf)
    assert "".join(e.text for e in whole) == free[:free.index(stop)] and whole[-1].finish_reason == "stop"
    # Some cut falls where the stop string's beginning was held back (decoded, not sent).
    held = [cut for cut in range(1, len(whole)) if lm.tokenizer.decode(
        [t for e in whole[:cut] for t in e.token_ids]) != "".join(e.text for e in whole[:cut])]
    assert held
    for cut, joined, last in results:
        assert joined == free[:free.index(stop)], f"cut after piece {cut}"
        assert last.finish_reason == "stop"
    # What a cumulative stream's continuation starts from: the text sent, without the held-back start.
    for cut in range(1, len(whole)):
        sent = whole[:cut]
        assert sent_text(lm.tokenizer, (stop,), [t for e in sent for t in e.token_ids]) == "".join(e.text for e in sent)


def straddling_stop(pieces) -> str:
    """A stop string whose first 2 characters end a piece of at least 3 and whose rest begins the next (its
    first occurrence): the stopped run sends that piece without them and holds them back."""
    text, end = "".join(pieces), 0
    for piece, following in zip(pieces, pieces[1:]):
        end += len(piece)
        stop = text[end - 2:end + 3]
        if len(piece) >= 3 and len(following) >= 1 and text.index(stop) == end - 2 and len(stop) == 5:
            return stop
    raise AssertionError(f"no piece boundary to put a stop string across in {pieces!r}")


def test_ids_of_an_answer_that_ended_are_refused(engine, lm):
    prompt_ids = encode_prompt(lm.tokenizer, PROMPT)
    eos = sorted(lm.eos_token_ids)[0]
    with pytest.raises(RequestError, match="gen_conf.continuation"):
        events(engine, lm, prompt_ids, {"max_new_tokens": 10, "continuation": [eos, 5]})
    with pytest.raises(RequestError, match=r"gen_conf.continuation.*fewer ids than max_new_tokens \(3\)"):
        events(engine, lm, prompt_ids, {"max_new_tokens": 3, "continuation": [5, 6, 7]})


@pytest.mark.parametrize("value", ["1 2", [1, "2"], [True], [-1], [1 << 40], list(range(3000))])
def test_a_malformed_continuation_names_the_field_and_the_range(lm, value):
    with pytest.raises(RequestError, match=r"gen_conf.continuation=.*a list of at most 2048 token ids, each 0 <= id"):
        parse_gen_conf({"continuation": value}, limits(lm))
