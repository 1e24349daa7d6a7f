"""Fixes inside Jina's worker (3.33/3.34), at the depth where each problem is. Installed when ``executor``
is imported, i.e. in the worker process before it builds its gRPC handlers and its HTTP app.

1. Errors of streaming endpoints. Jina turns an exception of a batch endpoint into an error status inside
   the response, which the gateway forwards and the client raises. An exception of a *streaming* endpoint
   instead ends the gRPC call; the gateway takes that for a broken connection and replays the whole
   stream (duplicated tokens, then a quiet end). Here the worker's ``stream_doc`` answers a failed stream
   like a batch endpoint: one response carrying the error status. No replay; the client raises.
2. ``stream_doc`` on a batch endpoint (``/chat``). Jina routes an endpoint to ``post`` or to ``stream_doc``,
   never both; a batch endpoint reached by ``stream_doc`` now runs on that one document and streams back its
   results, so clients that read every answer with ``stream_doc`` work (gRPC here, HTTP in 3.).
3. HTTP (Deployments with ``protocol=http`` serve the worker's own FastAPI app behind a load balancer).
   Errors become real HTTP errors with a JSON body naming the field (400 bad request, 503 busy, 500 other)
   instead of a bare 500 or a cut event stream; an error in the middle of a stream is an ``event: error``;
   batch endpoints also answer ``GET`` with an event stream, as streaming endpoints do.
4. Shutdown with HTTP. The load balancer that fronts an HTTP Deployment serves with aiohttp's
   ``_run_app``, which never returns, so every stop waited 60 s for a timeout. It now runs a stoppable
   site and closes it when Jina asks it to shut down, with aiohttp's handler cancellation on: without
   it, a client that left kept the balancer's request to the worker open until the answer was complete.
   The worker's and the gateway's HTTP apps cancel a POST whose client left (CancelOnDisconnect).
5. Replicas. The gateway connects to every replica while they are still loading the model; gRPC's
   reconnect backoff then grows to minutes, and in the meantime every request goes to the replica that
   happened to be ready first. Capping the backoff at one second makes the gateway use all replicas as
   soon as they are up. The gateway process is forked from the one that imported this package.
6. Cancellation through the gateway. When a client cancels a stream, gRPC cancels the gateway's handler
   task, but the gateway's call to the worker sits inside nested async generators suspended at ``yield``;
   it was only cancelled when those generators were garbage collected, so some abandoned answers ran to
   the end. The worker call is now cancelled as soon as the task that reads it ends. And a stream whose
   Executor dies after the first piece is an error for the client: Jina retried it on another replica,
   which sent the whole answer again after the pieces the client already had.
7. HTTP through Jina's full gateway (a Flow, used when WebSocket is served next to HTTP). Its app answers
   a failed ``/chat`` with a bare 500 and cuts a failed ``/stream``; it now answers as in 3 (the same
   status codes, JSON body and events), and batch endpoints answer ``GET`` with an event stream here too.
   It also rebuilt ``Prompt.message`` wrongly, losing every message's content (see _use_wire_classes).
8. Cancellation of batch calls (``/chat``) through the gateway. The gateway sends a client's request to the
   worker from tasks of its own, which outlive the client: an answer nobody waited for any more ran to
   its end. The worker calls started for a client's request are now cancelled when its call ends early.
9. Bodies that are not JSON. The worker's and the gateway's HTTP apps answered 422 "field required" (or a
   bare 400 for JSON nested too deeply); they now answer 400 in the error shape of 3, saying what is wrong
   and where. The balancer in front of an HTTP Deployment parsed each body and forwarded the parsed value,
   or no body at all when it could not parse it; it now forwards the body as it came, over kept-alive
   connections and without aiohttp's default 5-minute limit (which cut long batch jobs).
10. Routing over replicas. Jina's gateway sends each request to the next replica in turn, so a chat's next
   turn lands where its prefix is not cached. With several replicas, the gateway's gRPC calls (``/chat`` and
   ``/stream`` from gRPC, HTTP and WebSocket clients alike) now go where executor/router.py says: the replica
   that was sent the longest prefix of the request's messages, or the least loaded one. Jina's own retry on
   another replica (a replica that cannot be reached) is kept. The balancer in front of an HTTP
   Deployment's replicas routes the same way, reading the messages from the body it forwards.
   ``JINA_LLM_STREAM_ROUTING=round_robin`` restores Jina's choice (jina_server.py's ``--routing``).
11. Request migration. A routed stream whose replica dies after sending pieces (6's StreamInterrupted) goes on
   on another replica: the gateway asks every routed stream for its pieces' token ids
   (``gen_conf.continuation: []``), keeps them and takes them out of the pieces, and re-sends the request with
   the ids so far as ``gen_conf.continuation``; that replica sends only what follows (executor/output.py's
   ``resume``). At most ``JINA_LLM_STREAM_MIGRATIONS`` times per request (jina_server.py's ``--migrations``,
   default 1); past it, the client gets 6's error. A ``/chat`` call (one request, answered whole) whose replica
   dies under it was retried by Jina on another replica from its start, with no bound: that re-issue is its
   continuation (the client had nothing yet), and it is now bounded by the same setting; past it, the client
   gets the error (AnswerInterrupted). A replica that could not be reached at all is retried as before.
12. Metrics. The gateway's process routes, so its registry (``--monitoring``: Jina's ``metrics_registry`` of the
   gateway's server, served on its monitoring port) gets executor/metrics.py's RoutingMetrics: requests routed
   per reason, and migrations per outcome.
"""

