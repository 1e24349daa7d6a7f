"""WebSocket: Jina serves it through a Flow's gateway and does not stream over it, so /chat only.

The server here serves WebSocket, gRPC and HTTP at once (a Flow's gateway, not a Deployment's): the
gRPC and HTTP tests of test_protocols run again against it.

The server's error answer is checked with a raw WebSocket client speaking Jina's bytes subprotocol, which
sends its end-of-input marker only after the answer came: Jina's own client sends both from separate
tasks and, once under load, ended without raising (README: known limits)."""

import asyncio

import pytest
from docarray import DocList
from jina import Client

from conftest import PYTHON, free_port, run, serve_process
from schemas import Generation, Prompt
from test_protocols import (  # noqa: F401 - collected again here, against this module's `server`
    test_jina_client_over_each_protocol, test_jina_client_raises_on_bad_requests_over_each_protocol,
    test_malformed_json_is_a_400_that_says_what_and_where, test_plain_http_errors_name_the_field,
    test_plain_http_post_and_server_sent_events, test_random_bodies_get_an_answer_or_a_400_in_the_error_shape)


@pytest.fixture(scope="module")
def server(tiny_models):
    ports = {"websocket": free_port(), "grpc": free_port(), "http": free_port()}
    args = [PYTHON, "jina_server.py", "--model_name", str(tiny_models["chat"]), "--protocol", *ports,
            "--port", *map(str, ports.values())]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield {**ports, "process": process, "log": log}


@pytest.fixture(scope="module")
def websocket_port(server):
    return server["websocket"]


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


async def raw_websocket_chat(port, gen_conf):
    """One /chat request as Jina's websocket client sends it; returns the response's status."""
    import aiohttp
    from jina.types.request.data import DataRequest

    request = DataRequest()
    request.header.exec_endpoint = "/chat"
    request.document_array_cls = DocList[Prompt]
    request.data.docs = DocList[Prompt]([Prompt(message=[{"role": "user", "content": "hi"}], gen_conf=gen_conf)])
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{port}/", protocols=("bytes",)) as websocket:
            await websocket.send_bytes(request.SerializeToString())
            message = await asyncio.wait_for(websocket.receive(), 30)
            await websocket.send_bytes(bytes(True))  # end of input, after the answer
    response = DataRequest(message.data)
    return response.header.status


def test_bad_request_over_websocket_is_an_error_naming_the_field(websocket_port):
    from jina.proto import jina_pb2

    status = run(raw_websocket_chat(websocket_port, {"temperature": 9}))
    assert status.code == jina_pb2.StatusProto.ERROR
    assert status.exception.name == "RequestError"
    assert "gen_conf.temperature" in status.exception.args[0]
    good = run(raw_websocket_chat(websocket_port, {"max_new_tokens": 3}))
    assert good.code == jina_pb2.StatusProto.SUCCESS
