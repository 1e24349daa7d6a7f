"""make container-smoke, second part: the docker-compose export, brought up for real with podman-compose.

Exported as a user would (`jina_server.py export docker-compose ... --replicas 2 --openai-port P`), with the
project's image and a test model mounted into the workers, then checked through the published ports:
- the OpenAI API answers, and both replicas serve it;
- a /stream abandoned through the exported gateway stops the worker's generation;
- a stream whose worker dies mid-answer goes on on the other replica (request migration through the exported
  gateway): the client's answer equals the uninterrupted one, nothing replayed, nothing lost.

    IMAGE=localhost/jina-llm-stream:smoke PODMAN_COMPOSE=.../podman-compose .venv/bin/python tests/container/compose_check.py
"""

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import build_slow_model  # noqa: E402

IMAGE = os.environ.get("IMAGE", "localhost/jina-llm-stream:smoke")
COMPOSE = os.environ.get("PODMAN_COMPOSE", "podman-compose")
PROJECT = f"jls-compose-{os.getpid()}"
MODEL_IN_CONTAINER = "/models/test-model"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose(file: Path, *args, check=True, timeout=300):
    return subprocess.run([COMPOSE, "-p", PROJECT, "-f", str(file), *args], capture_output=True, text=True,
                          check=check, timeout=timeout)


def workers() -> list:
    """Names of the worker containers (services llm-rep-N)."""
    names = subprocess.run(["podman", "ps", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format",
                            "{{.Names}}"], capture_output=True, text=True, check=True).stdout.split()
    return sorted(name for name in names if "llm-rep" in name)


def logs(container: str) -> str:
    result = subprocess.run(["podman", "logs", container], capture_output=True, text=True)
    return result.stdout + result.stderr


def export(work: Path, ports: dict, model: Path) -> Path:
    file = work / "docker-compose.yml"
    subprocess.run([sys.executable, "jina_server.py", "export", "docker-compose", str(file), "--image", IMAGE,
                    "--model_name", MODEL_IN_CONTAINER, "--replicas", "2", "--protocol", "grpc", "http",
                    "--port", str(ports["grpc"]), str(ports["http"]), "--openai-port", str(ports["openai"]),
                    "--max_batch_size", "4", "--log_prompts"], cwd=ROOT, check=True, timeout=300)
    manifest = yaml.safe_load(file.read_text())
    for name, service in manifest["services"].items():
        if name.startswith("llm"):  # what a user adds: their model, mounted into the workers
            service["volumes"] = [f"{model}:{MODEL_IN_CONTAINER}:ro"]
    file.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return file


def prompt(text: str, new_tokens: int):
    from schemas import Prompt

    return Prompt(message=[{"role": "user", "content": text}], gen_conf={"max_new_tokens": new_tokens,
                                                                         "min_new_tokens": new_tokens})