import asyncio
import contextvars
import json
import logging

from jina.proto import jina_pb2
from jina.serve.runtimes.worker import http_fastapi_app
from jina.serve.runtimes.worker.request_handling import WorkerRequestHandler
from jina.types.request.data import DataRequest, SingleDocumentRequest

from .migration import JinaEventStream, Migrator, relay  # noqa: E402 - relay: used by the gateway too

log = logging.getLogger("jina_llm_stream.jina_compat")

HTTP_STATUS_BY_ERROR = {"RequestError": 400, "ServerBusyError": 503}


def install() -> None:
    if getattr(WorkerRequestHandler.stream_doc, "_jina_llm_stream", False):
        return
    _patch_stream_doc()
    _patch_http_app()
    _patch_load_balancer_shutdown()
    _patch_load_balancer_body()
    _patch_grpc_reconnect_backoff()
    _patch_gateway_stream_cancellation()
    _patch_gateway_batch_cancellation()
    _patch_gateway_http_app()
    _patch_gateway_routing()
    _patch_gateway_monitoring()


# ---- gRPC: stream_doc -------------------------------------------------------------------------------------
def _patch_stream_doc() -> None:
    original = WorkerRequestHandler.stream_doc

    async def stream_doc(self, request, context):
        endpoint = self._executor.requests.get(request.header.exec_endpoint)
        try:
            if endpoint is not None and not getattr(endpoint.fn, "__is_generator__", False):
                async for response in _stream_batch_endpoint(self, endpoint, request, context):
                    yield response
            else:
                async for response in original(self, request, context):
                    yield response
        except Exception as error:  # noqa: BLE001 - every failure must reach the client as an error
            response = SingleDocumentRequest()
            response.header.request_id = request.header.request_id
            response.header.exec_endpoint = request.header.exec_endpoint
            response.add_exception(error, getattr(self, "_executor", None))
            yield response

    stream_doc._jina_llm_stream = True
    WorkerRequestHandler.stream_doc = stream_doc


async def _stream_batch_endpoint(handler, endpoint, request, context):
    """Run a batch endpoint on the one document of a stream_doc request; stream back its results."""
    data_request = DataRequest()
    data_request.header.exec_endpoint = request.header.exec_endpoint
    data_request.header.request_id = request.header.request_id
    docs_type = endpoint.request_schema  # DocList[Prompt] for a batch endpoint
    data_request.data.docs = docs_type([docs_type.doc_type.from_protobuf(request.document)])
    result = await handler.process_data([data_request], context)
    if result.header.status.code == jina_pb2.StatusProto.ERROR:
        response = SingleDocumentRequest()
        response.header.CopyFrom(result.header)
        yield response
        return
    for doc in result.docs:
        response = SingleDocumentRequest()
        response.header.request_id = request.header.request_id
        response.document_cls = doc.__class__
        response.data.doc = doc
        yield response


# ---- HTTP: the worker's FastAPI app ----------------------------------------------------------------------
class ServiceError(Exception):
    """An error answer for an HTTP client: status code and a JSON body."""

    def __init__(self, name: str, message: str, field: str | None = None):
        self.status_code, self.name, self.message = HTTP_STATUS_BY_ERROR.get(name, 500), name, message
        # RequestError messages read "field=value is not allowed: ..." (executor/sampling.py)
        if field is None and name == "RequestError" and "=" in message:
            field = message.split("=", 1)[0]
        self.field = field
        self.body = {"error": {"type": name, "message": message, "field": self.field}}
        super().__init__(message)


def error_from_status(status) -> ServiceError:
    """The error a Jina response status carries (an Executor's exception), as an HTTP-ready error."""
    name = status.exception.name or "Error"
    message = status.exception.args[0] if status.exception.args else status.description
    return ServiceError(name, message)


