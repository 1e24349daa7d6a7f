"""Drop-in for the original design's real client: RAGFlow's "local LLM" provider.

``RagflowStyleClient`` is written from that client's documented behaviour (not its code): it connects with
``jina.Client(host, port, protocol, asyncio=True)`` from a base URL, reads whole answers with
``stream_doc(on="/chat")`` keeping the last text, treats every ``/stream`` text as the whole answer so far,
sends OpenAI-style ``gen_conf`` without ``max_tokens``, puts the system message first, and turns an
exception into ``**ERROR**: <message>`` after what it has. The server runs with ``--stream_text cumulative``.
"""

import asyncio
from urllib.parse import urlparse

import pytest
from docarray import BaseDoc
from jina import Client

from conftest import PYTHON, free_port, serve_process


class Prompt(BaseDoc):
    message: list[dict]
    gen_conf: dict


class Generation(BaseDoc):
    text: str


class RagflowStyleClient:
    def __init__(self, base_url: str):
        parsed = urlparse(base_url)
        self.client = Client(host=parsed.hostname, port=parsed.port, protocol=parsed.scheme, asyncio=True)

    @staticmethod
    def _prompt(system, history, gen_conf):
        gen_conf = {k: v for k, v in gen_conf.items() if k != "max_tokens"}
        messages = list(history)
        if system and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system})
        return Prompt(message=messages, gen_conf=gen_conf)

    def _texts(self, endpoint, prompt):
        answer = ""
        loop = asyncio.new_event_loop()
        try:
            stream = self.client.stream_doc(on=endpoint, inputs=prompt, return_type=Generation)
            while True:
                answer = loop.run_until_complete(asyncio.wait_for(stream.__anext__(), 60)).text
                yield answer
        except StopAsyncIteration:
            pass
        except Exception as error:  # noqa: BLE001 - what the real client does with any failure
            yield answer + "\n**ERROR**: " + str(error)
        finally:
            loop.close()

    def chat(self, system, history, gen_conf) -> str:
        answer = ""
        for answer in self._texts("/chat", self._prompt(system, history, gen_conf)):
            pass
        return answer

    def chat_streamly(self, system, history, gen_conf):
        yield from self._texts("/stream", self._prompt(system, history, gen_conf))


USUAL_GEN_CONF = {"temperature": 0.1, "top_p": 0.3, "presence_penalty": 0.4, "frequency_penalty": 0.7,
                  "max_tokens": 512}
SYSTEM = "You are a helpful assistant. Answer from the knowledge base."
HISTORY = [{"role": "user", "content": "What does the knowledge base say about café prices? 😀"}]


@pytest.fixture(scope="module")
def base_urls(tiny_models):
    grpc_port, http_port = free_port(), free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(tiny_models["chat"]), "--stream_text", "cumulative",
            "--protocol", "grpc", "http", "--port", str(grpc_port), str(http_port), "--max_new_tokens_limit", "64"]
    with serve_process(args) as (process, log):
        assert process.poll() is None, log.read_text()
        yield {"grpc": f"grpc://127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_whole_answer_and_cumulative_stream_agree(base_urls, protocol):
    client = RagflowStyleClient(base_urls[protocol])
    conf = {**USUAL_GEN_CONF}
    whole = client.chat(SYSTEM, HISTORY, conf)
    texts = list(client.chat_streamly(SYSTEM, HISTORY, conf))
    assert "**ERROR**" not in whole and whole
    assert len(texts) > 1
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])), "not cumulative"
    assert texts[-1] == whole


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_system_message_is_sent_first_and_max_tokens_is_stripped(base_urls, protocol):
    client = RagflowStyleClient(base_urls[protocol])
    # max_tokens over the server's limit of 64 would be refused: the client strips it, so this succeeds.
    answer = client.chat(SYSTEM, HISTORY, {"temperature": 0.7, "max_tokens": 100_000})
    assert answer and "**ERROR**" not in answer
    with_history = client.chat(SYSTEM, [{"role": "system", "content": SYSTEM}, *HISTORY], {})
    assert with_history == answer


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("endpoint", ["chat", "chat_streamly"])
def test_a_bad_request_reaches_the_client_as_an_exception(base_urls, protocol, endpoint):
    client = RagflowStyleClient(base_urls[protocol])
    bad = {"temperature": 5.0}
    if endpoint == "chat":
        answer = client.chat(SYSTEM, HISTORY, bad)
    else:
        answer = list(client.chat_streamly(SYSTEM, HISTORY, bad))[-1]
    assert answer.startswith("\n**ERROR**: "), answer
    if protocol == "grpc":  # Jina's HTTP client raises without the server's message (README: known limits)
        assert "gen_conf.temperature" in answer
