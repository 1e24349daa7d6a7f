import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from docarray import DocList

ROOT = Path(__file__).resolve().parents[2]
TEST_LIMITS = {"max_new_tokens_limit": 480, "max_prompt_tokens": 300, "max_prompt_chars": 5000}
# A prompt well over the 64 tokens from which a cached prefix is reused (136 to 247 with the test and default
# tokenizers): sent again to the same engine, all its whole blocks come from the prefix cache; with
# --no-prefix-caching none do.
REPEATED_PROMPT = {"message": [{"role": "user", "content": "Tell me about rivers and mountains and the sea. " * 8}],
                   "gen_conf": {"max_new_tokens": 4}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(coro):
    return asyncio.run(coro)


def grpc_client(port):
    from jina import Client

    return Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)


async def post_chat(port, inputs, prompt_cls=None, generation_cls=None):
    from schemas import Generation

    generation_cls = generation_cls or Generation
    answers = []
    async for docs in grpc_client(port).post("/chat", inputs=inputs, return_type=DocList[generation_cls]):
        answers.extend(docs)
    return answers


async def stream_doc(port, prompt, generation_cls=None, on="/stream"):
    from schemas import Generation

    return [doc async for doc in grpc_client(port).stream_doc(on=on, inputs=prompt,
                                                              return_type=generation_cls or Generation)]


@pytest.fixture(scope="session")
def server(tiny_models):
    """A real Deployment (gateway + executor processes) on a free port, serving the tiny chat model."""
    port = free_port()
    uses_with = json.dumps({"model_name": str(tiny_models["chat"]), **TEST_LIMITS})
    with serve_deployment(port, "executor", uses_with):
        yield port


@contextmanager
def serve_deployment(port, uses, uses_with: str):
    """``Deployment(uses=..., uses_with=...)`` in a process of its own (tests/e2e/run_deployment.py)."""
    args = [PYTHON, str(ROOT / "tests" / "e2e" / "run_deployment.py"), str(port), uses, uses_with]
    with serve_process(args, ready_line="deployment ready") as (process, log):
        assert process.poll() is None, log.read_text()
        yield process, log


@contextmanager
def serve_process(args, ready_line="ready to serve", timeout=120, env=None):
    """Run a server command in its own process group; yield (process, log path); always kill the group."""
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"jina-llm-stream-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready_line in log_path.read_text(errors="replace"):
                break
            if process.poll() is not None:
                break
            time.sleep(0.25)
        yield process, log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything the server left behind in its group
        except ProcessLookupError:
            pass


PYTHON = sys.executable