def invalid_json_message(error: Exception, document=None) -> str:
    """What is wrong with a body that is not JSON, and where: for the 400 answers of every HTTP face."""
    if isinstance(error, json.JSONDecodeError):
        return f"the body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno} (char {error.pos})"
    if not isinstance(error, RecursionError):  # e.g. bytes that are not UTF-8
        return f"the body is not valid JSON: {error}"
    if isinstance(document, (bytes, bytearray)):
        document = document.decode("utf-8", errors="replace")
    where = _nesting_position(document, MAX_JSON_NESTING) if isinstance(document, str) else None
    at = f" (deeper than {MAX_JSON_NESTING} levels at char {where})" if where is not None else ""
    return f"the body is not valid JSON: it is nested too deeply for the parser{at}"


MAX_JSON_NESTING = 500


def _nesting_position(text: str, limit: int):
    """Index of the first ``[`` or ``{`` that opens level ``limit + 1``, or None."""
    depth, in_string, escaped = 0, False, False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return index
        elif char in "]}":
            depth -= 1
    return None


def _add_body_error_handlers(app) -> None:
    """A body that is not JSON, or not the shape of the endpoint's documents, is a 400 naming the field in
    this server's error shape (FastAPI answers 422, or a bare 400 for JSON nested too deeply)."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def invalid_body(request, error: RequestValidationError):
        message = _validation_message(error)
        field = None if "=" in message.split(" ", 1)[0] else "body"
        return _service_error_response(request, ServiceError("RequestError", message, field))

    async def unparsable_body(request, error: HTTPException):
        if error.status_code == 400 and isinstance(error.__cause__, (ValueError, RecursionError)):  # JSON parsing
            message = invalid_json_message(error.__cause__)
            return _service_error_response(request, ServiceError("RequestError", message, "body"))
        return await http_exception_handler(request, error)

    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, unparsable_body)


def _validation_message(error) -> str:
    first = error.errors()[0]
    if first.get("type") in ("json_invalid", "value_error.jsondecode"):
        pos = first["loc"][-1] if isinstance(first["loc"][-1], int) else 0
        document = error.body if isinstance(error.body, str) else ""
        reason = first.get("ctx", {}).get("error", first["msg"])
        return invalid_json_message(json.JSONDecodeError(reason, document, pos))
    if isinstance(error.body, (bytes, bytearray)):  # not sent as JSON: FastAPI did not parse it
        try:
            json.loads(error.body)
        except (ValueError, RecursionError) as not_json:
            return invalid_json_message(not_json, error.body)
        return "body=<not declared as JSON> is not allowed: send it with the header Content-Type: application/json"
    field = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    return f"{field}=<missing or invalid> is not allowed: {first['msg']}"


def _error_from_exception(error: Exception) -> ServiceError:
    name = type(error).__name__
    return ServiceError(name, str(error))


def _patch_http_app() -> None:
    original_get_app = http_fastapi_app.get_fastapi_app

    def get_fastapi_app(request_models_map, caller, **kwargs):
        app = original_get_app(request_models_map=request_models_map, caller=_checked(caller), **kwargs)
        app.add_exception_handler(ServiceError, _service_error_response)
        _add_body_error_handlers(app)
        for endpoint, models in request_models_map.items():
            if endpoint != "_jina_dry_run_" and not models["is_generator"]:
                _add_event_stream_route(app, endpoint, models["input"]["model"], caller)
        app.add_middleware(CancelOnDisconnect)
        return app

    http_fastapi_app.get_fastapi_app = get_fastapi_app
    http_fastapi_app._gen_dict_documents = _events_or_error


class CancelOnDisconnect:
    """ASGI middleware: a POST whose client disconnects before its answer is cancelled (and with it the
    generation). Starlette notices a disconnect only while it streams a response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()

        async def receive_body():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                body_read.set()
            return message

        async def until_disconnect():
            await body_read.wait()  # from then on the app reads nothing more: the next message is the end
            while (await receive())["type"] != "http.disconnect":
                pass

        answer = asyncio.ensure_future(self.app(scope, receive_body, send))
        watcher = asyncio.ensure_future(until_disconnect())
        try:
            await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not answer.done():
                answer.cancel()
                log.info("an HTTP client left before its answer; the request was cancelled")
                await asyncio.wait({answer})  # its clean-up (e.g. cancelling the model's work) runs now
        if not answer.cancelled():
            answer.result()


def _checked(caller):
    """Raise ServiceError for a failed batch request, or for a stream that fails before its first piece
    (so the answer is an HTTP error status, not an event stream that stops)."""

    async def call(request):
        result = await caller(request)
        if isinstance(result, DataRequest):
            if result.header.status.code == jina_pb2.StatusProto.ERROR:
                raise error_from_status(result.header.status)
            return result
        try:
            first = await first_of(result)
        except Exception as error:  # noqa: BLE001 - the request failed before any piece: an HTTP error
            raise _error_from_exception(error) from error
        return prepend(first, result)

    return call


