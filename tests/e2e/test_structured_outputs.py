"""Structured outputs and log-probabilities through a real server: OpenAI's response_format (and vLLM's
guided_* keys) and logprobs with the official `openai` package, gen_conf.response_format and gen_conf.logprobs
through the Jina Client on /chat and /stream. A random model writes gibberish unless constrained: every
answer here parses and validates."""

import ast
import json
import re

import jsonschema
import openai
import pytest
from docarray import BaseDoc, DocList
from pydantic import BaseModel, conint, constr

from conftest import PYTHON, ROOT, free_port, post_chat, run, serve_process, stream_doc
from schemas import Prompt

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    name: constr(max_length=16)  # an unbounded string lets a random model write until max_tokens
    age: conint(ge=0, le=130)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny chat model (random) with a context long enough for the tools the fallback writes into the
    system message."""
    from tiny_models import CHATML_TEMPLATE, build_gpt2, build_tokenizer

    model = build_gpt2(tmp_path_factory.mktemp("served") / "chat", build_tokenizer(chat_template=CHATML_TEMPLATE),
                       n_positions=2048, initializer_range=0.2)
    grpc_port, openai_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(model), "--port", str(grpc_port),
            "--openai-port", str(openai_port), "--max_batch_size", "8"]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield {"grpc": grpc_port, "openai": openai_port, "model": str(model),
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="none", max_retries=0)}


def json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_parse_with_a_pydantic_model(served):
    completion = served["client"].chat.completions.parse(model=served["model"], messages=ASK, response_format=Person,
                                                         max_tokens=120, seed=1)
    assert isinstance(completion.choices[0].message.parsed, Person)
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_answers_sampled_with_seeds_validate_whole_and_streamed(served, seed):
    client, fmt = served["client"], json_schema_format(PERSON)
    whole = client.chat.completions.create(model=served["model"], messages=ASK, response_format=fmt, seed=seed,
                                           max_tokens=120)
    jsonschema.validate(json.loads(whole.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(model=served["model"], messages=ASK, response_format=fmt, seed=seed,
                                            max_tokens=120, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content, "the same seed, streamed or not"


def test_json_object_and_vllms_guided_keys(served):
    client = served["client"]
    answer = client.chat.completions.create(model=served["model"], messages=ASK, max_tokens=150,
                                            response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    regex = client.completions.create(model=served["model"], prompt="Code:", max_tokens=20, temperature=0,
                                      extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", regex.choices[0].text), regex.choices[0].text
    choice = client.chat.completions.create(model=served["model"], messages=ASK, max_tokens=20,
                                            extra_body={"guided_choice": ["red", "green"]})
    assert choice.choices[0].message.content in ("red", "green")


def test_an_invalid_schema_is_a_400_naming_response_format(served):
    with pytest.raises(openai.BadRequestError) as raised:
        served["client"].chat.completions.create(model=served["model"], messages=ASK, max_tokens=10,
                                                 response_format=json_schema_format({"type": "object",
                                                                                     "properties": 7}))
    assert raised.value.body["param"].startswith("response_format"), raised.value.body
    with pytest.raises(openai.BadRequestError) as raised:
        served["client"].chat.completions.create(model=served["model"], messages=ASK, max_tokens=10,
                                                 extra_body={"guided_regex": "(unclosed"})
    assert raised.value.body["param"] == "guided_regex", raised.value.body


def test_jina_gen_conf_response_format_on_chat_and_stream(served):
    prompts = DocList[Prompt]([
        Prompt(message=ASK, gen_conf={"response_format": {"type": "regex", "pattern": "[0-9]{4}"}, "max_new_tokens": 10}),
        Prompt(message=ASK, gen_conf={"response_format": {"type": "choice", "choices": ["up", "down"]},
                                      "max_new_tokens": 10, "do_sample": True, "seed": 4}),
        Prompt(message=ASK, gen_conf={"max_new_tokens": 10}),  # free text beside them
    ])
    answers = run(post_chat(served["grpc"], prompts))
    assert re.fullmatch("[0-9]{4}", answers[0].text) and answers[1].text in ("up", "down")
    assert answers[0].finish_reason == answers[1].finish_reason == "stop"
    pieces = run(stream_doc(served["grpc"], Prompt(message=ASK, gen_conf={
        "response_format": json_schema_format(PERSON), "max_new_tokens": 120})))
    jsonschema.validate(json.loads("".join(p.text for p in pieces)), PERSON)
    with pytest.raises(Exception, match="gen_conf.response_format"):
        run(post_chat(served["grpc"], DocList[Prompt]([Prompt(message=ASK, gen_conf={"response_format": "json"})])))


def test_the_readme_examples_run_as_written(served, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Structured outputs"):readme.index("### Tool calls")]
    examples = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(examples) == 2
    for code in examples:
        code = (code.replace("localhost:12345", f"127.0.0.1:{served['grpc']}")
                .replace("localhost:8000", f"127.0.0.1:{served['openai']}").replace('model="SmolLM2-135M-Instruct"', f"model={served['model']!r}"))
        exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    texts = ast.literal_eval(printed[0])
    assert isinstance(json.loads(texts[0]), dict) and texts[1] in ("yes", "no")
    assert re.fullmatch("(nurse|doctor|teacher) from [A-Z][a-z]{1,12}", texts[2])
    assert "name=" in printed[1] and "age=" in printed[1]


def test_chat_logprobs_whole_streamed_and_through_jina_agree(served):
    client = served["client"]
    asked = dict(model=served["model"], messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                 extra_body={"min_tokens": 8})
    whole = client.chat.completions.create(**asked).choices[0].logprobs.content
    assert len(whole) == 8
    for entry in whole:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = [e for chunk in client.chat.completions.create(**asked, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    gen_conf = {"max_new_tokens": 8, "min_new_tokens": 8, "logprobs": True, "top_logprobs": 2}
    [jina] = run(post_chat(served["grpc"], DocList[Prompt]([Prompt(message=ASK, gen_conf=gen_conf)])))
    assert [(e["token"], round(e["logprob"], 5)) for e in jina.logprobs] == [(e.token, round(e.logprob, 5)) for e in whole]

    class TextOnly(BaseDoc):
        text: str = ""

    [plain] = run(post_chat(served["grpc"], DocList[Prompt]([Prompt(message=ASK, gen_conf=gen_conf)]),
                            generation_cls=TextOnly))
    assert plain.text == jina.text, "a client that declares only text keeps working"


def test_completions_logprobs_in_the_legacy_shape(served):
    answer = served["client"].completions.create(model=served["model"], prompt="Once upon", max_tokens=5,
                                                 temperature=0, logprobs=3, extra_body={"min_tokens": 5})
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    # greedy: nothing listed is more likely than the chosen token (tokens that decode to the same text share
    # one key of the legacy {token: logprob} shape)
    assert all(len(top) <= 3 and max(top.values()) <= chosen + 1e-6
               for top, chosen in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    with pytest.raises(openai.BadRequestError) as raised:
        served["client"].chat.completions.create(model=served["model"], messages=ASK, max_tokens=4, logprobs=True,
                                                 top_logprobs=21)
    assert raised.value.body["param"] == "top_logprobs"


def test_n_choices_share_one_call_and_stream_with_their_index(served):
    client = served["client"]
    asked = dict(model=served["model"], messages=ASK, max_tokens=6, seed=11, n=3, extra_body={"min_tokens": 6})
    whole = client.chat.completions.create(**asked)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert whole.usage.completion_tokens == 18
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1, "seed + index: the choices differ"
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=served["model"], messages=ASK, max_tokens=2, n=9)
    assert raised.value.body["param"] == "n" and "n <= 8" in raised.value.body["message"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
    "additionalProperties": False}}}


def test_tool_calls_required_named_streamed_and_a_follow_up_turn(served):
    client = served["client"]
    asked = dict(model=served["model"], messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
                 max_tokens=150, seed=3)
    forced = client.chat.completions.create(**asked, tool_choice="required")
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    named = client.chat.completions.create(**asked, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"

    deltas, reasons = [], []
    for chunk in client.chat.completions.create(**asked, tool_choice="required", stream=True):
        for streamed in chunk.choices:
            deltas += streamed.delta.tool_calls or []
            reasons += [streamed.finish_reason] if streamed.finish_reason else []
    assert [d.function.name for d in deltas] == ["get_weather"] and reasons == ["tool_calls"]
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER["function"]["parameters"])

    follow_up = client.chat.completions.create(model=served["model"], tools=[WEATHER], max_tokens=8, messages=[
        *asked["messages"], choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}], tool_choice="none")
    assert follow_up.choices[0].finish_reason in ("stop", "length") and follow_up.choices[0].message.content
    auto = client.chat.completions.create(**asked)  # a random model rarely writes a call: its text stays content
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tools_are_400s_naming_the_parameter(served):
    client = served["client"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=served["model"], messages=ASK, max_tokens=4,
                                       tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert raised.value.body["param"].startswith("tools"), raised.value.body
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=served["model"], messages=ASK, max_tokens=4, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert raised.value.body["param"] == "tool_choice", raised.value.body
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=served["model"], messages=ASK, max_tokens=4, tools=[broken],
                                       tool_choice="required")
    assert raised.value.body["param"] == "tools", raised.value.body


def test_the_readme_tool_call_example_runs_as_written(served, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Tool calls"):readme.index("## Many users at once")]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    code = code.replace("localhost:8000", f"127.0.0.1:{served['openai']}").replace('model="SmolLM2-135M-Instruct"', f"model={served['model']!r}")
    exec(compile(code, "README.md", "exec"), {})
    name, arguments = capsys.readouterr().out.splitlines()[0].split(" ", 1)
    assert name == "get_weather" and "city" in json.loads(arguments)


def test_auto_finds_the_call_a_model_writes_of_its_own_accord(tmp_path):
    """A tiny model trained to answer this question with a <tool_call> block: tool_choice auto returns it as
    a tool call, whole and streamed; without tools (tool_choice none) it stays text."""
    from helpers import TOOL_CALL_ANSWER, build_tool_calling_model

    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    model = build_tool_calling_model(tmp_path, messages, [WEATHER])
    openai_port = free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(model), "--port", str(free_port()), "--openai-port",
            str(openai_port)]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="none", max_retries=0)
        asked = dict(model=str(model), messages=messages, tools=[WEATHER], max_tokens=60, temperature=0)
        answer = client.chat.completions.create(**asked).choices[0]
        assert answer.finish_reason == "tool_calls", answer
        assert answer.message.tool_calls[0].function.name == "get_weather"
        assert json.loads(answer.message.tool_calls[0].function.arguments) == {"city": "Oslo"}
        deltas = [d for chunk in client.chat.completions.create(**asked, stream=True) for c in chunk.choices
                  for d in (c.delta.tool_calls or [])]
        assert [json.loads(d.function.arguments) for d in deltas] == [{"city": "Oslo"}]
        plain = client.chat.completions.create(**asked, tool_choice="none").choices[0]
        assert plain.message.content == TOOL_CALL_ANSWER and not plain.message.tool_calls
