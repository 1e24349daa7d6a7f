"""Property-based requests against the real server, on both endpoints: every bad input is refused with an
error naming its field and before any token; every accepted one is answered within its limits."""

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_LIMITS, grpc_client, post_chat, run
from executor.validation import ALLOWED_GEN_CONF_KEYS
from schemas import Generation, Prompt

# Bounded numbers: huge ones fail in the Jina client's own protobuf encoding, before reaching the server.
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 600), st.floats(-3, 3), st.just(float("nan")),
                    st.text(max_size=4), st.lists(st.text(max_size=3), max_size=3))
_gen_conf = st.dictionaries(st.sampled_from(ALLOWED_GEN_CONF_KEYS + ("bogus",)), _values, max_size=3)
_message = st.one_of(
    st.just([{"role": "user", "content": "Hello"}]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot", ""]),
                                    "content": st.one_of(st.text(max_size=20), st.integers(-1000, 1000))}), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), st.text(max_size=5)), max_size=2),
)


async def both_endpoints(port, message, gen_conf):
    outcomes = []
    try:
        outcomes.append(("ok", (await post_chat(port, Prompt(message=message, gen_conf=gen_conf)))[0]))
    except Exception as error:  # noqa: BLE001 - recorded and checked below
        outcomes.append(("error", str(error)))
    pieces = []
    try:
        async for doc in grpc_client(port).stream_doc(on="/stream", inputs=Prompt(message=message, gen_conf=gen_conf),
                                                      return_type=Generation):
            pieces.append(doc)
        outcomes.append(("ok", pieces[-1]))
    except Exception as error:  # noqa: BLE001
        outcomes.append(("error", str(error), pieces))
    return outcomes


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=_message, gen_conf=_gen_conf)
def test_fuzzed_requests_on_both_endpoints(server, message, gen_conf):
    gen_conf = {k: v for k, v in gen_conf.items() if k not in ("max_new_tokens", "max_tokens", "min_new_tokens")
                or not isinstance(v, int) or isinstance(v, bool) or v < 60}  # keep accepted answers short
    chat, stream = run(asyncio.wait_for(both_endpoints(server, message, gen_conf), 60))
    assert chat[0] == stream[0], f"the endpoints disagree: {chat[:2]} vs {stream[:2]}"
    if chat[0] == "error":
        assert "gen_conf" in chat[1] or "message" in chat[1], chat[1][:300]
        assert stream[2] == [], "tokens were streamed before the error"
    else:
        for answer in (chat[1], stream[1]):
            assert 1 <= answer.completion_tokens <= TEST_LIMITS["max_new_tokens_limit"]
            assert answer.finish_reason in ("stop", "length")