async def first_of(stream):
    """The first item of an async stream, or None when it is empty; the stream goes on from the second."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def prepend(first, rest):
    """``rest`` with ``first`` in front of it (unless None): a stream whose first item was read already."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def _events_or_error(generator):
    """Jina's document -> server-sent-event conversion, plus an ``error`` event when the stream fails."""
    try:
        async for document in generator:
            yield {"event": "update", "data": document.dict()}
    except Exception as error:  # noqa: BLE001 - report it in the stream, then end it
        yield {"event": "error", "data": json.dumps(_error_from_exception(error).body)}
    yield {"event": "end"}


def _service_error_response(request, error: ServiceError):
    from fastapi.responses import JSONResponse, Response

    if request.method == "GET":  # a stream route (Jina's load balancer does not pass the Accept header on)
        # Jina's own HTTP client ignores the status and error events of a stream; an update whose text is
        # null makes it raise (a validation error) instead of ending quietly as if the answer were empty.
        body = (f"event: error\r\ndata: {json.dumps(error.body)}\r\n\r\n"
                f"event: update\r\ndata: {json.dumps({'text': None, **error.body})}\r\n\r\n")
        return Response(body, status_code=error.status_code, media_type="text/event-stream")
    return JSONResponse(error.body, status_code=error.status_code)


def _add_event_stream_route(app, endpoint: str, input_model, caller) -> None:
    """``GET endpoint`` with one document as JSON body: the batch endpoint's results as server-sent events."""
    from docarray import DocList
    from fastapi import Request

    from jina.serve.networking.sse import EventSourceResponse

    checked = _checked(caller)

    @app.api_route(path=f'/{endpoint.strip("/")}', methods=["GET"], summary=f"Endpoint {endpoint} as a stream")
    async def event_stream(request: Request = None, body: input_model = None):
        data_request = DataRequest()
        data_request.header.exec_endpoint = endpoint
        data_request.document_array_cls = DocList[input_model]
        data_request.direct_docs = DocList[input_model]([body])
        result = await checked(data_request)

        async def documents():
            for doc in result.docs:
                yield doc

        return EventSourceResponse(_events_or_error(documents()))


# ---- gateway: cancel the worker calls of a batch request whose client left ----------------------------
def _patch_gateway_batch_cancellation() -> None:
    import contextvars

    import grpc

    from jina.serve.networking.connection_stub import _ConnectionStubs
    from jina.serve.stream import RequestStreamer

    # The worker calls made for the client call being served. Tasks copy the context they are created in,
    # so the gateway's own tasks for this client call all see (and fill) the same set.
    worker_calls = contextvars.ContextVar("jina_llm_stream_worker_calls", default=None)
    original_stream, original_send = RequestStreamer.stream, _ConnectionStubs.send_requests

    async def stream(self, *args, **kwargs):
        calls = set()
        worker_calls.set(calls)
        finished = False
        try:
            async for response in original_stream(self, *args, **kwargs):
                yield response
            finished = True
        finally:
            if not finished:  # the client's call ended early (cancelled, or it left): stop the work
                for call in calls:
                    call.cancel()

    async def send_requests(self, requests, metadata, compression, timeout=None):
        try:
            return await cancellable_send(self, requests, metadata, compression, timeout)
        except grpc.aio.AioRpcError as error:
            _bound_reissue(error, self.address)  # Jina's retry re-sends the request from its start
            raise

    async def cancellable_send(self, requests, metadata, compression, timeout):
        calls = worker_calls.get()
        if calls is None or len(requests) != 1 or type(requests[0]) is not DataRequest:
            return await original_send(self, requests, metadata, compression, timeout)
        if not self._initialized:
            await self._init_stubs()
        if not self.single_data_stub:
            return await original_send(self, requests, metadata, compression, timeout)
        # Jina's own single-request path, keeping hold of the call so that it can be cancelled: cancelling
        # the task that awaits it does not cancel the call.
        self._record_request_bytes_metric(requests[0].nbytes)
        call = self.single_data_stub.process_single_data(requests[0], metadata=metadata, compression=compression,
                                                         timeout=timeout)
        calls.add(call)
        try:
            with self._get_metric_timer():
                metadata, response = await call.trailing_metadata(), await call
                self._record_received_bytes_metric(response.nbytes)
            return response, metadata
        finally:
            calls.discard(call)

    RequestStreamer.stream, _ConnectionStubs.send_requests = stream, send_requests


