"""A Jina Deployment in a process of its own, for tests: forking the pytest process (what an in-process
Deployment does) after gRPC clients ran in it can abort the child inside gRPC.

    python tests/e2e/run_deployment.py PORT USES '{"model_name": ...}'

USES is a config.yml path, or "executor" for TokenStreamingExecutor itself. Prints "deployment ready"."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jina import Deployment  # noqa: E402


def main() -> None:
    port, uses, uses_with = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    if uses == "executor":
        from executor import TokenStreamingExecutor

        uses = TokenStreamingExecutor
    with Deployment(uses=uses, port=port, protocol="grpc", uses_with=uses_with) as deployment:
        print("deployment ready", flush=True)
        deployment.block()


if __name__ == "__main__":
    main()
