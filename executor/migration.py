"""Relaying a replica's HTTP answer through a router, and carrying a stream over to another replica when its
replica dies (request migration, NVIDIA Dynamo's name for it).

The HTTP routers in front of the replicas (executor/gateway.py's ``OpenAIRouter`` for the OpenAI API,
executor/jina_compat.py's balancer for an HTTP Deployment's ``GET /stream``) pass answers back with ``relay``.
A streamed answer they may migrate goes through ``Migrator`` instead: the replica is asked for each piece's
token ids (``continuation: []``, the engine's gen_conf.continuation), the router keeps them and takes them out
of the events the client gets; when the replica's connection breaks before the stream's last event, the
request is sent to another replica with the ids so far as its continuation, and that replica's events follow
in the same response: the client sees one stream, nothing repeated, nothing lost. At most ``migrations()``
times per request; past that, the client's stream is cut as without migration.

A whole answer (a non-streamed completion, Jina's ``POST /chat``) sends the client nothing before it is complete,
so a replica that dies under it is re-sent the request from its start (``Migrator.forward_whole``): that is its
continuation. What happened is counted in ``metrics`` (executor/metrics.py's RoutingMetrics). No Jina in here.
"""

import json
import logging
import re

from .metrics import NoRoutingMetrics
from .router import migrations

log = logging.getLogger("jina_llm_stream.migration")


async def relay(request, response, headers):
    """Pass an aiohttp client ``response`` back to the aiohttp server's ``request`` as it comes (an event stream
    piece by piece), with these headers."""
    from aiohttp import web

    answer = web.StreamResponse(status=response.status, headers=headers)
    await answer.prepare(request)
    async for chunk in response.content.iter_any():
        await answer.write(chunk)
    await answer.write_eof()
    return answer


class MigratableStream:
    """One streamed answer passing through a router: the ids its events carried so far, and how its events
    reach the client. Subclasses know one event format."""

    separator = b"\n\n"

    def __init__(self, payload: dict):
        self.payload, self.ids = payload, []
        self.started = False  # a replica sent an event: the next one is a continuation
        self.continued = False  # a replica other than the first is answering
        self.done = False  # the stream's last event went out

    def body(self) -> bytes:
        """The request for the next replica: asking for the ids, and continuing after those so far."""
        self.continued = self.started
        return json.dumps(self.with_continuation(self.ids)).encode()

    async def pass_on(self, response, answer) -> None:
        """The replica's events, as the client gets them, until its stream ends (or breaks: aiohttp raises)."""
        pending = b""
        async for data in response.content.iter_any():
            pending += data
            *events, pending = pending.split(self.separator)
            for event in events:
                self.started = True
                shown = self.event(event)
                if shown is not None:
                    await answer.write(shown + self.separator)


class OpenAIStream(MigratableStream):
    """A streamed chat or text completion (OpenAI's ``data: {chunk}`` events, ``data: [DONE]`` last). A
    continuation's role chunk is dropped (the client had one), and its chunks keep the first replica's
    ``id`` and ``created``."""

    def __init__(self, payload: dict):
        super().__init__(payload)
        self.first = None  # (id, created) of the first replica's chunks

    @classmethod
    def of(cls, path: str, body: bytes):
        """The stream to migrate, or None: whole answers, several choices, tools (answered whole), a client's own
        continuation, or a body the replica will refuse."""
        payload = _json_object(body) if path in ("/v1/chat/completions", "/v1/completions") else None
        if (payload is None or payload.get("stream") is not True or payload.get("n", 1) != 1 or payload.get("tools")
                or "continuation" in payload or not isinstance(payload.get("prompt", ""), str)):
            return None
        return cls(payload) if migrations() > 0 else None

    def with_continuation(self, ids: list) -> dict:
        return {**self.payload, "continuation": ids}

    def event(self, event: bytes):
        if event == b"data: [DONE]":
            self.done = True
        if not event.startswith(b"data: {"):
            return event
        chunk = json.loads(event[len(b"data: "):])
        self.ids.extend(chunk.pop("token_ids", None) or ())
        if "id" in chunk and self.first is None:
            self.first = (chunk["id"], chunk.get("created"))
        if self.continued:
            if any("role" in (choice.get("delta") or {}) for choice in chunk.get("choices") or ()):
                return None
            if "id" in chunk:
                chunk["id"], chunk["created"] = self.first
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode()  # as the replica writes it

    @staticmethod
    def error_event(message: str) -> bytes:
        error = {"error": {"message": f"the answer was cut off: {message}", "type": "server_error", "param": None,
                           "code": None}}
        return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


_TOKEN_IDS = re.compile(rb'"token_ids": (\[[0-9, ]*\])')


class JinaEventStream(MigratableStream):
    """Jina's ``GET /stream`` (``event: update`` with a Generation, ``event: end`` last). A piece's ids are
    written over with null, as a piece that was never asked for them has it."""

    separator = b"\r\n\r\n"

    @classmethod
    def of(cls, path: str, body: bytes):
        payload = _json_object(body) if path == "/stream" else None
        gen_conf = payload.get("gen_conf", {}) if payload is not None else None
        if not isinstance(gen_conf, dict) or "continuation" in gen_conf or migrations() == 0:
            return None
        return cls(payload)

    def with_continuation(self, ids: list) -> dict:
        return {**self.payload, "gen_conf": {**self.payload.get("gen_conf", {}), "continuation": ids}}

    def event(self, event: bytes):
        if event.startswith(b"event: end"):
            self.done = True
        found = _TOKEN_IDS.search(event)
        if found is None:
            return event
        self.ids.extend(json.loads(found.group(1)))
        return event[:found.start(1)] + b"null" + event[found.end(1):]

    @staticmethod
    def error_event(message: str) -> bytes:
        error = {"error": {"type": "EngineError", "message": f"the answer was cut off: {message}"}}
        return f"event: error\r\ndata: {json.dumps(error)}\r\n\r\nevent: end\r\n\r\n".encode()


