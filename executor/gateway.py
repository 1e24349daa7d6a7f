"""The gateway of exported deployments: ``python -m executor.gateway [--openai-port P] [--routing R] [--migrations N] gateway ARGS``.

Jina's own gateway (``jina gateway ARGS``, as the Kubernetes and docker-compose exporters write it), with
this project's fixes installed (executor/jina_compat.py: no replay of a broken stream, cancellation through
the gateway, reconnect backoff, HTTP error bodies), the same as under ``jina_server.py``.

With ``--openai-port``, the gateway also takes the OpenAI API's connections on that port and passes each
one, byte for byte, to the OpenAI API of a replica (every worker serves it next to its engine; see
executor/openai_api.py), round robin over the addresses the gateway reaches the replicas at. A client that
closes its connection closes the one to the replica, which cancels the generation.

``OpenAIRouter`` is an HTTP proxy that sends each request to a replica's own API by prefix
(executor/router.py), as the gateway does for Jina's protocols: the OpenAI port of ``jina_server.py
--replicas N`` on one machine, and of an exported gateway that reaches its replicas at addresses of their own
(docker-compose) without TLS. With one address (Kubernetes: a Service hides its pods) or TLS (passed through
to the replicas untouched), connections are spliced round robin as above.
"""

import asyncio
import itertools
import json
import logging
import os
import sys
import threading
import time

from executor import jina_compat
from executor.migration import HOP_HEADERS, AnswerCut, Migrator, OpenAIStream, relay
from executor.openai_api import Settings
from executor.router import MIGRATIONS_ENV, ROUTING_ENV

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


def openai_messages(body: bytes) -> list:
    """The messages of an OpenAI request body (``/v1/completions``: its prompt, as one user message)."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: the replica says so
        return []
    if not isinstance(payload, dict):
        return []
    if isinstance(payload.get("messages"), list):
        return payload["messages"]
    prompt = payload.get("prompt")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else []


MAX_BODY_BYTES = Settings.max_body_bytes  # the replicas' own limit: a larger body is refused before it is buffered


def no_replica():
    from aiohttp import web

    return web.json_response({"error": {"message": "no replica of the model is reachable; retry later",
                                        "type": "server_busy", "param": None, "code": None}}, status=503)


def answer_cut(error):
    from aiohttp import web

    return web.json_response({"error": {"message": f"the answer was cut off: its replica stopped ({error}); send the "
                                                   "request again", "type": "server_error", "param": None,
                                        "code": None}}, status=500)


class OpenAIRouter:
    """The OpenAI API's port in front of several replicas' own APIs (``targets``: base URLs): each request goes
    where executor/router.py says, its answer (an event stream too) is passed back as it comes, and a client
    that leaves closes the connection to the replica, which cancels the generation. A replica that cannot be
    reached is skipped; no replica reachable is a 503."""

    def __init__(self, host: str, port: int, targets: list, ssl_certfile=None, ssl_keyfile=None, monitoring=False):
        from prometheus_client import CollectorRegistry

        from executor.metrics import NoRoutingMetrics, RoutingMetrics
        from executor.router import PrefixRouter

        self.host, self.port, self.targets = host, port, targets
        # --monitoring: GET /metrics on this port serves the router's counters (it runs in no Jina process)
        self.registry = CollectorRegistry() if monitoring else None
        self.metrics = RoutingMetrics(self.registry) if monitoring else NoRoutingMetrics()
        self.router = PrefixRouter(targets, on_route=self.metrics.route)
        self.ssl_files = (ssl_certfile, ssl_keyfile) if ssl_certfile else None
        self._session = None
        self._site = None

    async def _forward(self, request):
        from aiohttp import web

        try:
            body = await request.read()  # bounded: the replicas refuse larger bodies anyway
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": {"message": f"the request body is larger than {MAX_BODY_BYTES} "
                                                           "bytes", "type": "invalid_request_error", "param": None,
                                                "code": "request_too_large"}}, status=413)
        messages = openai_messages(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        migrator = Migrator(self._session, self.router, self.metrics)
        stream = OpenAIStream.of(request.path, body)
        try:
            if stream is not None:
                answer = await migrator.forward(request, stream, messages, headers)
            else:
                answer = await migrator.forward_whole(request, body, messages, headers)
        except AnswerCut as error:  # its replica died before answering, and no migration was left (--migrations)
            return answer_cut(error)
        return answer if answer is not None else no_replica()

    async def _metrics(self, request):
        """This router's counters (executor/metrics.py's RoutingMetrics) in Prometheus' text format."""
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve(self) -> None:
        import ssl

        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        if self.registry is not None:
            app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{path:.*}", self._forward)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        context = None
        if self.ssl_files:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.ssl_files)
        self._site = web.TCPSite(runner, self.host, self.port, ssl_context=context)
        await self._site.start()
        log.info("OpenAI API router on port %d: requests go by prefix to the replicas' APIs at %s", self.port,
                 ", ".join(self.targets))
        await asyncio.Event().wait()

    def start(self, timeout: float = 30.0) -> "OpenAIRouter":
        """Serve in a thread of its own; returns once listening, raises if the port cannot be had."""
        failed = []

        def run():
            try:
                asyncio.run(self.serve())
            except Exception as error:  # noqa: BLE001 - reported to the caller below
                failed.append(error)

        thread = threading.Thread(target=run, name="openai-router", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while self._site is None or not self._site._server:
            if failed or not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI API router could not listen on port {self.port}: "
                                   f"{failed[0] if failed else 'timed out'}")
            time.sleep(0.05)
        return self


def main(argv: list) -> None:
    openai_port = None
    while argv[:1] in (["--openai-port"], ["--routing"], ["--migrations"]):
        if argv[0] == "--openai-port":
            openai_port = int(argv[1])
        else:  # read in this process by executor/jina_compat.py and the OpenAI router
            os.environ[MIGRATIONS_ENV if argv[0] == "--migrations" else ROUTING_ENV] = argv[1]
        argv = argv[2:]
    jina_compat.install()
    if openai_port is not None:
        hosts = replica_hosts(argv)
        if len(set(hosts)) > 1 and "--ssl-certfile" not in argv and jina_compat.routing_mode() == "prefix":
            OpenAIRouter("0.0.0.0", openai_port, [f"http://{host}:{openai_port}" for host in hosts]).start()
        else:  # one address (a Kubernetes Service: its pods are hidden behind it), or TLS to pass through as is
            ConnectionBalancer(openai_port, [(host, openai_port) for host in hosts]).start()
    from jina_cli import main as jina_main

    sys.argv = ["jina", *argv]
    jina_main()


if __name__ == "__main__":
    main(sys.argv[1:])
