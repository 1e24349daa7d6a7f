"""Tool calls (executor/tools.py): validation, rendering with and without a tools-aware template, forced calls
on a tiny random model (their arguments validate), and finding calls in an answer."""

import asyncio
import json
from dataclasses import replace

import jsonschema
import pytest

from executor.engine import Engine, EngineConfig
from executor.grammar import Grammars
from executor.model import encode_prompt, load, render_prompt
from executor.errors import RequestError
from executor.validation import Limits, fit_to_context, parse_gen_conf, validate_messages
from executor.tools import parse_tool_calls, parse_tools, strict_objects

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
LIMITS = Limits(context_length=2048, max_prompt_tokens=1500)
# A Hermes/Qwen2.5-style template: tools in the system turn, calls as <tool_call> blocks, tool answers.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls', []) %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny chat model with room for the tools the fallback writes into the system message."""
    from tiny_models import CHATML_TEMPLATE, build_gpt2, build_tokenizer

    path = build_gpt2(tmp_path_factory.mktemp("tools") / "chat", build_tokenizer(chat_template=CHATML_TEMPLATE),
                      n_positions=2048, initializer_range=0.2)
    return load(str(path))


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_batch_size=4)).start()
    yield engine
    engine.shutdown()


def ask(engine, lm, gen_conf, messages=None):
    grammars = Grammars(lm.tokenizer, lm.vocab_size, lm.eos_token_ids)
    settings = parse_gen_conf(gen_conf, LIMITS)
    messages = validate_messages(messages or [{"role": "user", "content": "Weather in Paris?"}], LIMITS)
    prompt_ids = encode_prompt(lm.tokenizer, messages, tools=settings.tools)
    settings = fit_to_context(settings, len(prompt_ids), LIMITS)
    if settings.response_format is not None:
        settings = replace(settings, grammar=grammars.row_grammar(settings.response_format))
    [(text, last)] = asyncio.run(engine.complete([(prompt_ids, settings)]))
    return text, last, settings


def test_tools_and_tool_choice_are_validated_by_name():
    for tools, choice, field in [([{"type": "function"}], None, "gen_conf.tools[0]"),
                                 ("nope", None, "gen_conf.tools"),
                                 ([WEATHER], {"type": "function", "function": {"name": "other"}}, "gen_conf.tool_choice"),
                                 (None, "required", "gen_conf.tool_choice"),
                                 ([WEATHER], "sometimes", "gen_conf.tool_choice")]:
        with pytest.raises(RequestError) as raised:
            parse_tools(tools, choice)
        assert raised.value.field == field
    with pytest.raises(RequestError, match="not together with response_format"):
        parse_gen_conf({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
                       LIMITS)
    with pytest.raises(RequestError, match=r"message\[1\].tool_calls\[0\]"):
        validate_messages([{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 3}}]}], LIMITS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_forces_a_call_whose_arguments_validate(engine, lm, seed):
    text, last, settings = ask(engine, lm, {"tools": [WEATHER, TIME], "tool_choice": "required", "do_sample": True,
                                            "seed": seed, "max_new_tokens": 150})
    assert last.finish_reason == "stop", text
    content, calls = parse_tool_calls(text, settings.tools)
    assert content is None and len(calls) == 1, text
    function = {"get_weather": WEATHER, "get_time": TIME}[calls[0]["function"]["name"]]["function"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), function["parameters"])


def test_a_forced_call_holds_only_the_properties_its_function_names(engine, lm):
    """A schema that says nothing of other properties gets none (OpenAI's strict mode): a random model's sampled
    arguments, which invent keys whenever JSON allows them, hold the function's own properties only."""
    open_schema = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "where": {"type": "object", "properties": {"country": {"enum": ["FR", "NO"]}}}},
        "required": ["city"]}}}
    for seed in range(4):
        text, last, settings = ask(engine, lm, {"tools": [open_schema], "tool_choice": "required", "do_sample": True,
                                                "seed": seed, "max_new_tokens": 150})
        _, calls = parse_tool_calls(text, settings.tools)
        assert len(calls) == 1, text
        arguments = json.loads(calls[0]["function"]["arguments"])
        assert set(arguments) <= {"city", "where"} and set(arguments.get("where", {})) <= {"country"}, arguments


def test_strictness_visits_subschemas_only_and_keeps_what_a_schema_says():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "free": {"type": "object", "properties": {}, "additionalProperties": True}}}
    strict = strict_objects(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["properties"]["additionalProperties"] is False  # a property named like the keyword
    assert "additionalProperties" not in strict["properties"]  # the mapping of names is not a schema
    assert strict["properties"]["free"]["additionalProperties"] is True


def test_a_named_function_is_the_one_called(engine, lm):
    named = {"type": "function", "function": {"name": "get_time"}}
    text, _, settings = ask(engine, lm, {"tools": [WEATHER, TIME], "tool_choice": named, "max_new_tokens": 150})
    _, calls = parse_tool_calls(text, settings.tools)
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    assert json.loads(calls[0]["function"]["arguments"])["zone"] in ("UTC", "CET")


def test_calls_are_found_in_an_answer_and_lookalikes_stay_text():
    tools = parse_tools([WEATHER], "auto")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text, tools)
    assert content == 'Let me check.\n\n<tool_call>{"name": "unknown", "arguments": {}}</tool_call>'.replace("\n\n", "\n")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}
    assert calls[0]["id"].startswith("call_")
    assert parse_tool_calls("no call here", tools) == ("no call here", [])


def test_history_with_calls_and_tool_answers_renders_with_and_without_tool_support(lm):
    history = validate_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}], LIMITS)
    tools = parse_tools([WEATHER], "auto")
    plain = render_prompt(lm.tokenizer, history, tools)  # the ChatML test template knows no tools: the fallback
    assert "<tools>" in plain and '"get_weather"' in plain
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>' in plain
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in plain
    lm.tokenizer.chat_template, original = TOOLS_TEMPLATE, lm.tokenizer.chat_template
    try:
        aware = render_prompt(lm.tokenizer, history, tools)
    finally:
        lm.tokenizer.chat_template = original
    assert aware.startswith("<|im_start|>system\nTools:\n") and "<tools>" not in aware
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>' in aware
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in aware
