"""gRPC and HTTP on one server (the CLI), with two replicas and metrics: the Jina Client over each protocol,
plain HTTP, errors on every protocol, Prometheus metrics, health, logs, fast shutdown."""

import asyncio
import json
import os
import re
import signal
import time
from datetime import datetime

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from docarray import DocList
from jina import Client

from conftest import PYTHON, REPEATED_PROMPT, free_port, run, serve_process
from schemas import Generation, Prompt

GOOD = {"message": [{"role": "user", "content": "Hello, how are you? 😀"}], "gen_conf": {"max_new_tokens": 24}}
BAD = {"message": [{"role": "user", "content": "hi"}], "gen_conf": {"temperature": 9}}


@pytest.fixture(scope="module")
def server(tiny_models):
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(tiny_models["chat"]), "--protocol", "grpc", "http",
            "--port", str(grpc_port), str(http_port), "--replicas", "2", "--max_batch_size", "1",
            "--monitoring", "--port-monitoring", str(metrics_port)]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield {"grpc": grpc_port, "http": http_port, "metrics": metrics_port, "process": process, "log": log}


def jina_client(server, protocol, asyncio_=True):
    return Client(host=f"{protocol}://127.0.0.1:{server[protocol]}", asyncio=asyncio_)


async def jina_stream(server, protocol, body, on="/stream"):
    client = jina_client(server, protocol)
    return [g async for g in client.stream_doc(on=on, inputs=Prompt(**body), return_type=Generation)]


def jina_post(server, protocol, body):
    return jina_client(server, protocol, asyncio_=False).post("/chat", inputs=Prompt(**body),
                                                               return_type=DocList[Generation])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_jina_client_over_each_protocol(server, protocol):
    whole = jina_post(server, protocol, GOOD)[0]
    pieces = run(jina_stream(server, protocol, GOOD))
    assert whole.text and "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].finish_reason == whole.finish_reason


def sse_events(response):
    events, kind = [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((kind, json.loads(line.split(":", 1)[1])))
        elif line == "" and kind == "end":
            events.append(("end", None))
    return events


def test_plain_http_post_and_server_sent_events(server):
    base = f"http://127.0.0.1:{server['http']}"
    answer = httpx.post(f"{base}/chat", json={"data": [GOOD, GOOD]}, timeout=30)
    assert answer.status_code == 200
    texts = [doc["text"] for doc in answer.json()["data"]]
    assert len(texts) == 2 and texts[0] == texts[1]
    with httpx.stream("GET", f"{base}/stream", json=GOOD, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    updates = [data for kind, data in events if kind == "update"]
    assert "".join(u["text"] for u in updates) == texts[0]
    assert updates[-1]["finish_reason"] in ("length", "stop")


def test_plain_http_errors_name_the_field(server):
    base = f"http://127.0.0.1:{server['http']}"
    answer = httpx.post(f"{base}/chat", json={"data": [BAD]}, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"]["field"] == "gen_conf.temperature"
    assert "0.0 <= temperature <= 2.0" in answer.json()["error"]["message"]
    with httpx.stream("GET", f"{base}/stream", json=BAD, timeout=30) as response:
        assert response.status_code == 400
        events = sse_events(response)
    assert events[0][0] == "error" and events[0][1]["error"]["field"] == "gen_conf.temperature"
    busy_or_bad = httpx.post(f"{base}/chat", json={"data": [{"message": [], "gen_conf": {}}]}, timeout=30)
    assert busy_or_bad.status_code == 400 and busy_or_bad.json()["error"]["field"] == "message"


JSON = {"Content-Type": "application/json"}


def test_malformed_json_is_a_400_that_says_what_and_where(server):
    base = f"http://127.0.0.1:{server['http']}"
    cases = {  # body, headers -> words the message must hold
        "deep": (b"[" * 100_000, JSON, "nested too deeply"),
        "cut": (b'{"data": [', JSON, "line 1 column 11 (char 10)"),
        "no content type": (b'{"data": [{"message": }]}', {}, "line 1 column 23 (char 22)"),
        "form": (b"data=hello", {"Content-Type": "application/x-www-form-urlencoded"}, "not valid JSON"),
        "json as text": (json.dumps({"data": [GOOD]}).encode(), {"Content-Type": "text/plain"}, "application/json"),
    }
    for name, (body, headers, words) in cases.items():
        answer = httpx.post(f"{base}/chat", content=body, headers=headers, timeout=30)
        assert answer.status_code == 400, (name, answer.status_code, answer.text[:300])
        error = answer.json()["error"]
        assert error["type"] == "RequestError" and words in error["message"], (name, error)
        assert error["field"] == "body", (name, error)
    wrong_shape = httpx.post(f"{base}/chat", json={"data": "not a list"}, timeout=30)
    assert wrong_shape.status_code == 400 and wrong_shape.json()["error"]["field"].startswith("data"), wrong_shape.text
    with httpx.stream("GET", f"{base}/stream", content=b"{oops", headers=JSON, timeout=30) as response:
        assert response.status_code == 400
        assert "not valid JSON" in sse_events(response)[0][1]["error"]["message"]
    assert httpx.post(f"{base}/chat", json={"data": [GOOD]}, timeout=30).status_code == 200  # still serving


_bodies = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                    st.integers(1, 3000).map(lambda depth: b'{"data": ' + b"[" * depth),
                    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                              max_size=3),
                                 max_leaves=8).map(lambda value: json.dumps({"data": value}).encode()))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_random_bodies_get_an_answer_or_a_400_in_the_error_shape(server, body):
    answer = httpx.post(f"http://127.0.0.1:{server['http']}/chat", content=body, headers=JSON, timeout=60)
    assert answer.status_code in (200, 400), (answer.status_code, answer.text[:300], body[:100])
    if answer.status_code == 400:
        error = answer.json()["error"]
        assert error["type"] == "RequestError" and error["message"] and "field" in error, error


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_jina_client_raises_on_bad_requests_over_each_protocol(server, protocol):
    with pytest.raises(Exception) as on_post:
        jina_post(server, protocol, BAD)
    assert "gen_conf.temperature" in str(on_post.value)
    received = []

    async def consume():
        async for doc in jina_client(server, protocol).stream_doc(on="/stream", inputs=Prompt(**BAD),
                                                                  return_type=Generation):
            received.append(doc)

    with pytest.raises(Exception) as on_stream:
        run(asyncio.wait_for(consume(), 30))
    assert not isinstance(on_stream.value, asyncio.TimeoutError), "the client hung instead of raising"
    if protocol == "grpc":
        assert "gen_conf.temperature" in str(on_stream.value)
    assert all(doc.text is None or doc.text == "" for doc in received)


