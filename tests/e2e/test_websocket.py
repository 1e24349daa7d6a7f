"""WebSocket: Jina serves it through a Flow's gateway and does not stream over it, so /chat only.

Errors over WebSocket are not asserted here: Jina's websocket client raised BadServer with the field in
isolated runs, but once under the full suite's load it ended without raising (README: known limits)."""

import subprocess

import pytest
from docarray import DocList
from jina import Client

from conftest import PYTHON, ROOT, free_port, run, serve_process
from schemas import Generation, Prompt


@pytest.fixture(scope="module")
def websocket_port(tiny_models):
    port, grpc_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(tiny_models["chat"]), "--protocol", "websocket", "grpc",
            "--port", str(port), str(grpc_port)]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield port


async def post(port, gen_conf):
    client = Client(host=f"websocket://127.0.0.1:{port}", asyncio=True)
    answers = []
    async for docs in client.post("/chat", inputs=Prompt(message=[{"role": "user", "content": "hi"}], gen_conf=gen_conf),
                                  return_type=DocList[Generation]):
        answers.extend(docs)
    return answers


def test_chat_over_websocket(websocket_port):
    answers = run(post(websocket_port, {"max_new_tokens": 6}))
    assert len(answers) == 1 and answers[0].text


def test_websocket_with_http_is_refused_clearly():
    result = subprocess.run([PYTHON, "jina_server.py", "--protocol", "websocket", "http", "--port", "1", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "cannot be combined with http" in result.stderr