def gateway_listens(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def wait_until_served(ports: dict, timeout: float = 600) -> None:
    from docarray import DocList
    from jina import Client

    from schemas import Generation

    deadline = time.monotonic() + timeout
    while not gateway_listens(ports["grpc"]):  # before that, the Jina client logs each refused attempt
        if time.monotonic() > deadline:
            raise SystemExit(f"the exported gateway did not listen in {timeout:.0f} s")
        time.sleep(2)
    while True:
        try:
            client = Client(host=f"grpc://127.0.0.1:{ports['grpc']}")
            answers = client.post("/chat", inputs=prompt("ready?", 2), return_type=DocList[Generation], timeout=20)
            if answers and answers[0].completion_tokens == 2:
                break
        except Exception as error:  # noqa: BLE001 - still starting
            if time.monotonic() > deadline:
                raise SystemExit(f"the exported deployment did not answer in {timeout:.0f} s: {error}")
        time.sleep(3)
    while len([w for w in workers() if "OpenAI-compatible API on port" in logs(w)]) < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the replicas did not both start the OpenAI API")
        time.sleep(2)


def check_openai(ports: dict) -> None:
    body = {"model": MODEL_IN_CONTAINER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    for _ in range(10):  # a new connection each time: the gateway passes each to the next replica
        answer = httpx.post(f"http://127.0.0.1:{ports['openai']}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["object"] == "chat.completion", answer.text
    served = [w for w in workers() if "endpoint=/v1/chat/completions" in logs(w)]
    assert len(served) == 2, f"both replicas answered OpenAI requests: {served}"
    with httpx.stream("POST", f"http://127.0.0.1:{ports['openai']}/v1/chat/completions",
                      json={**body, "stream": True}, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events
    print("compose: the OpenAI API answered through the published port, from both replicas")


def cancelled_count() -> int:
    return sum(len(re.findall(r"finish=cancelled", logs(w))) for w in workers())


async def read_some_then_leave(ports: dict, text: str, pieces: int) -> None:
    from jina import Client

    from schemas import Generation

    client = Client(host=f"grpc://127.0.0.1:{ports['grpc']}", asyncio=True)
    count = 0
    async for _ in client.stream_doc(on="/stream", inputs=prompt(text, 1500), return_type=Generation):
        count += 1
        if count == pieces:
            return


def check_abandoned_stream(ports: dict) -> None:
    before = cancelled_count()
    started = time.monotonic()
    asyncio.run(read_some_then_leave(ports, f"leave early {uuid.uuid4().hex}", 3))
    while cancelled_count() == before:
        assert time.monotonic() - started < 30, "the abandoned stream kept generating in its worker"
        time.sleep(0.5)
    print(f"compose: an abandoned /stream was cancelled in its worker after {time.monotonic() - started:.1f} s")


MIGRATED = {"max_new_tokens": 400, "min_new_tokens": 400, "temperature": 0}


async def stream_answer(ports: dict, text: str, kill_after: int | None = None) -> list:
    """Every piece of a greedy /stream; with ``kill_after``, the worker serving it is killed at that piece."""
    from jina import Client

    from schemas import Generation, Prompt

    client = Client(host=f"grpc://127.0.0.1:{ports['grpc']}", asyncio=True)
    pieces = []
    request = Prompt(message=[{"role": "user", "content": text}], gen_conf=MIGRATED)
    async for piece in client.stream_doc(on="/stream", inputs=request, return_type=Generation):
        pieces.append(piece.text)
        if len(pieces) == kill_after:
            # log_prompts: the worker that took it, and the uninterrupted run before it (routed by its prefix)
            serving = [w for w in workers() if logs(w).count(text) == 2]
            assert len(serving) == 1, serving
            subprocess.run(["podman", "kill", serving[0]], check=True, capture_output=True)
    return pieces


def check_migrated_stream(ports: dict) -> None:
    # Longer than the router's shortest match (executor/router.py): both runs go to the same replica.
    marker = f"killed mid-answer {uuid.uuid4().hex} " + "tell me about rivers and their valleys " * 10
    whole = asyncio.run(stream_answer(ports, marker))
    cut = asyncio.run(stream_answer(ports, marker, kill_after=5))
    assert "".join(cut) == "".join(whole), "the migrated answer differs from the uninterrupted one"
    print(f"compose: a stream whose worker was killed after 5 pieces went on on the other replica: "
          f"{len(cut)} pieces, equal to the uninterrupted answer")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="jls-compose-"))
    model = build_slow_model(work)
    for path in [work, *work.rglob("*")]:  # the container's user reads the mounted model
        path.chmod(0o755 if path.is_dir() else 0o644)
    ports = {"grpc": free_port(), "http": free_port(), "openai": free_port()}
    file = export(work, ports, model)
    try:
        compose(file, "up", "-d")
        wait_until_served(ports)
        check_openai(ports)
        check_abandoned_stream(ports)
        check_migrated_stream(ports)
    except BaseException:
        for name in workers():
            print(f"---- {name}\n{logs(name)[-3000:]}")
        gateway = subprocess.run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                                  "--format", "{{.Names}}"], capture_output=True, text=True).stdout.split()
        for name in (n for n in gateway if "gateway" in n):
            print(f"---- {name}\n{logs(name)[-3000:]}")
        raise
    finally:
        compose(file, "down", "-t", "2", check=False)
        shutil.rmtree(work, ignore_errors=True)
    print("compose check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