# ---- HTTP through the Flow gateway: the same answers as the worker's app ------------------------------
def _patch_gateway_http_app() -> None:
    from jina.serve.runtimes.gateway import http_fastapi_app_docarrayv2 as gateway_app

    original_get_app = gateway_app.get_fastapi_app

    def get_fastapi_app(streamer, **kwargs):
        _use_wire_classes(streamer._endpoints_models_map)
        app = original_get_app(streamer=_ErrorRaisingStreamer(streamer), **kwargs)
        app.add_exception_handler(ServiceError, _service_error_response)
        _add_body_error_handlers(app)
        for endpoint, models in streamer._endpoints_models_map.items():
            if endpoint != "_jina_dry_run_":
                path = f'/{endpoint.strip("/")}'
                app.router.routes = [route for route in app.router.routes
                                     if not (getattr(route, "path", None) == path and "GET" in route.methods)]
                _add_gateway_event_stream_route(app, endpoint, models["input"], streamer)
        app.add_middleware(CancelOnDisconnect)
        return app

    gateway_app.get_fastapi_app = get_fastapi_app


def _use_wire_classes(models_map) -> None:
    """The gateway rebuilds each endpoint's document classes from their JSON schemas, and rebuilds
    ``message: list[dict]`` as a list of empty documents: every message arrived at the worker without its
    role and content. The gateway process has the wire classes themselves: use them."""
    from schemas import Generation, Prompt

    wire_classes = {"Prompt": Prompt, "Generation": Generation}
    for models in models_map.values():
        for key in ("input", "output"):
            models[key] = wire_classes.get(getattr(models[key], "__name__", None), models[key])


class _ErrorRaisingStreamer:
    """The gateway's streamer, except that a failed batch answer raises ServiceError (-> 400/503/500)."""

    def __init__(self, streamer):
        self._streamer = streamer

    def __getattr__(self, name):
        return getattr(self._streamer, name)

    async def stream_docs(self, *args, **kwargs):
        async for response in self._streamer.stream_docs(*args, **kwargs):
            if response.header.status.code == jina_pb2.StatusProto.ERROR:
                raise error_from_status(response.header.status)
            yield response


def _add_gateway_event_stream_route(app, endpoint: str, input_model, streamer) -> None:
    from fastapi import Request

    from jina.serve.networking.sse import EventSourceResponse

    async def documents(body):
        async for document, error in streamer.stream_doc(doc=body, exec_endpoint=endpoint):
            if error:
                message = error.args[0] if error.args else str(error)
                raise ServiceError(error.name or "Error", message)
            yield document

    @app.api_route(path=f'/{endpoint.strip("/")}', methods=["GET"], summary=f"Endpoint {endpoint} as a stream")
    async def event_stream(request: Request, body: input_model = None):
        body = body or input_model.parse_obj(dict(request.query_params))
        pieces = documents(body)
        first = await first_of(pieces)
        return EventSourceResponse(_events_or_error(prepend(first, pieces)))


# ---- HTTP: stoppable load balancer ---------------------------------------------------------------------
def _patch_load_balancer_shutdown() -> None:
    from aiohttp import web
    from jina.serve.runtimes.servers.load_balancer import LoadBalancingServer

    async def run_server(self):
        runner = web.AppRunner(self.app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, host=self.host, port=self.port).start()
        try:
            while not self._server_exit:
                await asyncio.sleep(0.1)
        finally:
            await runner.cleanup()

    LoadBalancingServer.run_server = run_server


def _patch_load_balancer_body() -> None:
    """Jina's balancer parses the body as JSON and sends the parsed value on; a body that is not JSON (or
    nested too deeply to parse) went on as no body at all, and the worker answered "field required". The
    body goes on as it came, with its Content-Type, so the worker's app says what is wrong with it."""
    import aiohttp
    from aiohttp import web
    from jina.serve.runtimes.gateway.request_handling import GatewayRequestHandler

    async def _load_balance(self, request):
        body = await request.read()
        router = _http_router(self)
        headers = {name: request.headers[name] for name in ("Content-Type", "Accept") if name in request.headers}
        stream = JinaEventStream.of(request.path, body) if router is not None and request.method == "GET" else None
        if stream is not None:  # a /stream that goes on on another replica if its replica dies
            answer = await Migrator(_balancer_session(self), router, gateway_metrics()).forward(
                request, stream, http_body_messages(body), headers)
            return answer if answer is not None else web.Response(text="Error: no replica is reachable", status=500)
        if router is not None and request.method == "POST":  # /chat: answered whole, re-sent if its replica dies
            return await _whole_through(self, router, request, body, headers)
        route = router.choose(http_body_messages(body)) if router is not None else None
        target = route.replica if route is not None else next(self.load_balancer_servers)
        try:
            async with _balancer_session(self).request(request.method, url=f"{target}{request.path_qs}",
                                                       auto_decompress=False, data=body, headers=headers) as response:
                return await relay(request, response, response.headers)
        except aiohttp.ClientError as error:
            return web.Response(text=f"Error: {error}", status=500)
        finally:
            if route is not None:
                router.finished(route.replica)

    GatewayRequestHandler._load_balance = _load_balance


