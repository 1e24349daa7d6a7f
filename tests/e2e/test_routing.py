"""Prefix-aware routing through the gateway of `jina_server.py --replicas 2`: multi-turn chats keep meeting their
cached prefix (as on one replica, and more than with round robin, measured in the same test), and one hot
prefix still uses both replicas."""

import asyncio
import json
import re
import time

import httpx
import openai

from docarray import DocList
from jina import Client

from conftest import PYTHON, free_port, run, serve_process
from schemas import Generation, Prompt

CONVERSATIONS, TURNS, NEW_TOKENS = 7, 4, 8  # an odd number: Jina's turns cannot line up with the chats'
TOPICS = "rivers mountains bridges lighthouses gardens trains harbours libraries".split()


def system_prompt(number: int) -> str:
    """A distinct system prompt per conversation, long enough that its blocks are worth routing for."""
    topic = TOPICS[number]
    return f"Conversation {number}. You are a guide who knows everything about {topic}. " + \
        f"Answer each question about {topic} in one short sentence, and mention the {topic} by name. " * 3


async def conversation_turn(client, messages: list, turn: int) -> Generation:
    """Odd turns through /chat (a batch request), even turns through /stream (a streamed one)."""
    prompt = Prompt(message=messages, gen_conf={"max_new_tokens": NEW_TOKENS})
    if turn % 2 == 0:
        return [doc async for docs in client.post("/chat", inputs=prompt, return_type=DocList[Generation])
                for doc in docs][0]
    pieces = [p async for p in client.stream_doc(on="/stream", inputs=prompt, return_type=Generation)]
    return Generation(text="".join(p.text for p in pieces), prompt_tokens=pieces[-1].prompt_tokens,
                      cached_tokens=pieces[-1].cached_tokens)


async def http_turn(http, url: str, messages: list, turn: int) -> Generation:
    """The same over plain HTTP: POST /chat with {"data": [prompt]}, GET /stream answered with events."""
    prompt = {"message": messages, "gen_conf": {"max_new_tokens": NEW_TOKENS}}
    if turn % 2 == 0:
        response = await http.post(f"{url}/chat", json={"data": [prompt]})
        return Generation(**response.json()["data"][0])
    pieces = []
    async with http.stream("GET", f"{url}/stream", json=prompt) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:") and line[5:].strip().startswith("{"):
                pieces.append(json.loads(line[5:]))
    return Generation(text="".join(p["text"] for p in pieces), prompt_tokens=pieces[-1]["prompt_tokens"],
                      cached_tokens=pieces[-1]["cached_tokens"])


async def openai_turn(client, messages: list) -> Generation:
    model = (await client.models.list()).data[0].id
    answer = await client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS,
                                                  temperature=0)
    usage = answer.usage
    return Generation(text=answer.choices[0].message.content, prompt_tokens=usage.prompt_tokens,
                      cached_tokens=usage.prompt_tokens_details.cached_tokens)


async def chats(port: int, protocol: str = "grpc") -> tuple:
    """Every conversation's turns, the conversations at once; (prompt tokens, cached tokens) of turns 2-4."""
    if protocol == "openai":
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as client:
            return await chat_turns(lambda messages, turn: openai_turn(client, messages))
    if protocol == "http":
        async with httpx.AsyncClient(timeout=120) as http:
            return await chat_turns(lambda messages, turn: http_turn(http, f"http://127.0.0.1:{port}", messages, turn))
    client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
    return await chat_turns(lambda messages, turn: conversation_turn(client, messages, turn))


async def chat_turns(send) -> tuple:
    histories = [[{"role": "system", "content": system_prompt(n)}] for n in range(CONVERSATIONS)]
    prompt_tokens = cached_tokens = 0
    for turn in range(TURNS):
        for number, history in enumerate(histories):
            history.append({"role": "user", "content": f"Question {turn} about {TOPICS[number]}?"})
        answers = await asyncio.gather(*(send(history, turn) for history in histories))
        for history, answer in zip(histories, answers):
            history.append({"role": "assistant", "content": answer.text})
            if turn > 0:
                prompt_tokens += answer.prompt_tokens
                cached_tokens += answer.cached_tokens
    return prompt_tokens, cached_tokens


