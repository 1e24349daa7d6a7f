"""End to end over gRPC: a real Deployment, the real Jina Client, a real (tiny) model."""

import asyncio
import time

import pytest
from docarray import BaseDoc, DocList

from conftest import post_chat, run, stream_doc
from schemas import Generation, Prompt

HELLO = [{"role": "user", "content": "Hello, how are you?"}]
NON_ASCII = [{"role": "system", "content": "Réponds brièvement."},
             {"role": "user", "content": "中文：你好，世界 😀🚀 café naïve Grüße"}]


def prompt(message=HELLO, **gen_conf):
    return Prompt(message=message, gen_conf=gen_conf)


def test_post_a_single_prompt(server):
    answers = run(post_chat(server, prompt(max_new_tokens=8)))
    assert len(answers) == 1
    assert answers[0].text and answers[0].finish_reason in ("length", "stop")
    assert answers[0].completion_tokens <= 8 and answers[0].prompt_tokens > 0


def test_post_many_answers_in_order_each_as_if_alone(server):
    messages = [HELLO, NON_ASCII, [{"role": "user", "content": "Numbers: 1 2 3"}]]
    alone = [run(post_chat(server, prompt(m, max_new_tokens=10 + i)))[0].text for i, m in enumerate(messages)]
    batch = DocList[Prompt]([prompt(m, max_new_tokens=10 + i) for i, m in enumerate(messages)])
    together = run(post_chat(server, batch))
    assert [g.text for g in together] == alone
    assert len(set(alone)) == 3


@pytest.mark.parametrize("message", [HELLO, NON_ASCII], ids=["ascii", "non_ascii"])
def test_joined_stream_equals_chat(server, message):
    whole = run(post_chat(server, prompt(message, max_new_tokens=60)))[0]
    pieces = run(stream_doc(server, prompt(message, max_new_tokens=60)))
    assert len(pieces) > 1, "the answer came in one piece: nothing was streamed"
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].finish_reason == whole.finish_reason
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert all("\ufffd" not in p.text or p.text.count("\ufffd") == p.text.count("\ufffd") for p in pieces)


def test_max_new_tokens_is_honoured(server):
    answer = run(post_chat(server, prompt(max_new_tokens=7, stop=["\x00never"])))[0]
    pieces = run(stream_doc(server, prompt(max_tokens=7, stop=["\x00never"])))
    assert answer.completion_tokens == pieces[-1].completion_tokens == 7
    assert answer.finish_reason == pieces[-1].finish_reason == "length"


def test_stop_string_on_both_endpoints(server):
    full = run(post_chat(server, prompt(max_new_tokens=40)))[0].text
    stop = full[12:15]
    expected = full[:full.index(stop)]
    answer = run(post_chat(server, prompt(max_new_tokens=40, stop=stop)))[0]
    pieces = run(stream_doc(server, prompt(max_new_tokens=40, stop=[stop, "\x00other"])))
    assert answer.text == expected and answer.finish_reason == "stop"
    assert "".join(p.text for p in pieces) == expected
    assert all(stop not in p.text for p in pieces)


BAD_REQUESTS = [
    (HELLO, {"temperature": 7}, "gen_conf.temperature"),
    (HELLO, {"max_new_tokens": 10_000}, "max_new_tokens <= 480"),
    (HELLO, {"top_p": 0}, "gen_conf.top_p"),
    (HELLO, {"bogus_key": 1}, "gen_conf.bogus_key"),
    (HELLO, {"num_beams": 3}, "gen_conf.num_beams"),
    (HELLO, {"stop": [""]}, "gen_conf.stop"),
    (HELLO, {"max_new_tokens": "ten"}, "gen_conf.max_new_tokens"),
    ([], {}, "message"),
    ([{"role": "user"}], {}, "message[0]"),
    ([{"role": "user", "content": 3}], {}, "message[0].content"),
    ([{"role": "robot", "content": "hi"}], {}, "message[0].role"),
    ([{"role": "user", "content": "word " * 2000}], {}, "message"),  # over max_prompt_chars
    ([{"role": "user", "content": "word " * 900}], {}, "at most 300 tokens"),  # over max_prompt_tokens
]