async def _whole_through(handler, router, request, body: bytes, headers: dict):
    from aiohttp import web

    from .migration import AnswerCut

    try:
        answer = await Migrator(_balancer_session(handler), router, gateway_metrics()).forward_whole(
            request, body, http_body_messages(body), headers)
    except AnswerCut as error:  # its replica died and no migration was left: the error, as without migration
        return web.Response(text=f"Error: {error}", status=500)
    return answer if answer is not None else web.Response(text="Error: no replica is reachable", status=500)


def _balancer_session(handler):
    """One pool of kept-alive connections (Jina opened a session, and a connection, per request), and no total
    time limit: aiohttp's default of 5 minutes cut long /chat batch jobs and streams."""
    import aiohttp

    if getattr(handler, "_llm_session", None) is None:
        handler._llm_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    return handler._llm_session


def _http_router(handler):
    """The router over an HTTP Deployment's replicas (their URLs, read once from Jina's round-robin cycle), or
    None with one replica or routing off."""
    from executor.router import PrefixRouter

    if routing_mode() != "prefix":
        return None
    if not hasattr(handler, "_llm_router"):
        servers, cycle = [], handler.load_balancer_servers
        for server in cycle:  # an endless cycle: its first element again ends the list
            if servers and server == servers[0]:
                break
            servers.append(server)
        handler._llm_router = PrefixRouter(servers, on_route=_count_route) if len(servers) > 1 else None
    return handler._llm_router


def http_body_messages(body: bytes) -> list:
    """The messages of an HTTP request to /chat (``{"data": [prompt, ...]}``) or /stream (the prompt itself);
    [] when there are none to read (the worker then says what is wrong with the body)."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: the replica says so
        return []
    if isinstance(payload, dict) and "data" in payload:
        payload = payload["data"]
    if isinstance(payload, list):
        payload = payload[0] if payload else None
    messages = payload.get("message") if isinstance(payload, dict) else None
    return messages if isinstance(messages, list) else []


# ---- replicas: reconnect quickly to a replica that was still starting -----------------------------------
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


def _patch_grpc_reconnect_backoff() -> None:
    from jina.serve import helper

    original = helper.get_default_grpc_options
    helper.get_default_grpc_options = lambda: original() + RECONNECT_OPTIONS


# ---- gateway: cancel the worker call when the client's call ends ---------------------------------------
class StreamInterrupted(RuntimeError):
    """A stream broke after its first piece: an error for the client, never a retry from the start."""


def _patch_gateway_stream_cancellation() -> None:
    import grpc

    from jina.serve.networking.connection_stub import _ConnectionStubs

    async def send_single_doc_request(self, request, metadata, compression, timeout=None):
        if not self._initialized:
            await self._init_stubs()
        if not self.stream_doc_stub:
            raise ValueError("Can not send SingleDocumentRequest. gRPC endpoint not available.")
        self._record_request_bytes_metric(request.nbytes)
        call = self.stream_doc_stub.stream_doc(request, compression=compression, timeout=timeout,
                                               metadata=metadata)
        task = asyncio.current_task()
        cancel_call = lambda _task: call.cancel()  # noqa: E731
        task.add_done_callback(cancel_call)
        answered = False
        try:
            with self._get_metric_timer():
                async for response in call:
                    self._record_received_bytes_metric(response.nbytes)
                    answered = True
                    yield response, None
        except grpc.aio.AioRpcError as error:
            if answered:  # Jina would retry on another replica: the client would get the answer twice over
                raise StreamInterrupted(f"the answer was cut off: its Executor stopped ({error.code().name}: "
                                        f"{error.details()}); send the request again") from error
            raise
        finally:
            task.remove_done_callback(cancel_call)

    _ConnectionStubs.send_single_doc_request = send_single_doc_request


# ---- replicas: prefix-aware routing --------------------------------------------------------------------
def routing_mode() -> str:
    import os

    from executor.router import ROUTING_ENV

    return os.environ.get(ROUTING_ENV, "prefix")


def request_messages(request) -> list:
    """The messages of a request's (first) Prompt, read from its protobuf without building documents."""
    from docarray.proto import DocListProto
    from google.protobuf.message import DecodeError

    proto = request.proto
    if isinstance(request, SingleDocumentRequest):
        document = proto.document
    else:
        if proto.data.WhichOneof("documents") == "docs_bytes":
            try:
                docs = DocListProto.FromString(proto.data.docs_bytes).docs
            except DecodeError:  # compressed or another protocol: routed by load alone
                return []
        else:
            docs = proto.data.docs.docs
        if not docs:
            return []
        document = docs[0]
    if "message" not in document.data:
        return []
    value = _node_value(document.data["message"])
    return value if isinstance(value, list) else []


