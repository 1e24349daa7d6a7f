"""Constrained decoding (executor/grammar.py) on a tiny random model: what it writes parses and validates."""

import asyncio
import json
import re
import time

import jsonschema
import pytest
from dataclasses import replace

from executor.engine import Engine, EngineConfig
from executor.grammar import MAX_NESTING, MAX_SPEC_CHARS, Grammars, ResponseFormat, parse_response_format
from executor.model import encode_prompt, load
from executor.errors import RequestError
from executor.validation import Limits, fit_to_context, parse_gen_conf

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}
LIMITS = Limits(context_length=512)


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["chat"]))


@pytest.fixture(scope="module")
def grammars(lm):
    return Grammars(lm.tokenizer, lm.vocab_size, lm.eos_token_ids)


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_batch_size=8)).start()
    yield engine
    engine.shutdown()


def request(lm, grammars, gen_conf, text="Tell me about a person."):
    prompt_ids = encode_prompt(lm.tokenizer, [{"role": "user", "content": text}])
    settings = fit_to_context(parse_gen_conf(gen_conf, LIMITS), len(prompt_ids), LIMITS)
    if settings.response_format is not None:
        settings = replace(settings, grammar=grammars.row_grammar(settings.response_format))
    return prompt_ids, settings


def answer(engine, requests):
    return asyncio.run(engine.complete(requests))


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_formats_are_validated_with_the_field_named():
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}).kind == "json_schema"
    assert parse_response_format({"type": "regex", "pattern": "[0-9]+"}) == ResponseFormat("regex", "[0-9]+")
    for bad, field in [("json", "response_format"), ({"type": "yaml"}, "response_format"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"schema": "{}"}}, "response_format.json_schema"),
                       ({"type": "regex", "pattern": ""}, "response_format.pattern"),
                       ({"type": "choice", "choices": []}, "response_format.choices"),
                       ({"type": "choice", "choices": ["a", 3]}, "response_format.choices")]:
        with pytest.raises(RequestError) as raised:
            parse_response_format(bad)
        assert raised.value.field == field, bad


def test_schemas_too_large_or_too_deep_are_refused_before_any_work():
    deep = {"type": "object"}
    for _ in range(MAX_NESTING):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(RequestError, match="levels of nesting"):
        parse_response_format(schema_format(deep))
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SPEC_CHARS // 20)}}
    with pytest.raises(RequestError, match="characters of JSON"):
        parse_response_format(schema_format(wide))
    with pytest.raises(RequestError, match="gen_conf.response_format"):
        parse_gen_conf({"response_format": {"type": "nope"}}, LIMITS)


def test_an_invalid_schema_or_pattern_is_a_request_error(grammars):
    with pytest.raises(RequestError, match="response_format.*cannot be compiled"):
        grammars.row_grammar(ResponseFormat("regex", "(unclosed"))
    with pytest.raises(RequestError, match="response_format"):
        grammars.row_grammar(parse_response_format(schema_format({"type": "object", "properties": 3})))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_sampled_json_schema_answers_parse_and_validate(engine, lm, grammars, seed):
    gen_conf = {"response_format": schema_format(PERSON), "do_sample": True, "seed": seed, "max_new_tokens": 120}
    [(text, last)] = answer(engine, [request(lm, grammars, gen_conf)])
    assert last.finish_reason == "stop", (text, last)
    jsonschema.validate(json.loads(text), PERSON)
    assert "\n" not in text and "  " not in text, "no free whitespace between JSON tokens"


def test_json_object_greedy_and_a_batch_where_free_rows_are_unaffected(engine, lm, grammars):
    free = request(lm, grammars, {"max_new_tokens": 20}, "Say something.")
    alone = answer(engine, [free])[0][0]
    constrained = request(lm, grammars, {"response_format": {"type": "json_object"}, "max_new_tokens": 150})
    results = answer(engine, [constrained, free, request(lm, grammars, {"max_new_tokens": 20}, "Say something.")])
    assert isinstance(json.loads(results[0][0]), dict) and results[0][1].finish_reason == "stop"
    assert results[1][0] == results[2][0] == alone


def test_regex_and_choice(engine, lm, grammars):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    results = answer(engine, [
        request(lm, grammars, {"response_format": {"type": "regex", "pattern": pattern}, "do_sample": True,
                               "seed": 7, "max_new_tokens": 20}),
        request(lm, grammars, {"response_format": {"type": "choice", "choices": ["yes", "no", "maybe later"]},
                               "do_sample": True, "seed": 3, "max_new_tokens": 20}),
    ])
    assert re.fullmatch(pattern, results[0][0]), results[0]
    assert results[1][0] in ("yes", "no", "maybe later") and results[1][1].finish_reason == "stop"


def test_max_new_tokens_before_the_grammar_completes_is_length(engine, lm, grammars):
    [(text, last)] = answer(engine, [request(lm, grammars, {"response_format": schema_format(PERSON),
                                                            "max_new_tokens": 3})])
    assert last.finish_reason == "length" and last.completion_tokens == 3 and text.startswith("{")


def test_min_new_tokens_cannot_keep_a_complete_grammar_going(engine, lm, grammars):
    gen_conf = {"response_format": {"type": "choice", "choices": ["yes", "no"]}, "min_new_tokens": 30,
                "max_new_tokens": 40}
    [(text, last)] = answer(engine, [request(lm, grammars, gen_conf)])
    assert text in ("yes", "no") and last.finish_reason == "stop"


def test_compiled_grammars_are_cached_and_a_hostile_pattern_is_bounded(grammars):
    fmt = parse_response_format(schema_format(PERSON))
    grammars.row_grammar(fmt)
    started = time.perf_counter()
    for _ in range(20):
        grammars.row_grammar(fmt)
    assert time.perf_counter() - started < 1.0, "a cached grammar is copied, not compiled again"
    started = time.perf_counter()
    try:  # nested counted repetitions: a huge automaton, unless the lexer's fuel stops it
        grammars.row_grammar(ResponseFormat("regex", "((a{1,100}){1,100}){1,100}b"))
    except RequestError as error:
        assert "response_format" in str(error)
    assert time.perf_counter() - started < 10, "compiling a hostile pattern is bounded"


def test_stop_strings_and_cancellation_work_with_a_grammar(engine, lm, grammars):
    stopped = request(lm, grammars, {"response_format": {"type": "regex", "pattern": "abc-def"}, "stop": ["-"],
                                     "max_new_tokens": 20})
    [(text, last)] = answer(engine, [stopped])
    assert text == "abc" and last.finish_reason == "stop", "the stop string ends the answer before the format does"

    async def leave_after_the_first_piece():
        prompt_ids, settings = request(lm, grammars, {"response_format": schema_format(PERSON), "max_new_tokens": 120})
        async for _ in engine.stream(prompt_ids, settings):
            return  # the client leaves: the row is cancelled with its grammar

    asyncio.run(leave_after_the_first_piece())
    [(text, last)] = answer(engine, [request(lm, grammars, {"response_format": schema_format(PERSON),
                                                            "max_new_tokens": 120, "do_sample": True, "seed": 9})])
    jsonschema.validate(json.loads(text), PERSON)  # a new request starts its own grammar from the beginning
