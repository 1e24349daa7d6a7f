"""Many users at once: cancellation frees the work, a full queue answers busy. A real server process."""

import asyncio
import os
import re
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from conftest import PYTHON, ROOT, free_port, run, serve_process, stream_doc
from schemas import Prompt

LONG = 1800


@pytest.fixture(scope="module")
def slow_server(slow_model):
    port, http_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--protocol", "grpc", "http",
            "--port", str(port), str(http_port), "--max_batch_size", "2", "--max_queue", "1",
            "--max_new_tokens_limit", str(LONG)]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield port, process, log, http_port


def executor_of(server: subprocess.Popen) -> psutil.Process:
    children = psutil.Process(server.pid).children(recursive=True)
    return max(children, key=lambda p: p.memory_info().rss)


def cpu_seconds(process: psutil.Process, window: float) -> float:
    before = sum(process.cpu_times()[:2])
    time.sleep(window)
    return sum(process.cpu_times()[:2]) - before


def wait_for_log(log, pattern, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, log.read_text(errors="replace"))
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared in the server log")


@pytest.mark.parametrize("endpoint", ["/stream", "/chat"])
def test_a_client_that_goes_away_stops_its_generation(slow_server, endpoint):
    port, server, log, _ = slow_server
    executor = executor_of(server)
    client = subprocess.Popen([PYTHON, str(ROOT / "tests" / "e2e" / "stream_client.py"), str(port), endpoint,
                               str(LONG)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        first = client.stdout.readline()  # a first piece (or the post went out): generation is under way
        assert first.startswith(("piece", "posted")), first
        time.sleep(1.0)
        assert cpu_seconds(executor, 0.5) > 0.25, "the executor should be busy generating now"
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()
    assert_cancelled(log, executor, endpoint)


def assert_cancelled(log, executor, endpoint):
    found = wait_for_log(log, rf"endpoint={endpoint} prompt_tokens=\d+ cached_tokens=\d+ new_tokens=(\d+) \S+ \S+ "
                              r"finish=cancelled")
    assert int(found[-1]) < LONG
    time.sleep(0.5)
    assert cpu_seconds(executor, 1.0) < 0.2, "the executor kept working after its client left"


def test_an_http_client_that_leaves_its_event_stream_stops_its_generation(slow_server):
    _, server, log, http_port = slow_server
    executor = executor_of(server)
    body = {"message": [{"role": "user", "content": "Tell me everything."}],
            "gen_conf": {"max_new_tokens": LONG, "min_new_tokens": LONG}}
    with httpx.stream("GET", f"http://127.0.0.1:{http_port}/stream", json=body, timeout=30) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        while not next(lines).startswith("data:"):  # the first piece: generation is under way
            pass
        time.sleep(1.0)
        assert cpu_seconds(executor, 0.5) > 0.25, "the executor should be busy generating now"
    assert_cancelled(log, executor, "/stream")


@pytest.fixture(scope="module")
def slow_flow_server(slow_model):
    """HTTP through a Flow's gateway (what --protocol websocket http serves), not a Deployment's balancer."""
    ws_port, http_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--protocol", "websocket", "http",
            "--port", str(ws_port), str(http_port), "--max_new_tokens_limit", str(LONG)]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield process, log, http_port


@pytest.mark.parametrize("kind", ["deployment", "flow"])
def test_an_http_client_that_leaves_before_its_chat_answer_stops_its_generation(request, kind):
    if kind == "deployment":
        _, server, log, http_port = request.getfixturevalue("slow_server")
    else:
        server, log, http_port = request.getfixturevalue("slow_flow_server")
    body = {"message": [{"role": "user", "content": "Tell me everything."}],
            "gen_conf": {"max_new_tokens": LONG, "min_new_tokens": LONG}}
    with pytest.raises(httpx.TimeoutException):  # the client gives up while the answer is generated
        httpx.post(f"http://127.0.0.1:{http_port}/chat", json={"data": [body]}, timeout=2.0)
    assert_cancelled(log, executor_of(server), "/chat")


def test_full_queue_answers_server_busy_and_recovers(slow_server):
    port, _, _, _ = slow_server
    tokens = 150

    async def scenario():
        # max_batch_size=2 and max_queue=1: two requests run, one waits, the fourth is refused.
        busy = []
        for _ in range(3):  # one at a time, so each is admitted (or queued) before the next arrives
            busy.append(asyncio.create_task(stream_doc(port, Prompt(message=[{"role": "user", "content": "hi"}],
                                                                    gen_conf={"max_new_tokens": tokens,
                                                                              "min_new_tokens": tokens}))))
            await asyncio.sleep(0.4)
        started = time.monotonic()
        with pytest.raises(Exception) as refused:
            await stream_doc(port, Prompt(message=[{"role": "user", "content": "me too"}], gen_conf={}))
        refused_after = time.monotonic() - started
        done = await asyncio.gather(*busy)
        return refused, refused_after, done

    refused, refused_after, done = run(scenario())
    assert "server busy" in str(refused.value) and "retry later" in str(refused.value)
    assert refused_after < 2.0
    assert [pieces[-1].completion_tokens for pieces in done] == [tokens] * 3
    again = run(stream_doc(port, Prompt(message=[{"role": "user", "content": "hi"}], gen_conf={"max_new_tokens": 3})))
    assert again[-1].finish_reason is not None


def test_abandoned_streams_are_all_cancelled(slow_server):
    """Clients that cancel their gRPC call after the first piece, one after another: every answer must be
    cancelled, none may run to its end (Jina's gateway used to cancel its worker call only when garbage
    collection reached it)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from soak import abandoned_stream

    port, _, log, _ = slow_server
    before = log.read_text(errors="replace").count("finish=cancelled")

    async def abandon_all():
        for i in range(20):
            await abandoned_stream(port, i)

    run(abandon_all())
    deadline = time.monotonic() + 10
    while log.read_text(errors="replace").count("finish=cancelled") - before < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    assert text.count("finish=cancelled") - before == 20
    assert not re.search(r"new_tokens=900 \S+ \S+ finish=length", text), "an abandoned answer ran to its end"
