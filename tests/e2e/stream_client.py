"""A client in a process of its own, so a test can kill it mid-answer (a client that goes away).

    python stream_client.py PORT ENDPOINT MAX_NEW_TOKENS
Prints one line per piece received, flushed at once.
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from docarray import DocList  # noqa: E402
from jina import Client  # noqa: E402

from schemas import Generation, Prompt  # noqa: E402


async def main(port: int, endpoint: str, max_new_tokens: int) -> None:
    client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
    prompt = Prompt(message=[{"role": "user", "content": "Tell me everything."}],
                    gen_conf={"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens})
    if endpoint == "/stream":
        async for piece in client.stream_doc(on="/stream", inputs=prompt, return_type=Generation):
            print("piece", piece.completion_tokens, flush=True)
    else:
        print("posted", flush=True)
        async for answers in client.post("/chat", inputs=prompt, return_type=DocList[Generation]):
            print("answer", answers[0].completion_tokens, flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
