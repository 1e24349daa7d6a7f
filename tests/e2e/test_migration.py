"""Request migration through `jina_server.py --replicas N`: the replica serving a stream is killed (SIGKILL) after
the client has its 5th piece, and the stream goes on on another replica. The client's whole answer equals the
uninterrupted answer byte for byte (greedy and seeded). With `--migrations 0` the client gets the error, as
tests/e2e/test_faults.py checks."""

import asyncio
import os
import re
import signal

from conftest import PYTHON, free_port, run, serve_process
from schemas import Generation, Prompt
from test_faults import busiest, replica_pids

MESSAGES = [{"role": "user", "content": "Tell me everything about rivers."}]
GREEDY = {"max_new_tokens": 200, "min_new_tokens": 200, "temperature": 0}
SEEDED = {"max_new_tokens": 200, "min_new_tokens": 200, "do_sample": True, "temperature": 0.9, "top_p": 0.95,
          "seed": 11}


async def grpc_answer(port: int, gen_conf: dict, on_piece=None) -> list:
    """Every piece of a gRPC stream_doc; ``on_piece(count)`` is awaited after each one."""
    from jina import Client

    pieces = []
    async for piece in Client(host=f"grpc://127.0.0.1:{port}", asyncio=True).stream_doc(
            on="/stream", inputs=Prompt(message=MESSAGES, gen_conf=gen_conf), return_type=Generation):
        pieces.append(piece)
        if on_piece is not None:
            await on_piece(len(pieces))
    return pieces


def killer(alive: set, after: int = 5):
    """An ``on_piece`` that SIGKILLs the replica generating now (of ``alive``) once the client has ``after``
    pieces; the killed pid leaves ``alive``."""
    async def on_piece(count: int) -> None:
        if count == after:
            victim = await asyncio.get_running_loop().run_in_executor(None, busiest, sorted(alive))
            os.kill(victim, signal.SIGKILL)
            alive.discard(victim)
    return on_piece


def test_a_killed_replica_s_greedy_and_seeded_streams_go_on_on_another_replica(slow_model):
    port = free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--port", str(port), "--replicas", "3",
            "--max_batch_size", "2"]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        alive = {int(pid) for pid in replica_pids(log)}
        assert len(alive) == 3, log.read_text()
        for number, gen_conf in enumerate((GREEDY, SEEDED), start=1):
            whole = run(grpc_answer(port, gen_conf))
            cut = run(grpc_answer(port, gen_conf, killer(alive)))
            assert len(alive) == 3 - number
            assert "".join(p.text for p in cut) == "".join(p.text for p in whole)
            assert [(p.finish_reason, p.completion_tokens) for p in cut[-1:]] == \
                [(whole[-1].finish_reason, whole[-1].completion_tokens)]
            assert all(p.token_ids is None for p in cut), "the router's token ids reached the client"
            moved = re.findall(r"a stream's replica \S+ stopped after (\d+) tokens", log.read_text(errors="replace"))
            assert len(moved) == number and 0 < int(moved[-1]) < 200, log.read_text(errors="replace")[-3000:]
        assert process.poll() is None


async def openai_events(port: int, body: dict, on_piece=None) -> list:
    """The raw events of a streamed chat completion through the OpenAI router; ``on_piece(count)`` is awaited
    after each content chunk."""
    import httpx

    events, pieces = [], 0
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line)
                if '"content": "' in line and on_piece is not None:
                    pieces += 1
                    await on_piece(pieces)
    return events


def same_stream(events: list) -> list:
    """The events with each chunk's ``id`` and ``created`` (new for every request) left out."""
    return [re.sub(r'"id": "[^"]+", "object": "([^"]+)", "created": \d+', r'"object": "\1"', e) for e in events]


async def sse_text(port: int, gen_conf: dict, on_piece=None) -> tuple:
    """(text, last event) of Jina's HTTP /stream (Server-Sent Events through the gateway)."""
    import json

    import httpx

    pieces = []
    async with httpx.AsyncClient(timeout=120) as http:
        body = {"message": MESSAGES, "gen_conf": gen_conf}
        async with http.stream("GET", f"http://127.0.0.1:{port}/stream", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip().startswith("{"):
                    pieces.append(json.loads(line[5:]))
                    if on_piece is not None:
                        await on_piece(len(pieces))
    return "".join(p["text"] for p in pieces), pieces[-1]


def test_a_killed_replica_s_openai_stream_goes_on_on_another_replica(slow_model):
    port, openai_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--port", str(port), "--replicas", "2",
            "--max_batch_size", "2", "--openai-port", str(openai_port)]
    body = {"messages": MESSAGES, "max_tokens": 200, "min_tokens": 200, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        alive = {int(pid) for pid in replica_pids(log)}
        assert len(alive) == 2, log.read_text()
        body["model"] = run(openai_model(openai_port))
        whole = run(openai_events(openai_port, body))
        cut = run(openai_events(openai_port, body, killer(alive)))
        assert len(alive) == 1
        assert same_stream(cut) == same_stream(whole)  # no repeated role chunk, the same pieces, usage and end
        assert len({re.search(r'"id": "([^"]+)"', e).group(1) for e in cut if '"id"' in e}) == 1
        assert "token_ids" not in "".join(cut)
        assert re.search(r"a stream's replica \S+ stopped after \d+ tokens", log.read_text(errors="replace"))
        assert process.poll() is None


async def openai_model(port: int) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.get(f"http://127.0.0.1:{port}/v1/models")).json()["data"][0]["id"]


def test_a_killed_replica_s_http_event_stream_goes_on_on_another_replica(slow_model):
    grpc_port, http_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--protocol", "grpc", "http", "--port",
            str(grpc_port), str(http_port), "--replicas", "2", "--max_batch_size", "2"]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        alive = {int(pid) for pid in replica_pids(log)}
        assert len(alive) == 2, log.read_text()
        text, last = run(sse_text(http_port, GREEDY))
        cut_text, cut_last = run(sse_text(http_port, GREEDY, killer(alive)))
        assert len(alive) == 1
        assert (cut_text, cut_last["completion_tokens"], cut_last.get("token_ids")) == \
            (text, last["completion_tokens"], None)
        assert re.search(r"a stream's replica \S+ stopped after \d+ tokens", log.read_text(errors="replace"))
        assert process.poll() is None
