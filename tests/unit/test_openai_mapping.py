"""OpenAI request -> Prompt, and Executor error -> OpenAI error: the pure part of executor/openai_api.py."""

import json

import pytest

from executor.openai_api import APIError, api_error_from_backend, chat_prompt, completion_prompts, gen_conf_from


def test_sampling_parameters_map_onto_gen_conf():
    gen_conf, names = gen_conf_from({"model": "m", "max_completion_tokens": 9, "temperature": 0.5, "stop": "x",
                                     "seed": 3, "user": "ignored", "n": 1})
    assert gen_conf == {"max_new_tokens": 9, "temperature": 0.5, "stop": "x", "seed": 3, "do_sample": True}
    assert names["max_new_tokens"] == "max_completion_tokens"


@pytest.mark.parametrize("temperature, samples", [(None, True), (1, True), (0.2, True), (0, False), ("hot", False)])
def test_temperature_has_openai_meaning(temperature, samples):
    body = {} if temperature is None else {"temperature": temperature}
    assert gen_conf_from(body)[0].get("do_sample", False) is samples


@pytest.mark.parametrize("body, param", [
    ({"n": 9}, "n"), ({"n": 0}, "n"), ({"n": True}, "n"), ({"echo": True}, "echo"), ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "[a-z]+"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"), ({"frobnicate": 1}, "frobnicate"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
])
def test_unsupported_or_unknown_parameters_are_refused_by_name(body, param):
    with pytest.raises(APIError) as raised:
        gen_conf_from(body)
    assert raised.value.status == 400 and raised.value.param == param


def test_off_values_of_unsupported_parameters_are_accepted():
    gen_conf_from({"logprobs": False, "tools": [], "response_format": {"type": "text"}, "logit_bias": {}})


def test_response_format_and_vllms_guided_keys_become_gen_conf_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert gen_conf_from({"response_format": fmt})[0]["response_format"] == fmt
    gen_conf, names = gen_conf_from({"guided_json": json.dumps(schema)})
    assert gen_conf["response_format"]["json_schema"]["schema"] == schema and names["response_format"] == "guided_json"
    assert gen_conf_from({"guided_regex": "[0-9]+"})[0]["response_format"] == {"type": "regex", "pattern": "[0-9]+"}
    assert gen_conf_from({"guided_choice": ["a", "b"]})[0]["response_format"] == {"type": "choice", "choices": ["a", "b"]}
    # The Executor's error on the nested field, in the client's terms.
    message = "gen_conf.response_format.pattern='(' is not allowed: cannot be compiled"
    error = api_error_from_backend("RequestError", message, {"response_format": "guided_regex"}, "messages")
    assert error.param == "guided_regex" and error.message.startswith("guided_regex=")
    error = api_error_from_backend("RequestError", message, {"response_format": "response_format"}, "messages")
    assert error.param == "response_format.pattern"


def test_n_choices_are_copies_in_order_with_their_own_seeds():
    from executor.openai_api import Prompt, with_n_choices

    prompts = [Prompt(message=[{"role": "user", "content": t}], gen_conf={"seed": 5}) for t in ("a", "b")]
    copies = with_n_choices(prompts, 3)
    assert [(p.message[0]["content"], p.gen_conf["seed"]) for p in copies] == [
        ("a", 5), ("a", 6), ("a", 7), ("b", 5), ("b", 6), ("b", 7)]
    unseeded = with_n_choices([Prompt(message=[{"role": "user", "content": "a"}], gen_conf={})], 2)
    assert all("seed" not in p.gen_conf for p in unseeded)


def _last(prompt_tokens, completion_tokens, cached_tokens):
    from schemas import Generation

    return Generation(text="x", finish_reason="length", prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, cached_tokens=cached_tokens)