def _json_object(body: bytes):
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


class AnswerCut(Exception):
    """A whole answer's replica died before answering and no migration was left: the router answers the error."""


class Migrator:
    """Sends a migratable stream to the replicas ``router`` chooses (a PrefixRouter over base URLs), through an
    aiohttp ``session``, and answers the client's aiohttp ``request`` with it."""

    def __init__(self, session, router, metrics=None):
        self.session, self.router, self.metrics = session, router, metrics or NoRoutingMetrics()

    async def forward(self, request, stream: MigratableStream, messages: list, headers: dict):
        """The client's response: the first replica's, and a continuation's events after a replica's death."""
        from aiohttp import web

        answer, left, excluded = None, migrations(), set()
        while len(excluded) < len(self.router.replicas):
            route = self.router.choose(messages, exclude=excluded)
            excluded.add(route.replica)
            try:
                outcome = await self._stream_from(route.replica, request, stream, headers, answer)
            finally:
                self.router.finished(route.replica)
            if isinstance(outcome, web.StreamResponse):
                return outcome  # the answer ended (or the replica refused the request, as it said)
            answer, cut = outcome
            if cut is None:
                continue  # the replica could not be reached: nothing was sent, another one is tried
            if left == 0:
                self.metrics.migration("exhausted")
                raise cut  # no migration left: the client's stream is cut, as without migration
            if len(excluded) == len(self.router.replicas):
                break
            left -= 1
            self.metrics.migration("continued")
            log.warning("a stream's replica %s stopped after %d tokens (%s); continuing it elsewhere", route.replica,
                        len(stream.ids), cut)
        if answer is None:
            return None  # no replica reachable: the router answers that
        self.metrics.migration("no_replica")
        await answer.write(stream.error_event("no other replica could continue it"))
        await answer.write_eof()
        return answer

    async def forward_whole(self, request, body: bytes, messages: list, headers: dict):
        """The client's response to a request answered whole; None when no replica is reachable. A replica that
        dies before its answer came is sent nothing more: the request goes to another replica from its start, at
        most ``migrations()`` times; past that (or with no other replica), AnswerCut (the client has nothing yet)."""
        import aiohttp

        left, excluded = migrations(), set()
        while len(excluded) < len(self.router.replicas):
            route = self.router.choose(messages, exclude=excluded)
            excluded.add(route.replica)
            try:
                response = await self.session.request(request.method, f"{route.replica}{request.path_qs}", data=body,
                                                      headers=headers, auto_decompress=False)
            except aiohttp.ClientConnectorError as error:  # never reached: nothing to count, the next replica
                log.warning("the replica at %s is unreachable: %s", route.replica, error)
                self.router.finished(route.replica)
                continue
            except _cut_errors() as error:  # it died before its answer's headers: the client has nothing yet
                self.router.finished(route.replica)
                if left == 0 or len(excluded) == len(self.router.replicas):
                    self.metrics.migration("exhausted" if left == 0 else "no_replica")
                    raise AnswerCut(error) from error
                left -= 1
                self.metrics.migration("reissued")
                log.warning("a whole answer's replica %s stopped before answering (%s); sending it again elsewhere",
                            route.replica, error)
                continue
            try:
                async with response:
                    return await relay(request, response, _end_to_end(response.headers))
            finally:
                self.router.finished(route.replica)
        return None

    async def _stream_from(self, replica: str, request, stream: MigratableStream, headers: dict, answer):
        """Pass one replica's events on. Returns the finished response, or ``(answer, cut)``: the client's
        response so far (None: not started) and why the replica's stream broke (None: it was never reached)."""
        import aiohttp
        from aiohttp import web

        try:
            async with self.session.request(request.method, f"{replica}{request.path_qs}", data=stream.body(),
                                            headers=headers, auto_decompress=False) as response:
                if answer is None and response.status != 200:
                    return await relay(request, response, _end_to_end(response.headers))
                if response.status != 200:  # a continuation refused: the stream has begun, it ends with the error
                    await answer.write(stream.error_event((await response.read()).decode(errors="replace")))
                    await answer.write_eof()
                    return answer
                if answer is None:
                    answer = web.StreamResponse(status=200, headers=_end_to_end(response.headers))
                    await answer.prepare(request)
                await stream.pass_on(response, answer)
        except aiohttp.ClientConnectorError as error:
            log.warning("the replica at %s is unreachable: %s", replica, error)
            return answer, None
        except _cut_errors() as error:
            return answer, error
        if stream.done:
            await answer.write_eof()
            return answer
        return answer, ConnectionError("the replica's answer ended before its last event")


def _cut_errors():
    import aiohttp

    return aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError


HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def _end_to_end(headers) -> dict:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
