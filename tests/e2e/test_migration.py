"""Request migration through `jina_server.py --replicas N`: the replica serving a stream is killed (SIGKILL) after
the client has its 5th piece, and the stream goes on on another replica. The client's whole answer equals the
uninterrupted answer byte for byte (greedy and seeded). With `--migrations 0` the client gets the error, as
tests/e2e/test_faults.py checks."""

import asyncio
import os
import re
import signal

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
    port = free_port()
    args = [PYTHON, "jina_server.py", "--model_name", str(slow_model), "--port", str(port), "--replicas", "3",
            "--max_batch_size", "2"]
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
        assert process.poll() is None