def test_usage_counts_each_prompt_and_its_cached_tokens_once_over_its_n_choices():
    """Two prompts x n=2 in a row (with_n_choices' order): the prompts once each, with choice 0's cached
    tokens (choice 1 reused choice 0's prefill); completions summed; a choice that never came is skipped."""
    from executor.openai_api import _usage

    lasts = [_last(100, 3, 0), _last(100, 2, 96), None, _last(20, 3, 0)]
    assert _usage(lasts, 2) == {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128,
                                "prompt_tokens_details": {"cached_tokens": 0}}
    assert _usage([_last(100, 3, 96)] * 3, 3)["prompt_tokens_details"] == {"cached_tokens": 96}
    assert _usage([_last(100, 3, 96), _last(20, 1, 0)], 1)["prompt_tokens"] == 120  # n=1: one prompt each


def test_a_stream_of_whole_answers_reports_the_prompt_once_over_its_n_choices():
    """With tools the answers are streamed once whole (_sse_of_whole): its usage chunk counts as _usage."""
    import asyncio

    from executor.openai_api import Shape, _sse_of_whole

    async def events():
        return [e async for e in _sse_of_whole(Shape("chat", "m"), [_last(100, 3, 96)] * 3, 3, True)]

    usage = json.loads(asyncio.run(events())[-2].removeprefix("data: "))["usage"]
    assert usage == {"prompt_tokens": 100, "completion_tokens": 9, "total_tokens": 109,
                     "prompt_tokens_details": {"cached_tokens": 96}}


def test_logprobs_of_chat_and_of_completions():
    assert gen_conf_from({"logprobs": True, "top_logprobs": 3})[0].items() >= {"logprobs": True, "top_logprobs": 3}.items()
    assert "logprobs" not in gen_conf_from({"logprobs": False})[0]
    gen_conf, names = gen_conf_from({"logprobs": 2}, "completion")
    assert gen_conf["logprobs"] is True and gen_conf["top_logprobs"] == 2 and names["top_logprobs"] == "logprobs"
    with pytest.raises(APIError) as raised:
        gen_conf_from({"top_logprobs": 2}, "completion")
    assert raised.value.param == "top_logprobs"


def test_messages_with_text_parts_and_completion_prompts():
    prompt, _ = chat_prompt({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}]})
    assert prompt.message == [{"role": "user", "content": "ab"}]
    with pytest.raises(APIError, match="text parts"):
        chat_prompt({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    (raw,), _ = completion_prompts({"prompt": ["Once"], "max_tokens": 3})
    assert raw.message == [{"role": "user", "content": "Once"}] and raw.gen_conf["raw_prompt"] is True
    several, _ = completion_prompts({"prompt": ["Once", "Twice"], "max_tokens": 3})
    assert [p.message[0]["content"] for p in several] == ["Once", "Twice"]
    for bad in ([1, 2, 3], [], ["ok", ""], "", None):
        with pytest.raises(APIError) as raised:
            completion_prompts({"prompt": bad})
        assert raised.value.param == "prompt"


def test_executor_errors_speak_the_clients_names():
    error = api_error_from_backend("RequestError", "gen_conf.max_new_tokens=0 is not allowed: allowed range is "
                                   "1 <= max_new_tokens <= 2048", {"max_new_tokens": "max_tokens"}, "messages")
    assert (error.status, error.param, error.code) == (400, "max_tokens", "invalid_value")
    assert error.message == "max_tokens=0 is not allowed: allowed range is 1 <= max_tokens <= 2048"
    role = api_error_from_backend("RequestError", "message[1].role='x' is not allowed: one of system", {}, "messages")
    assert role.param == "messages[1].role"
    too_long = api_error_from_backend("RequestError", "message=<300 tokens after the chat template> is not "
                                      "allowed: the prompt may have at most 64 tokens; shorten it", {}, "prompt")
    assert (too_long.param, too_long.code) == ("prompt", "context_length_exceeded")
    busy = api_error_from_backend("ServerBusyError", "the server is busy", {}, "messages")
    assert (busy.status, busy.code) == (503, "server_busy")
    assert api_error_from_backend("EngineError", "boom", {}, "messages").status == 500