@pytest.mark.parametrize("message,gen_conf,field", BAD_REQUESTS, ids=[b[2] + str(i) for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request_reaches_the_client_as_an_error_on_both_endpoints(server, message, gen_conf, field):
    bad = Prompt(message=message, gen_conf=gen_conf)
    with pytest.raises(Exception) as on_chat:
        run(post_chat(server, bad))
    assert field in str(on_chat.value)

    received = []

    async def consume():
        async for doc in __import__("conftest").grpc_client(server).stream_doc(on="/stream", inputs=bad,
                                                                              return_type=Generation):
            received.append(doc)

    with pytest.raises(Exception) as on_stream:
        run(consume())
    assert field in str(on_stream.value)
    assert received == [], "a bad request produced tokens (or a replayed stream) before its error"


def test_one_bad_prompt_in_a_batch_fails_the_call_before_any_generation(server):
    batch = DocList[Prompt]([prompt(max_new_tokens=5), prompt(max_new_tokens=5, temperature=-1)])
    with pytest.raises(Exception, match="gen_conf.temperature"):
        run(post_chat(server, batch))


def test_server_keeps_serving_after_bad_requests(server):
    for _ in range(3):
        with pytest.raises(Exception):
            run(stream_doc(server, prompt(top_k=-5)))
    assert run(post_chat(server, prompt(max_new_tokens=3)))[0].completion_tokens >= 1
    assert run(stream_doc(server, prompt(max_new_tokens=3)))[-1].finish_reason is not None


def test_clients_that_declare_only_the_original_fields_keep_working(server):
    class Prompt(BaseDoc):  # noqa: F811 - the original design's schemas, declared by the client
        message: list[dict]
        gen_conf: dict

    class Generation(BaseDoc):  # noqa: F811
        text: str

    request = Prompt(message=HELLO, gen_conf={"max_new_tokens": 12})
    answers = run(post_chat(server, DocList[Prompt]([request]), generation_cls=Generation))
    pieces = run(stream_doc(server, request, generation_cls=Generation))
    assert isinstance(answers[0], Generation) and answers[0].text
    assert "".join(p.text for p in pieces) == answers[0].text


def test_sync_client_post_as_in_the_readme(server):
    from jina import Client

    client = Client(host=f"grpc://127.0.0.1:{server}")
    answers = client.post("/chat", inputs=prompt(max_new_tokens=5), return_type=DocList[Generation])
    assert len(answers) == 1 and answers[0].text


def test_long_generation_does_not_block_other_requests_or_health_checks(server):
    from jina import Client

    from conftest import grpc_client

    async def scenario():
        piece_times, others = [], []
        long_request = prompt(max_new_tokens=480, stop=["\x00never"])
        async for piece in grpc_client(server).stream_doc(on="/stream", inputs=long_request, return_type=Generation):
            piece_times.append(time.monotonic())
            if len(piece_times) == 1:  # the long answer has just started: ask for other things meanwhile
                others = [asyncio.create_task(post_chat(server, prompt(max_new_tokens=2))),
                          asyncio.create_task(asyncio.to_thread(Client(host=f"grpc://127.0.0.1:{server}").is_flow_ready))]
                for task in others:
                    task.add_done_callback(lambda _t, times=piece_times: _t.__setattr__("at", time.monotonic()))
            last = piece
        results = await asyncio.gather(*others)
        return results, [t.at for t in others], piece_times, last

    (short, healthy), (short_at, healthy_at), piece_times, last = run(scenario())
    assert short[0].completion_tokens >= 1 and healthy is True
    assert last.completion_tokens == 480
    print(f"long answer: {piece_times[-1] - piece_times[0]:.2f}s; short call done after {short_at - piece_times[0]:.2f}s, health after {healthy_at - piece_times[0]:.2f}s")
    assert short_at < piece_times[-1] and healthy_at < piece_times[-1], "other calls waited for the long answer"
