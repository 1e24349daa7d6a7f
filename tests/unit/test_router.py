"""executor/router.py: which replica a request goes to (prefix match against load), and the gateway's reading of
a request's messages (executor/jina_compat.py)."""

import json

from docarray import DocList
from jina.types.request.data import DataRequest, SingleDocumentRequest

from executor.gateway import openai_messages
from executor.jina_compat import http_body_messages, request_messages
from executor.router import BLOCK_CHARS, LOAD_SLACK, MIN_MATCH_CHARS, PrefixRouter, block_hashes, routing_text
from schemas import Prompt


def chat(system: str, *turns: str) -> list:
    messages = [{"role": "system", "content": system}]
    for number, text in enumerate(turns):
        messages.append({"role": "user" if number % 2 == 0 else "assistant", "content": text})
    return messages


LONG_A = "You answer questions about the Zorblat river. " * 12
LONG_B = "You answer questions about the Amber bridge of Quentaville. " * 12


def test_a_chat_s_earlier_turns_are_a_prefix_of_its_later_ones():
    first, later = chat(LONG_A, "Where does it rise?"), chat(LONG_A, "Where does it rise?", "In the hills.", "And?")
    assert routing_text(later).startswith(routing_text(first))
    assert block_hashes(routing_text(later))[:len(block_hashes(routing_text(first)))] == \
        block_hashes(routing_text(first))
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert routing_text(parts) == routing_text([{"role": "user", "content": "ab"}])  # OpenAI content parts


def test_the_next_turn_goes_where_the_conversation_s_prefix_went():
    router = PrefixRouter(["a", "b"])
    first_a, first_b = router.choose(chat(LONG_A, "q1")), router.choose(chat(LONG_B, "q1"))
    assert {first_a.replica, first_b.replica} == {"a", "b"} and first_a.reason == "least_loaded"
    for replica in ("a", "b"):
        router.finished(replica)
    for _ in range(3):
        again_a, again_b = router.choose(chat(LONG_A, "q1", "answer", "q2")), router.choose(chat(LONG_B, "q1", "x"))
        assert (again_a.replica, again_b.replica) == (first_a.replica, first_b.replica)
        assert again_a.reason == again_b.reason == "prefix" and again_a.matched_chars >= MIN_MATCH_CHARS
        router.finished(again_a.replica)
        router.finished(again_b.replica)


def test_a_short_match_is_not_worth_unbalancing_the_load():
    router = PrefixRouter(["a", "b"])
    short = "Be brief. "  # shorter than MIN_MATCH_CHARS: the chat template's system prompt, say
    first = router.choose(chat(short, "q1"))
    second = router.choose(chat(short, "q2"))
    assert second.reason == "least_loaded" and second.replica != first.replica


def test_one_hot_prefix_cannot_pin_every_request_on_one_replica():
    router = PrefixRouter(["a", "b"])
    routes = [router.choose(chat(LONG_A, f"question {n}")) for n in range(16)]  # all in flight at once
    counts = {r: sum(route.replica == r for route in routes) for r in ("a", "b")}
    assert min(counts.values()) >= 16 // 2 - LOAD_SLACK, counts
    assert {route.reason for route in routes} == {"prefix", "least_loaded"}
    assert abs(router.in_flight("a") - router.in_flight("b")) <= max(LOAD_SLACK, 8)
    for route in routes:
        router.finished(route.replica)
    assert router.in_flight("a") == router.in_flight("b") == 0


def test_a_replica_that_failed_the_request_is_not_chosen_again():
    router = PrefixRouter(["a", "b"])
    first = router.choose(chat(LONG_A, "q"))
    router.finished(first.replica)
    retry = router.choose(chat(LONG_A, "q"), exclude={first.replica})
    assert retry.replica != first.replica


def test_memory_is_bounded_and_the_least_recently_sent_prefixes_go_first():
    router = PrefixRouter(["a", "b"], capacity=4 * 1024 // BLOCK_CHARS)
    for n in range(50):  # 50 distinct long prompts, ~1.3k characters each, far more than 4k characters of blocks
        router.finished(router.choose(chat(f"{n} " + LONG_A, "q")).replica)
    assert all(len(remembered.blocks) <= 4 * 1024 // BLOCK_CHARS for remembered in router._remembered.values())
    latest = router.choose(chat("49 " + LONG_A, "q2"))
    assert latest.reason == "prefix"


def test_the_gateway_reads_the_messages_of_both_request_kinds():
    prompt = Prompt(message=chat(LONG_A, "q"), gen_conf={"max_new_tokens": 3})
    single = SingleDocumentRequest()
    single.document_cls = Prompt
    single.data.doc = prompt
    assert request_messages(SingleDocumentRequest(single.proto.SerializeToString())) == prompt.message
    batch = DataRequest()
    batch.document_array_cls = DocList[Prompt]
    batch.data.docs = DocList[Prompt]([prompt, Prompt(message=chat("other", "q"))])
    assert request_messages(DataRequest(batch.proto.SerializeToString())) == prompt.message
    batch.data.docs_bytes = DocList[Prompt]([prompt]).to_bytes()
    assert request_messages(DataRequest(batch.proto.SerializeToString())) == prompt.message


def test_a_replica_that_comes_up_later_joins_without_the_others_forgetting():
    router = PrefixRouter(["a"])
    router.finished(router.choose(chat(LONG_A, "q")).replica)
    router.sync(["a", "b"])
    assert router.choose(chat(LONG_A, "q", "x", "q2")).replica == "a"
    assert router.choose(chat(LONG_B, "q")).replica == "b"  # the least loaded
    router.sync(["b"])
    assert router.replicas == ["b"] and router.choose(chat(LONG_A, "q")).replica == "b"


def test_the_http_balancer_reads_the_messages_of_chat_and_stream_bodies():
    messages = chat(LONG_A, "q")
    assert http_body_messages(json.dumps({"data": [{"message": messages}]}).encode()) == messages  # POST /chat
    assert http_body_messages(json.dumps({"data": {"message": messages}}).encode()) == messages
    assert http_body_messages(json.dumps({"message": messages, "gen_conf": {}}).encode()) == messages  # /stream
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError, not ValueError
    for body in (b"", b"not json", b"[]", b'{"data": []}', b'{"message": "text"}', b"[1, 2]", deep):
        assert http_body_messages(body) == [] and openai_messages(body) == []
