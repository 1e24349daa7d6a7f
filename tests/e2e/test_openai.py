"""The OpenAI-compatible API (--openai-port), driven by the official `openai` package against a real server.

One server on the slow test model with one batch slot and a queue of three prompts, so that "busy" and
"the client left" can be provoked; greedy answers are deterministic."""

import json
import re
import shlex
import subprocess
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from conftest import PYTHON, ROOT, free_port, serve_process
from executor.validation import DEFAULT_MAX_NEW_TOKENS

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello, how are you? 😀"}]


@pytest.fixture(scope="module")
def api(slow_model):
    grpc_port, openai_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--port", str(grpc_port),
            "--openai-port", str(openai_port), "--api-key", KEY, "--max_batch_size", "1", "--max_queue", "3",
            "--max_prompt_tokens", "160"]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield {"url": f"http://127.0.0.1:{openai_port}", "model": str(slow_model), "log": log,
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key=KEY, max_retries=0)}


def chat(api, **kwargs):
    return api["client"].chat.completions.create(model=api["model"], **{"messages": HELLO, **kwargs})


def test_usage_counts_the_prompt_tokens_served_from_the_prefix_cache(api):
    system = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 3}
    first = chat(api, messages=[system, {"role": "user", "content": "What is a river?"}], max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = [system, {"role": "user", "content": "What is a mountain?"}]
    second = chat(api, messages=again, max_tokens=4)
    streamed = list(chat(api, messages=again, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert 64 <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // 16 * 16
    assert re.search(rf"prompt_tokens={second.usage.prompt_tokens} cached_tokens="
                     rf"{second.usage.prompt_tokens_details.cached_tokens} ", api["log"].read_text(errors="replace"))


def test_n_choices_count_their_prompt_and_its_cached_tokens_once(api):
    """OpenAI's usage with n > 1: completion tokens summed over the choices, the prompt counted once, and so
    are its cached tokens (those of choice 0: the other copies reuse choice 0's prefill, not an earlier
    request's). Three copies fill the queue of this server; chat and completions, whole and streamed."""
    three = {"n": 3, "max_tokens": 3, "temperature": 0, "extra_body": {"min_tokens": 3}}
    usage_chunk = {"stream": True, "stream_options": {"include_usage": True}}
    # A topic of its own (no earlier request cached it), over 64 tokens: the copies share their prefill.
    messages = [{"role": "user", "content": "Describe the lighthouse keeper's seven cats and their evening routine. "
                                            * 2}]
    fresh = chat(api, messages=messages, **three)
    alone = chat(api, messages=messages, max_tokens=3, temperature=0)  # the same prompt, n=1, now cached
    again = list(chat(api, messages=messages, **three, **usage_chunk))[-1].usage
    prompt = alone.usage.prompt_tokens
    assert 64 < prompt and alone.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16
    assert len(fresh.choices) == 3
    usage = fresh.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, 9, prompt + 9)
    assert usage.prompt_tokens_details.cached_tokens == 0, "the copies' reuse of choice 0 is no cache hit"
    assert (again.prompt_tokens, again.completion_tokens, again.total_tokens) == (prompt, 9, prompt + 9)
    assert again.prompt_tokens_details.cached_tokens == alone.usage.prompt_tokens_details.cached_tokens

    text = "The lighthouse keeper counted the ships that passed the rocks at night. " * 2
    whole = api["client"].completions.create(model=api["model"], prompt=text, **three)
    streamed = list(api["client"].completions.create(model=api["model"], prompt=text, **three, **usage_chunk))
    tokens = len(AutoTokenizer.from_pretrained(api["model"])(text)["input_ids"])
    assert tokens > 64 and sorted(c.index for c in whole.choices) == [0, 1, 2]
    for usage, cached in ((whole.usage, 0), (streamed[-1].usage, (tokens - 1) // 16 * 16)):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (tokens, 9, tokens + 9)
        assert usage.prompt_tokens_details.cached_tokens == cached


def test_models_list(api):
    assert [model.id for model in api["client"].models.list()] == [api["model"]]
    assert api["client"].models.retrieve(api["model"]).id == api["model"]


def test_chat_stream_joins_to_the_whole_answer_with_usage(api):
    whole = chat(api, max_tokens=24, temperature=0)
    chunks = list(chat(api, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert whole.choices[0].message.content and text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    # Asked before, but a cached prefix this short (< MIN_REUSED_TOKENS) is cheaper to recompute.
    assert usage.prompt_tokens < 64 and usage.prompt_tokens_details.cached_tokens == 0
    assert all(chunk.usage is None for chunk in chunks[:-1])
    same = chat(api, max_completion_tokens=24, temperature=0, user="someone")  # the other name; `user` ignored
    assert same.choices[0].message.content == whole.choices[0].message.content


def test_completions_use_the_prompt_as_is(api):
    prompt = "Once upon a time"
    whole = api["client"].completions.create(model=api["model"], prompt=prompt, max_tokens=12, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(api["model"])
    assert whole.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])  # no chat template around it
    chunks = list(api["client"].completions.create(model=api["model"], prompt=prompt, max_tokens=12, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text != ""
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_with_a_list_of_prompts_answer_each_with_its_index(api):
    prompts = ["Once upon a time", "The quick brown fox", "Hello"]
    alone = [api["client"].completions.create(model=api["model"], prompt=p, max_tokens=8, temperature=0)
             for p in prompts]
    whole = api["client"].completions.create(model=api["model"], prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [a.choices[0].text for a in alone]
    assert whole.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert whole.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    chunks = list(api["client"].completions.create(model=api["model"], prompt=prompts, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == [a.choices[0].text for a in alone]
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_and_seed(api):
    text = chat(api, max_tokens=24, temperature=0).choices[0].message.content
    stop = text[6:9]
    stopped = chat(api, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [chat(api, max_tokens=16, temperature=1.5, top_p=0.95, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]  # it samples (OpenAI's meaning of temperature), seeded
    penalised = chat(api, max_tokens=24, temperature=0, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalised.choices[0].message.content != text


@pytest.mark.parametrize("kwargs, param, words", [
    ({"temperature": 9}, "temperature", "0.0 <= temperature <= 2.0"),
    ({"max_tokens": 0}, "max_tokens", "1 <= max_tokens"),
    ({"n": 9}, "n", "1 <= n <= 8"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 <= top_logprobs <= 20"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "one of system, user"),
    ({"extra_body": {"beam_width": 3}}, "beam_width", "Unrecognized request argument"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options", "must be an object"),
])
def test_bad_parameters_are_400_naming_the_parameter(api, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(api, **kwargs)
    error = raised.value.body
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_prompts_that_do_not_fit(api):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(api, messages=[{"role": "user", "content": "word " * 200}])
    assert raised.value.body["code"] == "context_length_exceeded" and "at most 160 tokens" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        chat(api, max_tokens=2048)
    assert raised.value.body["code"] == "context_length_exceeded" and raised.value.body["param"] == "max_tokens"
    huge = httpx.post(f"{api['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": api["model"], "messages": [{"role": "user", "content": "x" * 5_000_000}]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_unknown_model_is_404(api):
    with pytest.raises(openai.NotFoundError) as raised:
        api["client"].chat.completions.create(model="gpt-4o", messages=HELLO)
    assert raised.value.body["code"] == "model_not_found"


def test_api_key_is_required(api):
    wrong = openai.OpenAI(base_url=f"{api['url']}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=api["model"], messages=HELLO)
    assert httpx.get(f"{api['url']}/v1/models").status_code == 401


def cancelled_lines(api) -> int:
    return len(re.findall(r"endpoint=/v1/(chat/)?completions .* finish=cancelled", api["log"].read_text(errors="replace")))


def wait_for_cancelled(api, count, timeout=15):
    deadline = time.monotonic() + timeout
    while cancelled_lines(api) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return cancelled_lines(api)


def test_full_queue_is_503_and_leaving_clients_stop_their_generation(api):
    before = cancelled_lines(api)
    long = {"model": api["model"], "messages": HELLO, "max_tokens": 1500, "min_tokens": 1500, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{api['url']}/v1/chat/completions", json={**long, "stream": True},
                         headers=headers) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")  # generating: the one batch slot is taken
            three = {"model": api["model"], "prompt": ["a", "b", "c"], "max_tokens": 1500, "temperature": 0}
            waiting = threading.Thread(target=wait_then_leave, args=(api, three, headers, outcome := []))
            waiting.start()  # three prompts in one call fill the queue; its client gives up after 2 s
            time.sleep(0.5)
            with pytest.raises(openai.InternalServerError) as raised:
                chat(api, max_tokens=4)
            assert raised.value.status_code == 503 and raised.value.body["code"] == "server_busy"
            waiting.join()
            assert outcome == ["left"]
        # leaving the stream closes its connection
    assert wait_for_cancelled(api, before + 4) == before + 4, "a client left but its generation went on"
    assert chat(api, max_tokens=4, temperature=0).choices[0].finish_reason == "length"  # serving again


def wait_then_leave(api, body, headers, outcome):
    """A non-streaming request whose client gives up after 2 s (it is still waiting for a batch slot)."""
    try:
        httpx.post(f"{api['url']}/v1/completions", json=body, headers=headers, timeout=2.0)
        outcome.append("answered")
    except httpx.TimeoutException:
        outcome.append("left")


def test_the_readme_curl_example_works_as_written(api):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(curl [^`]*?/v1/chat/completions[^`]*?)```", readme).group(1)
    command = command.replace("\\\n", " ").replace("http://localhost:8000", api["url"])
    command = command.replace('"model": "SmolLM2-135M-Instruct"', f'"model": "{api["model"]}"').replace("$JINA_LLM_STREAM_API_KEY", KEY)
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and '"chat.completion"' in result.stdout, result.stdout + result.stderr


_json_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3000), st.floats(allow_nan=False, allow_infinity=False, width=32),
                         st.text(max_size=6), st.lists(st.text(max_size=3), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_parameters = st.dictionaries(st.sampled_from(["max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                                               "seed", "n", "frequency_penalty", "presence_penalty", "logprobs",
                                               "stream", "stream_options", "min_tokens", "user", "bogus"]),
                              _json_values, max_size=4)
_messages = st.one_of(_json_values, st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard", ""]),
                           "content": st.one_of(st.text(max_size=12), st.integers(), st.none(),
                                                st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                                "text": st.text(max_size=5)}), max_size=2))}),
    _json_values), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(parameters=_parameters, messages=_messages)
def test_random_requests_get_an_answer_or_an_openai_error(api, parameters, messages):
    """Whatever the body, the answer is a completion or an OpenAI-shaped 4xx naming the parameter; never a
    500, never a hang, and the server keeps serving."""
    body = {"model": api["model"], "messages": messages, "max_tokens": 3, **parameters}
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep the accepted ones short; the bounds are tested above
    response = httpx.post(f"{api['url']}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60)
    assert response.status_code in (200, 400), (response.status_code, response.text, body)
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
        assert error["param"] is None or isinstance(error["param"], str)
    elif body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        # max_tokens: null asks for the server's default length, not for 8 at most.
        asked = body.get("max_tokens")
        bound = asked if isinstance(asked, int) and not isinstance(asked, bool) else DEFAULT_MAX_NEW_TOKENS
        assert response.json()["usage"]["completion_tokens"] <= bound


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(st.binary(max_size=40), st.integers(1, 200_000).map(lambda depth: b"[" * depth),
                      st.text(max_size=40).map(str.encode)))
def test_malformed_json_is_an_openai_400_that_says_what_and_where(api, body):
    response = httpx.post(f"{api['url']}/v1/chat/completions", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        parsed = isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        parsed = False
    expected = (400, 404) if parsed else (400,)  # a JSON object without the model: 404 model_not_found
    assert response.status_code in expected, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["message"] and (parsed or "not valid JSON" in error["message"] or "JSON object" in error["message"]), error


def test_deeply_nested_json_says_where(api):
    response = httpx.post(f"{api['url']}/v1/completions", content=b"[" * 100_000, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["error"]["message"]
    assert "at char 500" in response.json()["error"]["message"]
    cut = httpx.post(f"{api['url']}/v1/completions", content=b'{"model": ', timeout=60,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert cut.status_code == 400 and "line 1 column 11 (char 10)" in cut.json()["error"]["message"]


def test_every_replica_serves_the_openai_api_next_to_its_engine(slow_model):
    """No gRPC port needed: each worker serves the API itself, on one port shared by the replicas of this
    machine (the kernel spreads new connections over them)."""
    for attempt in range(3):
        # A port free when picked can be taken by the random internal ports Jina gives the replicas and the
        # gateway before the API binds it (seen once in CI: EADDRINUSE): a start that lost that race is retried.
        http_port, openai_port = free_port(), free_port()
        args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--protocol", "http", "--port",
                str(http_port), "--replicas", "2", "--openai-port", str(openai_port)]
        with serve_process(args, timeout=240) as (process, log):
            if process.poll() is not None and "Address already in use" in log.read_text() and attempt < 2:
                continue
            check_both_replicas_answer(process, log, slow_model, openai_port)
            return


def check_both_replicas_answer(process, log, slow_model, openai_port):
    assert process.poll() is None, log.read_text()
    assert log.read_text().count("OpenAI-compatible API on port") == 2, log.read_text()
    for index in range(12):  # a new client each time: a new connection
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model=str(slow_model), messages=HELLO, max_tokens=2)
        assert answer.choices[0].finish_reason in ("length", "stop")
        client.close()
    served_by = set(re.findall(r"pid=(\d+) request=\S+ endpoint=/v1/chat/completions", log.read_text()))
    assert len(served_by) == 2, f"both replicas answered: {served_by}"


def test_non_finite_numbers_in_the_json_are_refused(api):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}' % api["model"]
    response = httpx.post(f"{api['url']}/v1/chat/completions", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
