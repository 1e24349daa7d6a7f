"""gen_conf and message validation: every refusal names the field, the bad value and what is allowed."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.errors import RequestError
from executor.sampling import to_generation_config
from executor.validation import (ALLOWED_GEN_CONF_KEYS, Limits, SamplingSettings, fit_to_context, parse_gen_conf,
                                 validate_messages)
from transformers import GenerationConfig

LIMITS = Limits(max_new_tokens_limit=256, max_prompt_tokens=100, max_prompt_chars=1000, max_messages=8,
                context_length=128)

BAD_GEN_CONF = [
    ({"temperature": 2.5}, "gen_conf.temperature", "2.0"),
    ({"temperature": -1}, "gen_conf.temperature", "0.0 <= temperature"),
    ({"temperature": "hot"}, "gen_conf.temperature", "a number"),
    ({"temperature": float("nan")}, "gen_conf.temperature", "finite"),
    ({"top_p": 0}, "gen_conf.top_p", "0.0 < top_p <= 1.0"),
    ({"top_p": 1.5}, "gen_conf.top_p", "top_p <= 1.0"),
    ({"top_k": 1.5}, "gen_conf.top_k", "an integer"),
    ({"top_k": -1}, "gen_conf.top_k", "0 <= top_k"),
    ({"max_new_tokens": 0}, "gen_conf.max_new_tokens", "1 <= max_new_tokens <= 256"),
    ({"max_new_tokens": 257}, "gen_conf.max_new_tokens", "<= 256"),
    ({"max_new_tokens": True}, "gen_conf.max_new_tokens", "an integer"),
    ({"max_tokens": 10_000}, "gen_conf.max_tokens", "<= 256"),
    ({"max_tokens": 5, "max_new_tokens": 6}, "gen_conf.max_tokens", "not both"),
    ({"min_new_tokens": 20, "max_new_tokens": 10}, "gen_conf.min_new_tokens", "max_new_tokens (10)"),
    ({"repetition_penalty": 0}, "gen_conf.repetition_penalty", "0.0 < repetition_penalty"),
    ({"presence_penalty": 3}, "gen_conf.presence_penalty", "-2.0 <= presence_penalty <= 2.0"),
    ({"frequency_penalty": -2.5}, "gen_conf.frequency_penalty", "<= 2.0"),
    ({"do_sample": "yes"}, "gen_conf.do_sample", "true or false"),
    ({"seed": -1}, "gen_conf.seed", "0 <= seed"),
    ({"num_beams": 4}, "gen_conf.num_beams", "only 1"),
    ({"num_return_sequences": 2}, "gen_conf.num_return_sequences", "only 1"),
    ({"stop": ""}, "gen_conf.stop", "non-empty strings"),
    ({"stop": ["a"] * 9}, "gen_conf.stop", "at most 8"),
    ({"stop": [1]}, "gen_conf.stop", "strings"),
    ({"stop": "x" * 300}, "gen_conf.stop", "256 characters"),
    ({"max_length": 10}, "gen_conf.max_length", "unknown setting; allowed keys are"),
    ({"trust_remote_code": True}, "gen_conf.trust_remote_code", "unknown setting"),
    ([1, 2], "gen_conf", "an object"),
]


@pytest.mark.parametrize("gen_conf,field,allowed", BAD_GEN_CONF)
def test_bad_gen_conf_is_refused_with_field_and_range(gen_conf, field, allowed):
    with pytest.raises(RequestError) as caught:
        parse_gen_conf(gen_conf, LIMITS)
    message = str(caught.value)
    assert message.startswith(field + "="), message
    assert allowed in message


def test_good_gen_conf_and_openai_aliases():
    parsed = parse_gen_conf({"max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "stop": "END",
                             "presence_penalty": 0.5, "frequency_penalty": -0.5, "do_sample": True, "seed": 7},
                            LIMITS)
    assert parsed == SamplingSettings(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=5, stop=("END",),
                                      presence_penalty=0.5, frequency_penalty=-0.5, do_sample=True, seed=7)
    assert parse_gen_conf({}, LIMITS) == parse_gen_conf(None, LIMITS) == SamplingSettings()


BAD_MESSAGES = [
    ([], "message=", "non-empty list"),
    ("hello", "message=", "non-empty list"),
    ([{"role": "user"}], "message[0]=", '"role" and "content"'),
    ([{"role": "user", "content": "hi", "name": "x"}], "message[0]=", '"role" and "content" (assistant: also'),
    ([{"role": "user", "content": "hi", "tool_calls": []}], "message[0]=", '"role" and "content" (assistant: also'),
    ([{"role": "wizard", "content": "hi"}], "message[0].role=", "one of system, user"),
    ([{"role": "user", "content": 5}], "message[0].content=", "a string"),
    (["hi"], "message[0]=", "an object"),
    ([{"role": "user", "content": "x" * 1001}], "message=", "at most 1000 characters"),
    ([{"role": "user", "content": "x"}] * 9, "message=", "at most 8 messages"),
]


@pytest.mark.parametrize("message,field,allowed", BAD_MESSAGES)
def test_bad_messages_are_refused(message, field, allowed):
    with pytest.raises(RequestError) as caught:
        validate_messages(message, LIMITS)
    assert str(caught.value).startswith(field) and allowed in str(caught.value)


def test_default_max_new_tokens_is_lowered_to_fit_but_an_explicit_one_is_refused():
    assert fit_to_context(SamplingSettings(), 100, LIMITS).max_new_tokens == 28
    assert fit_to_context(SamplingSettings(), 10, Limits()).max_new_tokens == 512
    assert fit_to_context(SamplingSettings(max_new_tokens=28), 100, LIMITS).max_new_tokens == 28
    with pytest.raises(RequestError, match=r"gen_conf.max_new_tokens=29 .*at most 28"):
        fit_to_context(SamplingSettings(max_new_tokens=29), 100, LIMITS)


def test_prompt_over_the_cap_is_refused_not_truncated():
    with pytest.raises(RequestError, match=r"at most 100 tokens"):
        fit_to_context(SamplingSettings(), 101, LIMITS)


def test_temperature_zero_means_greedy():
    config = to_generation_config(SamplingSettings(do_sample=True, temperature=0.0), GenerationConfig())
    assert config.do_sample is False


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(ALLOWED_GEN_CONF_KEYS + ("bogus",)), _json_values, max_size=4))
def test_fuzzed_gen_conf_is_either_refused_by_name_or_within_range(gen_conf):
    try:
        parsed = parse_gen_conf(gen_conf, LIMITS)
    except RequestError as error:
        assert str(error).startswith("gen_conf"), error
        return
    assert parsed.max_new_tokens is None or 1 <= parsed.max_new_tokens <= LIMITS.max_new_tokens_limit
    assert parsed.temperature is None or 0 <= parsed.temperature <= 2
    assert parsed.top_p is None or 0 < parsed.top_p <= 1
    for value in (parsed.temperature, parsed.top_p, parsed.min_p, parsed.typical_p, parsed.repetition_penalty):
        assert value is None or math.isfinite(value)
    assert all(isinstance(s, str) and s for s in parsed.stop)
