"""Soak test: many clients at once for a while, mixing every kind of request; loopback only, stops by itself.

    make soak                     # 32 clients for 60 s on the default model
    .venv/bin/python bench/soak.py --clients 8 --seconds 10 --model_name PATH

Each client loops until the time is up, choosing at random: a whole answer (/chat), a stream (/stream),
a stream abandoned after its first piece (the connection is cancelled), or a bad request (which must be
refused). Pass means: 0 failed valid requests, 0 accepted bad requests, no abandoned stream generated to
its end, the executor's CPU idle within 1 s after the last abandoned stream, and executor RSS growth under
10% from warm-up to the end, the KV pool's pages apart (they arrive as the pool is first written, up to its
size: the jina_llm_stream_kv_pool_resident_bytes metric).
"""

import argparse
import asyncio
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server_process import cpu_seconds, executor_process, free_port, start_server, stop_server  # noqa: E402

ABANDONED_TOKENS = 900  # far more than a model makes between the first piece and the cancel
BAD_REQUESTS = [
    ([{"role": "user", "content": "hi"}], {"temperature": 9}),
    ([{"role": "user", "content": "hi"}], {"max_new_tokens": 10**6}),
    ([{"role": "user", "content": "hi"}], {"unknown_setting": 1}),
    ([{"role": "wizard", "content": "hi"}], {}),
    ([], {}),
    ([{"role": "user", "content": "x" * 1_000_000}], {}),  # 1 MB of content
]


def prompt(i: int):
    from schemas import Prompt

    return Prompt(message=[{"role": "user", "content": f"Soak request {i}: tell me something."}],
                  gen_conf={"max_new_tokens": random.randint(4, 48)})


async def whole_answer(client, i):
    from docarray import DocList

    from schemas import Generation

    answers = [a async for docs in client.post("/chat", inputs=prompt(i), return_type=DocList[Generation])
               for a in docs]
    return bool(answers) and answers[0].finish_reason in ("stop", "length")


async def streamed_answer(client, i):
    from schemas import Generation

    pieces = [p async for p in client.stream_doc(on="/stream", inputs=prompt(i), return_type=Generation)]
    return bool(pieces) and pieces[-1].finish_reason in ("stop", "length")


async def abandoned_stream(port, i):
    """Read the first piece, then cancel the call: the client goes away mid-answer."""
    import grpc
    from jina.proto import jina_pb2, jina_pb2_grpc
    from jina.types.request.data import SingleDocumentRequest

    from schemas import Prompt

    request = SingleDocumentRequest()
    request.header.exec_endpoint = "/stream"
    request.document_cls = Prompt
    request.data.doc = Prompt(message=[{"role": "user", "content": f"Soak {i}: a long answer please."}],
                              gen_conf={"max_new_tokens": ABANDONED_TOKENS, "min_new_tokens": ABANDONED_TOKENS})
    first = None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = jina_pb2_grpc.JinaSingleDocumentRequestRPCStub(channel).stream_doc(request)
        async for first in call:
            break
        call.cancel()
    # A refused request (its first response carries an error) was never abandoned mid-answer: a failure.
    return first is not None and first.header.status.code != jina_pb2.StatusProto.ERROR


async def bad_request(client, i):
    """True when the server refused it (as it must)."""
    from docarray import DocList

    from schemas import Generation, Prompt

    message, gen_conf = BAD_REQUESTS[i % len(BAD_REQUESTS)]
    bad = Prompt(message=message, gen_conf=gen_conf)
    try:
        if i % 2:
            async for _ in client.stream_doc(on="/stream", inputs=bad, return_type=Generation):
                return False
        else:
            async for _ in client.post("/chat", inputs=bad, return_type=DocList[Generation]):
                return False
    except Exception as error:  # noqa: BLE001 - the refusal we want
        return "gen_conf" in str(error) or "message" in str(error)
    return False


async def client_loop(port, deadline, results, last_abandon):
    from jina import Client

    client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
    i = 0
    while time.monotonic() < deadline:
        i += 1
        kind = random.choices(["chat", "stream", "abandon", "bad"], weights=[3, 3, 2, 2])[0]
        try:
            if kind == "chat":
                ok = await whole_answer(client, i)
            elif kind == "stream":
                ok = await streamed_answer(client, i)
            elif kind == "abandon":
                ok = await abandoned_stream(port, i)
                last_abandon[0] = time.monotonic()
            else:
                ok = await bad_request(client, i)
        except Exception as error:  # noqa: BLE001 - a valid request that failed
            ok = False
            results["errors"].append(f"{kind}: {type(error).__name__}: {str(error)[:200]}")
        results[kind, ok] += 1