def served(tiny_models, replicas: int, routing: str, scenario, protocol="grpc", openai_port=None, wait_for=None):
    """Run ``scenario(port)`` against a server; (its result, the log's path). ``wait_for``: a pattern the log
    must show (up to 15 s) before the server stops."""
    port = free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(tiny_models["chat"]), "--port", str(port),
            "--protocol", protocol, "--replicas", str(replicas), "--routing", routing, "--max_batch_size", "8"]
    if openai_port:
        args += ["--openai-port", str(openai_port)]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        run(until_every_replica_answers(port, log, replicas, protocol))
        result = run(scenario(openai_port or port))
        deadline = time.monotonic() + 15
        while wait_for and not re.search(wait_for, log.read_text(errors="replace")) and time.monotonic() < deadline:
            time.sleep(0.1)
        return result, log


async def until_every_replica_answers(port: int, log, replicas: int, protocol: str) -> None:
    """The gateway connects to the replicas as they come up, one by one: until it reaches them all it sends
    everything to those it has. Short prompts (routed by load) until each replica has answered one."""
    client = Client(host=f"{protocol}://127.0.0.1:{port}", asyncio=True)
    prompt = Prompt(message=[{"role": "user", "content": "hi"}], gen_conf={"max_new_tokens": 2})

    async def one():
        try:
            return [p async for p in client.stream_doc(on="/stream", inputs=prompt, return_type=Generation)]
        except ConnectionError as error:  # the server's own account of why its gateway is not there
            raise AssertionError(f"{error}\nserver log (end):\n{log.read_text(errors='replace')[-6000:]}") from error

    assert "ready to serve" in log.read_text(errors="replace"), log.read_text(errors="replace")[-6000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.gather(*(one() for _ in range(replicas)))
        if len(set(re.findall(r"pid=(\d+) request=\d+ endpoint=/stream ", log.read_text(errors="replace")))) == replicas:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"not every replica answered within 60 s: {log.read_text(errors='replace')}")


def test_chats_through_two_replicas_find_their_prefix_as_on_one(tiny_models):
    (one_prompt, one_cached), _ = served(tiny_models, 1, "prefix", chats)
    (routed_prompt, routed_cached), _ = served(tiny_models, 2, "prefix", chats)
    (rr_prompt, rr_cached), _ = served(tiny_models, 2, "round_robin", chats)
    one, routed, round_robin = one_cached / one_prompt, routed_cached / routed_prompt, rr_cached / rr_prompt
    print(f"cached share of turns 2-{TURNS}: one replica {one:.3f}, two routed {routed:.3f}, two round robin "
          f"{round_robin:.3f}")
    assert routed_prompt == one_prompt == rr_prompt  # the same greedy answers, so the same prompts
    assert routed >= 0.9 * one, (one, routed, round_robin)
    assert round_robin < routed, (one, routed, round_robin)


def test_plain_http_chats_through_two_replicas_find_their_prefix_as_on_one(tiny_models):
    """An HTTP-only Deployment's replicas sit behind Jina's HTTP balancer, which routes the same way."""
    (one_prompt, one_cached), _ = served(tiny_models, 1, "prefix", lambda port: chats(port, "http"), "http")
    (routed_prompt, routed_cached), _ = served(tiny_models, 2, "prefix", lambda port: chats(port, "http"), "http")
    one, routed = one_cached / one_prompt, routed_cached / routed_prompt
    print(f"HTTP: cached share of turns 2-{TURNS}: one replica {one:.3f}, two routed {routed:.3f}")
    assert routed_prompt == one_prompt and routed >= 0.9 * one, (one, routed)


def test_openai_chats_through_two_replicas_find_their_prefix_as_on_one(tiny_models):
    """With several replicas the OpenAI port is a router's (executor/gateway.py), which routes the same way;
    with one, the replica serves the port itself."""
    scenario = lambda port: chats(port, "openai")  # noqa: E731
    (one_prompt, one_cached), _ = served(tiny_models, 1, "prefix", scenario, openai_port=free_port())
    (routed_prompt, routed_cached), log_path = served(tiny_models, 2, "prefix", scenario, openai_port=free_port())
    log = log_path.read_text(errors="replace")
    one, routed = one_cached / one_prompt, routed_cached / routed_prompt
    print(f"OpenAI API: cached share of turns 2-{TURNS}: one replica {one:.3f}, two routed {routed:.3f}")
    assert "OpenAI API router on port" in log
    assert routed_prompt == one_prompt and routed >= 0.9 * one, (one, routed)
    served_by = set(re.findall(r"pid=(\d+) request=\S+ endpoint=/v1/chat/completions", log))
    assert len(served_by) == 2, served_by