STREAM_DONE = re.compile(r"^(\S+ \S+) INFO jina_llm_stream.engine: pid=(\d+) request=\d+ endpoint=/stream "
                         r"prompt_tokens=\d+ cached_tokens=\d+ new_tokens=(\d+) ttft_ms=(\d+) tokens_per_s=([\d.]+) finish=length(?: drafted=\d+ accepted=\d+)?$", re.M)


def served_spans(log_text, new_tokens):
    """(start, end, pid) of each finished /stream answer, in server time: the line is written at the end,
    and says how long the answer took (TTFT plus the decode of the other tokens)."""
    spans = []
    for stamp, pid, tokens, ttft_ms, rate in STREAM_DONE.findall(log_text):
        if int(tokens) == new_tokens:
            end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            spans.append((end - float(ttft_ms) / 1000 - (int(tokens) - 1) / float(rate), end, pid))
    return sorted(spans)


def test_two_replicas_answer_at_once(server):
    """max_batch_size=1 per replica: two answers are generated at the same time only by two replicas.
    Overlap is judged from the replicas' own log lines: client-side arrival times can overlap even when one
    replica answered both, because a client reads a fast stream later than the server wrote it."""
    tokens = 400
    long = {"message": [{"role": "user", "content": "Tell me a long story."}],
            "gen_conf": {"max_new_tokens": tokens, "min_new_tokens": tokens}}

    async def several():
        return await asyncio.gather(*(jina_stream(server, "grpc", long) for _ in range(4)))

    before = len(served_spans(server["log"].read_text(errors="replace"), tokens))
    answers = run(several())
    assert [pieces[-1].completion_tokens for pieces in answers] == [tokens] * 4
    deadline, spans = time.monotonic() + 10, []
    while len(spans) < 4 and time.monotonic() < deadline:
        spans = served_spans(server["log"].read_text(errors="replace"), tokens)[before:]
        time.sleep(0.1)
    assert len(spans) == 4, f"expected 4 logged answers: {spans}"
    assert len({pid for _, _, pid in spans}) == 2, f"the answers came from one replica: {spans}"
    assert any(start_b < end_a and pid_a != pid_b
               for i, (_, end_a, pid_a) in enumerate(spans) for start_b, _, pid_b in spans[i + 1:]), \
        f"no two answers were generated at once: {spans}"


