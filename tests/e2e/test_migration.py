"""Request migration through `jina_server.py --replicas N`: the replica serving a stream is killed (SIGKILL) after
the client has its 5th piece, and the stream goes on on another replica. The client's whole answer equals the
uninterrupted answer byte for byte (greedy and seeded). With `--migrations 0` the client gets the error, as
tests/e2e/test_faults.py checks. Whole answers (`/chat`, a non-streamed OpenAI completion) whose replica is killed
mid-generation are sent again from their start to another replica (bounded the same way), over gRPC and over
Jina's WebSocket; the routers' counters (`--monitoring`) say what happened."""

import asyncio
import os
import re
import signal

from docarray import DocList

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
    port, gateway_metrics = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--port", str(port), "--replicas", "3",
            "--max_batch_size", "2", "--monitoring", "--port-monitoring", str(free_port()),
            "--gateway-port-monitoring", str(gateway_metrics)]
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
            assert migrations_counted(gateway_metrics)["continued"] == number
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
            "--max_batch_size", "2", "--openai-port", str(openai_port), "--monitoring"]
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
        assert migrations_counted(openai_port, "/metrics") == \
            {"continued": 1, "reissued": 0, "exhausted": 0, "no_replica": 0}
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


# ---- whole answers: /chat and non-streamed OpenAI completions ---------------------------------------------
WHOLE = {"max_new_tokens": 400, "min_new_tokens": 400, "temperature": 0}  # about 3 s on one replica here


def counter(port: int, name: str, labels: str, path: str = "/") -> float:
    """A counter's value on a Prometheus endpoint, e.g. counter(p, "jina_llm_stream_migrations_total",
    'outcome="reissued"')."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).text
    line = f"{name}{{{labels}}} "
    values = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
    assert len(values) == 1, f"{line!r} not in {text[-2000:]}"
    return values[0]


def migrations_counted(port: int, path: str = "/") -> dict:
    return {outcome: counter(port, "jina_llm_stream_migrations_total", f'outcome="{outcome}"', path)
            for outcome in ("continued", "reissued", "exhausted", "no_replica")}


async def killed_midway(alive: set, answer, delay: float = 0.3):
    """``answer`` (a coroutine) with the replica generating it SIGKILLed once it has run ``delay`` s (plus the
    half second ``busiest`` watches); its result, or the exception it raised."""
    task = asyncio.ensure_future(answer)
    await asyncio.sleep(delay)
    victim = await asyncio.get_running_loop().run_in_executor(None, busiest, sorted(alive))
    assert not task.done(), "the answer was complete before its replica could be killed"
    os.kill(victim, signal.SIGKILL)
    alive.discard(victim)
    try:
        return await task
    except Exception as error:  # noqa: BLE001 - the test looks at it
        return error


async def grpc_chat(port: int, gen_conf: dict, protocol: str = "grpc") -> Generation:
    from jina import Client

    client = Client(host=f"{protocol}://127.0.0.1:{port}", asyncio=True)
    answers = [doc async for docs in client.post("/chat", inputs=Prompt(message=MESSAGES, gen_conf=gen_conf),
                                                 return_type=DocList[Generation]) for doc in docs]
    return answers[0]


async def openai_whole(port: int, model: str) -> str:
    """A non-streamed chat completion through the official client (no retries of its own)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as client:
        answer = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=400, temperature=0,
                                                      extra_body={"min_tokens": 400})
    return answer.choices[0].message.content


def whole_answer_server(slow_model, replicas: int, migrations: int):
    """(args, ports) of a server with --monitoring: the gateway's metrics port and the OpenAI router's port."""
    port, metrics, gateway_metrics, openai_port = free_port(), free_port(), free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--port", str(port), "--replicas",
            str(replicas), "--max_batch_size", "2", "--migrations", str(migrations), "--openai-port",
            str(openai_port), "--monitoring", "--port-monitoring", str(metrics), "--gateway-port-monitoring",
            str(gateway_metrics)]
    return args, {"grpc": port, "gateway_metrics": gateway_metrics, "openai": openai_port}


def test_a_killed_replica_s_chat_and_whole_openai_answers_are_sent_again_elsewhere(slow_model):
    args, ports = whole_answer_server(slow_model, replicas=3, migrations=1)
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        alive = {int(pid) for pid in replica_pids(log)}
        assert len(alive) == 3, log.read_text()
        whole = run(grpc_chat(ports["grpc"], WHOLE))
        before = migrations_counted(ports["gateway_metrics"])
        cut = run(killed_midway(alive, grpc_chat(ports["grpc"], WHOLE)))
        assert isinstance(cut, Generation), cut
        assert (cut.text, cut.completion_tokens) == (whole.text, whole.completion_tokens)
        after = migrations_counted(ports["gateway_metrics"])
        assert after == {**before, "reissued": before["reissued"] + 1}, (before, after)
        assert re.search(r"a /chat call's replica \S+ stopped before answering", log.read_text(errors="replace"))

        model = run(openai_model(ports["openai"]))
        whole_text = run(openai_whole(ports["openai"], model))
        assert whole_text == whole.text  # the same greedy answer as /chat's
        cut_text = run(killed_midway(alive, openai_whole(ports["openai"], model)))
        assert cut_text == whole_text, cut_text
        assert migrations_counted(ports["openai"], "/metrics") == \
            {"continued": 0, "reissued": 1, "exhausted": 0, "no_replica": 0}
        assert re.search(r"a whole answer's replica \S+ stopped before answering", log.read_text(errors="replace"))
        assert len(alive) == 1 and process.poll() is None