def _node_value(node):
    kind = node.WhichOneof("content")
    if kind == "list":
        return [_node_value(item) for item in node.list.data]
    if kind == "dict":
        return {key: _node_value(item) for key, item in node.dict.data.items()}
    if kind in ("text", "integer", "float", "boolean"):
        return getattr(node, kind)
    return None


class _RoutedReplicas:
    """A gateway's replica list for one request: the router's choice first, then Jina's own order for its
    retries (a replica that could not be reached)."""

    def __init__(self, connections, router, route, first):
        self._connections, self._router, self.route, self._first = connections, router, route, first

    def __getattr__(self, name):
        return getattr(self._connections, name)

    async def get_next_connection(self, num_retries=3):
        if self._first is not None:
            connection, self._first = self._first, None
            return connection
        return await self._connections.get_next_connection(num_retries=num_retries)

    def finish(self) -> None:
        self._router.finished(self.route.replica)


_routers = {}  # id(replica list) -> (replica list, PrefixRouter)


def _route(request, connections, exclude=()):
    """``_RoutedReplicas`` for this request, or None where Jina's choice stands (routing off). A single
    replica is routed too: the others may still be starting, and what it was sent is worth remembering.
    ``exclude``: replicas not to choose while another is up (one that died under this request)."""
    from executor.router import PrefixRouter

    by_address = {c.address: c for c in connections.get_all_connections()}
    if not by_address or routing_mode() != "prefix":
        return None
    known = _routers.get(id(connections))
    if known is None or known[0] is not connections:
        known = _routers[id(connections)] = (connections, PrefixRouter(sorted(by_address), on_route=_count_route))
    router = known[1]
    if set(router.replicas) != set(by_address):  # a replica came up (they start one by one) or went away
        router.sync(sorted(by_address))
    route = router.choose(request_messages(request), exclude)
    return _RoutedReplicas(connections, router, route, by_address[route.replica])


def _patch_gateway_routing() -> None:
    from jina.serve.networking import GrpcConnectionPool

    original_single, original_batch = GrpcConnectionPool._send_single_doc_request, GrpcConnectionPool._send_requests

    def _send_single_doc_request(self, request, connections, *args, **kwargs):
        routed = _route(request, connections)
        if routed is None:
            return original_single(self, request, connections, *args, **kwargs)
        send = lambda request, replicas: original_single(self, request, replicas, *args, **kwargs)  # noqa: E731
        continuation = _Continuation.of(request)
        if continuation is not None:
            return _migrating(send, continuation, routed, connections)
        stream = send(request, routed)

        async def finishing():
            try:
                async for item in stream:
                    yield item
            finally:
                routed.finish()

        return finishing()

    def _send_requests(self, requests, connections, *args, **kwargs):
        routed = _route(requests[0], connections) if len(requests) == 1 else None
        if routed is None:
            return original_batch(self, requests, connections, *args, **kwargs)
        budget = _reissues.set(_Reissues())  # the request's task (created now) copies this context
        try:
            task = original_batch(self, requests, routed, *args, **kwargs)
        finally:
            _reissues.reset(budget)
        task.add_done_callback(lambda _task: routed.finish())
        return task

    GrpcConnectionPool._send_single_doc_request = _send_single_doc_request
    GrpcConnectionPool._send_requests = _send_requests


# ---- replicas: a stream whose replica dies goes on on another one (request migration) ---------------------
class _Continuation:
    """A routed stream's request, asking for its pieces' token ids, and the ids its pieces carried so far."""

    def __init__(self, request, ids: list):
        self.request, self.ids = request, ids
        _write_continuation(request.proto.document, ids)

    @classmethod
    def of(cls, request):
        """The request, made migratable; None where it cannot be (migrations off, or a ``gen_conf`` that is
        not a dict or holds a malformed continuation: the worker answers those with its own 400)."""
        from executor.router import migrations

        if migrations() == 0 or not isinstance(request, SingleDocumentRequest):
            return None
        ids = _sent_continuation(request.proto.document)
        return None if ids is None else cls(request, ids)

    def took(self, response) -> None:
        """Keep a piece's token ids and take them out of it: the client's pieces are what they were."""
        data = response.proto.document.data
        if "token_ids" in data:
            value = _node_value(data["token_ids"])
            self.ids.extend(value if isinstance(value, list) else ())
            del data["token_ids"]

    def resumed(self):
        """The request again, continuing after the ids so far."""
        _write_continuation(self.request.proto.document, self.ids)
        return self.request


