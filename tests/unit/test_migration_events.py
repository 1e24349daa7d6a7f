"""executor/migration.py's event formats: which streams may migrate, the ids kept and taken out of the events,
and a continuation's events shown as the first replica's would have been."""

import json

from executor.migration import JinaEventStream, OpenAIStream


def chunk(content=None, role=None, ids=None, id_="chatcmpl-a", created=1):
    delta = {"role": role, "content": ""} if role else {"content": content}
    payload = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": "m",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    if ids is not None:
        payload["token_ids"] = ids
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode()


def test_only_single_streamed_completions_are_migrated():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert OpenAIStream.of("/v1/chat/completions", json.dumps(body).encode()) is not None
    for changed in ({"stream": False}, {"n": 2}, {"tools": [{"type": "function"}]}, {"continuation": []}):
        assert OpenAIStream.of("/v1/chat/completions", json.dumps({**body, **changed}).encode()) is None, changed
    assert OpenAIStream.of("/v1/models", b"") is None
    assert OpenAIStream.of("/v1/chat/completions", b"{not json") is None


def test_openai_ids_are_kept_and_a_continuation_looks_like_the_first_replica():
    stream = OpenAIStream({"stream": True})
    assert json.loads(stream.body())["continuation"] == []
    assert stream.event(chunk(role="assistant")) == chunk(role="assistant")
    assert stream.event(chunk("Hel", ids=[1, 2])) == chunk("Hel")
    stream.started = True
    assert json.loads(stream.body())["continuation"] == [1, 2]
    assert stream.event(chunk(role="assistant", id_="chatcmpl-b", created=2)) is None
    assert stream.event(chunk("lo", ids=[3], id_="chatcmpl-b", created=2)) == chunk("lo")
    assert not stream.done and stream.event(b"data: [DONE]") == b"data: [DONE]" and stream.done
    assert stream.ids == [1, 2, 3]


def test_jina_events_carry_null_ids_to_the_client():
    assert JinaEventStream.of("/stream", b'{"message": [], "gen_conf": {"continuation": [1]}}') is None
    assert JinaEventStream.of("/stream", b'{"message": [], "gen_conf": 3}') is None
    stream = JinaEventStream.of("/stream", b'{"message": [], "gen_conf": {"max_new_tokens": 5}}')
    assert json.loads(stream.body())["gen_conf"] == {"max_new_tokens": 5, "continuation": []}
    event = b'event: update\r\ndata: {"text": "a", "token_ids": [4, 5], "cached_tokens": 0}'
    assert stream.event(event) == b'event: update\r\ndata: {"text": "a", "token_ids": null, "cached_tokens": 0}'
    assert stream.ids == [4, 5] and stream.event(b"event: end") == b"event: end" and stream.done