def test_prometheus_metrics(server):
    jina_post(server, "grpc", GOOD)
    run(jina_stream(server, "grpc", GOOD))
    deadline, text = time.monotonic() + 20, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{server['metrics']}/", timeout=10).text
        if "jina_llm_stream_generated_tokens_total" in text:
            break
        time.sleep(0.5)
    for name in ("jina_llm_stream_time_to_first_token_seconds_bucket", "jina_llm_stream_inter_token_latency_seconds",
                 "jina_llm_stream_generated_tokens_total", "jina_llm_stream_prompt_tokens_total",
                 "jina_llm_stream_cached_prompt_tokens_total", "jina_llm_stream_requests_total", "jina_llm_stream_queue_depth", "jina_llm_stream_batch_size",
                 "jina_llm_stream_kv_copied_bytes_total", "jina_llm_stream_kv_rows_total"):
        assert name in text, name
    generated = [line for line in text.splitlines() if line.startswith("jina_llm_stream_generated_tokens_total")]
    assert float(generated[0].split()[-1]) > 0
    assert 'outcome="length"' in text or 'outcome="stop"' in text
    joined = [line for line in text.splitlines() if line.startswith('jina_llm_stream_kv_rows_total{event="join"}')]
    assert float(joined[0].split()[-1]) > 0, "a row joined the batch (the warm-up's at least)"
    assert 'jina_llm_stream_kv_copied_bytes_total{cause="join"}' in text  # 0 when each joined an empty batch
    pool = dict(re.findall(r'jina_llm_stream_kv_pool_tokens\{holder="(\w+)"\} ([0-9.e+]+)', text))
    assert set(pool) == {"batch", "prefix_cache", "free"} and float(pool["prefix_cache"]) > 0, pool
    resident = re.search(r"^jina_llm_stream_kv_pool_resident_bytes ([0-9.e+]+)$", text, re.M)
    assert resident and float(resident.group(1)) > 0, "the pool's written pages are in memory"


def replica_metrics_ports(server) -> list:
    """Each replica serves its own registry: --port-monitoring is replica 0's; Jina gives the others random
    ports, which its start-up summary names ("executor/rep-1    ...:PORT")."""
    deadline, ports = time.monotonic() + 20, {}
    while len(ports) < 2 and time.monotonic() < deadline:
        ports = dict(re.findall(r"executor/rep-(\d+)\s+\.\.\.:(\d+)", server["log"].read_text(errors="replace")))
        time.sleep(0.1)
    assert len(ports) == 2 and ports["0"] == str(server["metrics"]), ports
    return [int(port) for port in ports.values()]


def counter_total(ports, name) -> float:
    """A counter summed over the replicas (what a Prometheus query sums over the scraped targets)."""
    total = 0.0
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text
        total += sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
    return total


def test_cached_prompt_tokens_counter_grows_by_each_answers_cached_tokens(server):
    """The counter's value, not only its name: each answer adds its own cached_tokens (a prefix-cache hit
    included) and prompt_tokens, exactly. The engine counts a request before it sends its last piece, so
    the counters are up to date when the answer arrives. The same long prompt is sent until it hits the
    cache: at most three sends, as two of them reach the same replica (of two)."""
    ports = replica_metrics_ports(server)
    cached, prompt = "jina_llm_stream_cached_prompt_tokens_total", "jina_llm_stream_prompt_tokens_total"
    answers = []
    while len(answers) < 3 and not any(answer.cached_tokens for answer in answers):
        before = counter_total(ports, cached), counter_total(ports, prompt)
        answer = jina_post(server, "grpc", REPEATED_PROMPT)[0]
        answers.append(answer)
        grown = counter_total(ports, cached) - before[0], counter_total(ports, prompt) - before[1]
        assert grown == (answer.cached_tokens, answer.prompt_tokens), [(a.cached_tokens, a.prompt_tokens)
                                                                        for a in answers]
    hit = answers[-1]
    assert hit.prompt_tokens > 64 and hit.cached_tokens == (hit.prompt_tokens - 1) // 16 * 16, "no cache hit"


def test_health_and_one_log_line_per_request_without_prompt_text(server):
    assert Client(host=f"grpc://127.0.0.1:{server['grpc']}").is_flow_ready()
    assert httpx.get(f"http://127.0.0.1:{server['http']}/", timeout=10).status_code == 200
    secret = {"message": [{"role": "user", "content": "my secret passphrase is swordfish"}],
              "gen_conf": {"max_new_tokens": 3}}
    jina_post(server, "grpc", secret)
    log = server["log"].read_text(errors="replace")
    assert "swordfish" not in log
    assert "endpoint=/chat prompt_tokens=" in log and "ttft_ms=" in log and "tokens_per_s=" in log


def test_sigterm_stops_an_http_server_within_seconds(server):
    process = server["process"]
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
    assert time.monotonic() - started < 15