def _sent_continuation(document):
    """The ids a client's own ``gen_conf.continuation`` holds ([] without one), or None when it is malformed."""
    if "gen_conf" not in document.data:
        return []
    gen_conf = document.data["gen_conf"]
    if gen_conf.WhichOneof("content") != "dict":
        return None
    if "continuation" not in gen_conf.dict.data:
        return []
    value = _node_value(gen_conf.dict.data["continuation"])
    if isinstance(value, list) and all(type(item) is int for item in value):
        return value
    return None


def _write_continuation(document, ids: list) -> None:
    from docarray.proto import NodeProto

    node = document.data["gen_conf"].dict.data["continuation"]
    node.Clear()
    node.list.SetInParent()  # an empty list too: it asks the replica for the pieces' ids
    node.list.data.extend(NodeProto(integer=token) for token in ids)


async def _migrating(send, continuation: _Continuation, routed, connections):
    """The routed stream; cut by its replica's death (StreamInterrupted, after pieces went out), it is sent
    again as a continuation to another replica, at most ``migrations()`` times. The client's stream goes on
    with the next piece: nothing it had is sent twice."""
    from executor.router import migrations

    left = migrations()
    while True:
        cut = None
        try:
            async for response, metadata in send(continuation.request, routed):
                if isinstance(response, StreamInterrupted) and left > 0:
                    cut = response  # the stream ends here; no error for the client
                    continue
                if isinstance(response, StreamInterrupted):
                    gateway_metrics().migration("exhausted")
                if not isinstance(response, BaseException):
                    continuation.took(response)
                yield response, metadata
        finally:
            routed.finish()
        if cut is None:
            return
        left -= 1
        dead = routed.route.replica
        routed = _route(continuation.request, connections, exclude=(dead,))
        if routed is None:  # no replica left to route to: the error as without migration
            gateway_metrics().migration("no_replica")
            yield cut, None
            return
        gateway_metrics().migration("continued")
        log.warning("a stream's replica %s stopped after %d tokens (%s); continuing it on %s", dead,
                    len(continuation.ids), cut.__cause__ or cut, routed.route.replica)
        continuation.resumed()


# ---- replicas: a /chat call whose replica dies is sent again, bounded -------------------------------------
class AnswerInterrupted(RuntimeError):
    """A whole answer's replica died under it and no migration was left: an error for the client."""


class _Reissues:
    """How often one routed batch request may still be sent again after its replica died under it."""

    def __init__(self):
        from executor.router import migrations

        self.left = migrations()


_reissues = contextvars.ContextVar("jina_llm_stream_reissues", default=None)


def _died_under(error) -> bool:
    """Whether a worker call's error says its replica went away during the call (the request reached it), not
    that it could not be reached (gRPC: "failed to connect to all addresses"), which Jina retries freely."""
    import grpc

    codes = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    return error.code() in codes and "failed to connect" not in (error.details() or "")


def _bound_reissue(error, address: str) -> None:
    """Before Jina retries a routed batch request whose replica died under it: count the re-issue, or, with no
    migration left, raise AnswerInterrupted (not a gRPC error: Jina passes it to the client, no retry)."""
    budget = _reissues.get()
    if budget is None or not _died_under(error):
        return
    if budget.left == 0:
        gateway_metrics().migration("exhausted")
        raise AnswerInterrupted(f"the answer was cut off: its Executor stopped ({error.code().name}: "
                                f"{error.details()}); send the request again") from error
    budget.left -= 1
    gateway_metrics().migration("reissued")
    log.warning("a /chat call's replica %s stopped before answering (%s: %s); sending it again elsewhere", address,
                error.code().name, error.details())


# ---- gateway: routing and migration counters in the gateway's registry ----------------------------------
_gateway_metrics = None  # RoutingMetrics once the gateway's server has a registry (--monitoring)


def gateway_metrics():
    from executor.metrics import NoRoutingMetrics

    return _gateway_metrics or NoRoutingMetrics()


def _count_route(route) -> None:
    gateway_metrics().route(route)


def _patch_gateway_monitoring() -> None:
    from jina.serve.runtimes.monitoring import MonitoringMixin

    original = MonitoringMixin._setup_monitoring

    def _setup_monitoring(self, monitoring, port_monitoring):
        global _gateway_metrics
        original(self, monitoring, port_monitoring)
        handler = getattr(self, "req_handler_cls", None)
        registry = getattr(self, "metrics_registry", None)
        if registry is not None and getattr(handler, "__name__", "") == "GatewayRequestHandler" and \
                getattr(_gateway_metrics, "registry", None) is not registry:  # once per registry
            from executor.metrics import RoutingMetrics

            _gateway_metrics = RoutingMetrics(registry)

    MonitoringMixin._setup_monitoring = _setup_monitoring