def test_one_hot_prefix_still_uses_both_replicas(tiny_models):
    async def burst(port):
        client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)

        async def one(number):
            prompt = Prompt(message=[{"role": "system", "content": system_prompt(0)},
                                     {"role": "user", "content": f"Question {number}?"}],
                            gen_conf={"max_new_tokens": 24, "min_new_tokens": 24})
            return [p async for p in client.stream_doc(on="/stream", inputs=prompt, return_type=Generation)]

        return await asyncio.gather(*(one(n) for n in range(16)))

    answers, log_path = served(tiny_models, 2, "prefix", burst)
    log = log_path.read_text(errors="replace")
    assert all(pieces[-1].completion_tokens == 24 for pieces in answers)
    pids = re.findall(r"pid=(\d+) request=\d+ endpoint=/stream .* new_tokens=24 ", log)  # not the warm-up's
    assert len(pids) >= 16 and len(set(pids)) == 2, pids


def test_a_client_leaving_the_openai_router_stops_its_generation(tiny_models):
    """The router passes a client's leaving on: its connection to the replica closes, the replica cancels."""
    async def leave_midway(port):
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as client:
            model = (await client.models.list()).data[0].id
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=450,
                extra_body={"min_tokens": 450}, stream=True)
            pieces = 0
            async for _ in stream:
                pieces += 1
                if pieces == 3:
                    break
            await stream.close()
        return pieces

    ended = r"endpoint=/v1/chat/completions .* finish="
    _, log_path = served(tiny_models, 2, "prefix", leave_midway, openai_port=free_port(), wait_for=ended)
    log = log_path.read_text(errors="replace")
    assert re.search(r"endpoint=/v1/chat/completions .* finish=cancelled", log), log[-3000:]
    assert not re.search(r"endpoint=/v1/chat/completions .* new_tokens=450 ", log), "the generation went on"


def routed_counts(port: int, path: str = "/") -> tuple:
    """(prefix, least_loaded) of jina_llm_stream_routed_requests_total on a metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).text
    counts = dict(re.findall(r'^jina_llm_stream_routed_requests_total\{reason="(\w+)"\} (\S+)$', text, re.M))
    return float(counts["prefix"]), float(counts["least_loaded"])


def test_routing_counters_count_each_request_by_reason(tiny_models):
    """--monitoring: the gateway's metrics port counts the Jina protocols' requests, the OpenAI router's
    GET /metrics its own. A long prompt sent three times goes once by load (nothing matched yet), then twice by
    prefix; a short one always by load."""
    port, openai_port, gateway_metrics = free_port(), free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(tiny_models["chat"]), "--port", str(port), "--replicas",
            "2", "--openai-port", str(openai_port), "--monitoring", "--port-monitoring", str(free_port()),
            "--gateway-port-monitoring", str(gateway_metrics)]
    long = [{"role": "system", "content": system_prompt(1)}, {"role": "user", "content": "Question?"}]
    short = [{"role": "user", "content": "hi"}]

    async def grpc_requests():
        client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
        for turn, messages in enumerate([long, long, long, short, short]):
            await conversation_turn(client, messages, turn)  # /chat and /stream in turn

    async def openai_requests():
        async with httpx.AsyncClient(timeout=60) as http:
            for messages in [long, long, long, short, short]:
                response = await http.post(f"http://127.0.0.1:{openai_port}/v1/chat/completions",
                                           json={"model": str(tiny_models["chat"]), "messages": messages,
                                                 "max_tokens": 4})
                assert response.status_code == 200, response.text

    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        assert f"gateway metrics (routing, migrations) on port {gateway_metrics}" in log.read_text()
        run(until_every_replica_answers(port, log, 2, "grpc"))
        before = routed_counts(gateway_metrics)
        run(grpc_requests())
        after = routed_counts(gateway_metrics)
        assert (after[0] - before[0], after[1] - before[1]) == (2, 3), (before, after)
        assert routed_counts(openai_port, "/metrics") == (0, 0)
        run(openai_requests())
        assert routed_counts(openai_port, "/metrics") == (2, 3)
        assert routed_counts(gateway_metrics) == after  # the OpenAI router's requests are not the gateway's