def test_without_migrations_a_killed_replica_s_whole_answers_are_errors(slow_model):
    import openai
    from jina.excepts import BadServerFlow

    args, ports = whole_answer_server(slow_model, replicas=2, migrations=0)
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        alive = {int(pid) for pid in replica_pids(log)}
        assert len(alive) == 2, log.read_text()
        cut = run(killed_midway(alive, grpc_chat(ports["grpc"], WHOLE)))
        assert isinstance(cut, BadServerFlow) and "the answer was cut off" in str(cut), repr(cut)
        assert migrations_counted(ports["gateway_metrics"])["exhausted"] == 1
        model = run(openai_model(ports["openai"]))
        cut = run(killed_midway(alive, openai_whole(ports["openai"], model)))
        assert isinstance(cut, openai.InternalServerError) and "the answer was cut off" in str(cut), repr(cut)
        assert migrations_counted(ports["openai"], "/metrics")["exhausted"] == 1
        assert not re.search(r"stopped before answering", log.read_text(errors="replace"))


# ---- WebSocket: a stream of /chat requests over one connection --------------------------------------------
def websocket_prompts(count: int) -> list:
    return [Prompt(message=[{"role": "user", "content": f"Tell me everything about river number {n}."}],
                   gen_conf={"max_new_tokens": 300, "min_new_tokens": 300, "temperature": 0}) for n in range(count)]


async def websocket_answers(port: int, prompts: list, on_piece=None) -> list:
    """Jina's WebSocket client: one request per prompt over one connection, each answer back as soon as it is
    complete (Jina streams no tokens over WebSocket: each answer is a piece of the connection's stream)."""
    from jina import Client

    client = Client(host=f"websocket://127.0.0.1:{port}", asyncio=True)
    answers = []
    async for docs in client.post("/chat", inputs=DocList[Prompt](prompts), request_size=1, results_in_order=False,
                                  return_type=DocList[Generation]):
        answers.extend(docs)
        if on_piece is not None:
            await on_piece(len(answers))
    return answers


def test_websocket_requests_are_routed_and_go_on_when_their_replica_dies(slow_model):
    """Through a Flow's gateway (what --protocol websocket serves): a long prompt sent twice meets its prefix
    (the routed counter), and a stream of 12 requests whose busiest replica is killed after the 5th answer came
    (each replica answers two at a time: the third pair is in flight then) completes equal to the uninterrupted
    run, the killed replica's requests sent again to the other one."""
    ws_port, metrics = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--protocol", "websocket", "--port",
            str(ws_port), "--replicas", "2", "--max_batch_size", "2", "--monitoring", "--port-monitoring",
            str(metrics)]
    routed = lambda reason: counter(metrics, "jina_llm_stream_routed_requests_total", f'reason="{reason}"')  # noqa
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        alive = {int(pid) for pid in replica_pids(log)}
        assert len(alive) == 2, log.read_text()
        long_prompt = Prompt(message=[{"role": "system", "content": "You know all rivers of the world. " * 12},
                                      {"role": "user", "content": "Which is longest?"}], gen_conf={"max_new_tokens": 4})
        before = routed("prefix"), routed("least_loaded")
        run(websocket_answers(ws_port, [long_prompt]))
        run(websocket_answers(ws_port, [long_prompt]))
        assert (routed("prefix"), routed("least_loaded")) == (before[0] + 1, before[1] + 1)

        prompts = websocket_prompts(12)
        whole = run(websocket_answers(ws_port, prompts))
        cut = run(websocket_answers(ws_port, prompts, killer(alive)))
        assert len(alive) == 1
        assert len({a.text for a in whole}) == 12  # distinct answers: equal as sets means each equals its own
        assert sorted((a.text, a.completion_tokens) for a in cut) == sorted((a.text, a.completion_tokens) for a in whole)
        reissued = counter(metrics, "jina_llm_stream_migrations_total", 'outcome="reissued"')
        moved = re.findall(r"a /chat call's replica \S+ stopped before answering", log.read_text(errors="replace"))
        assert reissued == len(moved) >= 1, "\n".join(line[:220] for line in log.read_text(errors="replace")
                                                       .splitlines() if "endpoint=/chat" in line or "connect" in line
                                                       or "stopped" in line or "rror" in line)
        assert process.poll() is None