def pool_resident(metrics_port: int) -> int:
    """The executor's KV pool bytes in memory, from its metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/", timeout=10).text
    return int(float(re.search(r"^jina_llm_stream_kv_pool_resident_bytes (\S+)$", text, re.M).group(1)))


async def soak(args, port, metrics_port, server):
    results = Counter()
    results["errors"] = []
    last_abandon = [0.0]
    executor = executor_process(server)
    warm_deadline = time.monotonic() + min(5.0, args.seconds / 4)
    await asyncio.gather(*(client_loop(port, warm_deadline, Counter(errors=[]), [0.0]) for _ in range(args.clients)))
    rss_start, pool_start = executor.memory_info().rss, pool_resident(metrics_port)
    started = time.monotonic()
    deadline = started + args.seconds
    await asyncio.gather(*(client_loop(port, deadline, results, last_abandon) for _ in range(args.clients)))
    ended = time.monotonic()
    await asyncio.sleep(max(0.0, last_abandon[0] + 1.0 - time.monotonic()))
    idle_cpu = cpu_seconds(executor, 1.0)
    rss = {"start": rss_start, "pool_start": pool_start, "end": executor.memory_info().rss,
           "pool_end": pool_resident(metrics_port)}
    return results, ended - started, rss, idle_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model_name", default=None, help="default: the default model (SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    random.seed(0)
    port, metrics_port = free_port(), free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"jina-llm-stream-soak-{os.getpid()}.log"
    flags = ["--port", str(port), "--max_queue", "256", "--monitoring", "--port-monitoring", str(metrics_port)] + (["--model_name", args.model_name] if args.model_name else [])
    server = start_server(flags, log_path)
    try:
        results, wall, rss, idle_cpu = asyncio.run(soak(args, port, metrics_port, server))
    finally:
        stop_server(server)
    valid_failed = sum(n for (kind, ok), n in _pairs(results) if kind != "bad" and not ok)
    bad_accepted = results["bad", False]
    total = sum(n for _, n in _pairs(results))
    rest_start, rest_end = rss["start"] - rss["pool_start"], rss["end"] - rss["pool_end"]
    growth = rest_end / rest_start - 1
    # Abandoned streams ask for exactly ABANDONED_TOKENS tokens: any that got them all was never cancelled.
    log_text = log_path.read_text(errors="replace")
    leaked = len(re.findall(rf"new_tokens={ABANDONED_TOKENS} \S+ \S+ finish=length", log_text))
    cancelled = log_text.count("finish=cancelled")
    checks = [
        ("failed valid requests", valid_failed, valid_failed == 0),
        ("accepted bad requests", bad_accepted, bad_accepted == 0),
        ("abandoned streams that ran to the end instead of being cancelled", f"{leaked} ({cancelled} cancelled)",
         leaked == 0),
        ("executor CPU in the 1 s after the last abandoned stream (1 s window)", f"{idle_cpu:.2f} s",
         idle_cpu < 0.1),
        ("executor RSS growth besides the KV pool (after warm-up -> end)",
         f"{rest_start >> 20} -> {rest_end >> 20} MiB ({growth:+.1%}; the pool's pages {rss['pool_start'] >> 20} -> "
         f"{rss['pool_end'] >> 20} MiB)", growth < 0.10),
    ]
    print(f"soak: {args.clients} clients, {wall:.0f} s, {total} requests ({total / wall:.1f}/s): "
          + ", ".join(f"{kind} {'ok' if ok else 'FAILED'} {n}" for (kind, ok), n in sorted(_pairs(results))))
    print("| check | value | pass |\n| --- | --- | --- |")
    for name, value, passed in checks:
        print(f"| {name} | {value} | {'yes' if passed else 'NO'} |")
    for error in results["errors"][:10]:
        print("  error:", error)
    return 0 if all(passed for _, _, passed in checks) else 1


def _pairs(results):
    return [(key, n) for key, n in results.items() if isinstance(key, tuple)]


if __name__ == "__main__":
    sys.exit(main())
