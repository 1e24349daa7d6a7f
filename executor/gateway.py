"""The gateway of exported deployments: ``python -m executor.gateway [--openai-port P] gateway ARGS...``.

Jina's own gateway (``jina gateway ARGS``, as the Kubernetes and docker-compose exporters write it), with
this project's fixes installed (executor/jina_compat.py: no replay of a broken stream, cancellation through
the gateway, reconnect backoff, HTTP error bodies), the same as under ``jina_server.py``.

With ``--openai-port``, the gateway also takes the OpenAI API's connections on that port and passes each
one, byte for byte, to the OpenAI API of a replica (every worker serves it next to its engine; see
executor/openai_api.py), round robin over the addresses the gateway reaches the replicas at. A client that
closes its connection closes the one to the replica, which cancels the generation.
"""

import asyncio
import itertools
import json
import logging
import sys
import threading

from executor import jina_compat

log = logging.getLogger("jina_llm_stream.gateway")


def replica_hosts(jina_args: list) -> list:
    """The host of every replica, from ``--deployments-addresses`` (``{"llm": ["grpc://host:port", ...]}``)."""
    addresses = json.loads(jina_args[jina_args.index("--deployments-addresses") + 1])
    hosts = []
    for address in (a for replicas in addresses.values() for a in replicas):
        address = address.split("://", 1)[-1]
        hosts.append(address.rsplit(":", 1)[0])
    return hosts


class ConnectionBalancer:
    """Accepts TCP connections on ``port`` and splices each to the next of ``targets`` (host, port)."""

    def __init__(self, port: int, targets: list):
        self.port, self.targets = port, targets
        self._next = itertools.cycle(range(len(targets)))

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve_one(self, client_reader, client_writer) -> None:
        for _ in range(len(self.targets)):  # a replica that refuses: the next one
            host, port = self.targets[next(self._next)]
            try:
                replica_reader, replica_writer = await asyncio.open_connection(host, port)
                break
            except OSError as error:
                log.warning("OpenAI API of the replica at %s:%d unreachable: %s", host, port, error)
        else:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, replica_writer), self._pipe(replica_reader, client_writer))

    async def serve(self) -> None:
        server = await asyncio.start_server(self._serve_one, "0.0.0.0", self.port)
        log.info("OpenAI-compatible API on port %d: connections go to the replicas at %s", self.port,
                 ", ".join(f"{h}:{p}" for h, p in self.targets))
        async with server:
            await server.serve_forever()

    def start(self) -> None:
        threading.Thread(target=lambda: asyncio.run(self.serve()), name="openai-balancer", daemon=True).start()


def main(argv: list) -> None:
    openai_port = None
    if argv[:1] == ["--openai-port"]:
        openai_port, argv = int(argv[1]), argv[2:]
    jina_compat.install()
    if openai_port is not None:
        ConnectionBalancer(openai_port, [(host, openai_port) for host in replica_hosts(argv)]).start()
    from jina_cli import main as jina_main

    sys.argv = ["jina", *argv]
    jina_main()


if __name__ == "__main__":
    main(sys.argv[1:])
