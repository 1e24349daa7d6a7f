"""OpenAI-compatible HTTP API (``--openai-port``), served by every worker next to its engine.

It translates OpenAI requests into the same ``Prompt`` documents Jina clients send and hands them to the
Executor's own ``answers``/``pieces`` in the same process, so validation, limits, batching, cancellation and
the error boundary are the Jina endpoints', with no network hop. Each replica listens on the same port
(``SO_REUSEPORT``: the kernel spreads connections over the replicas of one machine; in Kubernetes each pod
has its own address behind a Service). Why not in the gateway: a Flow takes one gateway, a custom one
would replace Jina's (gRPC, HTTP, WebSocket), and every request would pay a hop to the worker.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

import asyncio
import hmac
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from schemas import Prompt

from .errors import RequestError
from .jina_compat import CancelOnDisconnect, ServiceError, first_of, invalid_json_message, prepend
from .tools import parse_tools

log = logging.getLogger("jina_llm_stream.openai")

# OpenAI parameter -> gen_conf key. Validation (ranges, types) happens in the Executor.
SAMPLING_PARAMETERS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                       "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                       "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
                       "min_tokens": "min_new_tokens",  # min_tokens: vLLM's extension
                       "tools": "tools", "tool_choice": "tool_choice",
                       # Not OpenAI's: the replica router's (executor/gateway.py), continuing a stream elsewhere.
                       "continuation": "continuation"}
# Accepted and without effect here.
IGNORED_PARAMETERS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options",
                      "stream", "n", "model", "messages", "prompt"}
# Accepted only at their "off" value: anything else would change the answer's meaning, so it is refused.
OFF_VALUES = {"logit_bias": (None, {}), "functions": (None, []),
              "function_call": (None, "none", "auto"),
              "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""), "modalities": (None, ["text"]),
              "audio": (None,), "prediction": (None,), "reasoning_effort": (None,)}
FINISH_REASONS = {"stop": "stop", "length": "length", "time_limit": "length"}
# vLLM's guided decoding keys -> the response_format they stand for.
GUIDED = {"guided_json": lambda schema: {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": schema}},
          "guided_regex": lambda pattern: {"type": "regex", "pattern": pattern},
          "guided_choice": lambda choices: {"type": "choice", "choices": choices}}
FORMAT_PARAMETERS = ("response_format", *GUIDED)
MAX_CHOICES = 8  # n: answers per prompt
# Ports for the replicas' APIs behind jina_server.py's OpenAI router (executor/gateway.py), comma-separated.
OPENAI_REPLICA_PORTS_ENV = "JINA_LLM_STREAM_OPENAI_REPLICA_PORTS"


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Settings:
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024


# ---- requests -> Prompt ----------------------------------------------------------------------------------
def gen_conf_from(body: dict, kind: str = "chat") -> tuple[dict, dict]:
    """(gen_conf, gen_conf key -> the OpenAI name the client used) from an OpenAI request body."""
    for name, value in body.items():
        if name in ("logprobs", "top_logprobs"):
            continue
        if name in OFF_VALUES:
            if value not in OFF_VALUES[name]:
                raise APIError(400, f"{name}={json.dumps(value)[:200]} is not supported by this server; leave it "
                               "out", param=name, code="unsupported_parameter")
        elif name not in SAMPLING_PARAMETERS and name not in IGNORED_PARAMETERS and name not in FORMAT_PARAMETERS:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unrecognized_argument")
    choices_per_prompt(body)
    if "max_tokens" in body and "max_completion_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    gen_conf, names = {}, {}
    for name, key in SAMPLING_PARAMETERS.items():
        if body.get(name) is not None:
            gen_conf[key], names[key] = body[name], name
    _response_format(body, gen_conf, names)
    _logprobs(body, kind, gen_conf, names)
    temperature = body.get("temperature")
    if temperature is None or (isinstance(temperature, (int, float)) and temperature > 0):
        gen_conf["do_sample"] = True  # OpenAI samples unless temperature is 0 (its default is 1)
    return gen_conf, names


def choices_per_prompt(body: dict) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n={json.dumps(n)[:50]} is not allowed: 1 <= n <= {MAX_CHOICES}", param="n",
                       code="invalid_value")
    return n


def with_n_choices(prompts: list, n: int) -> list:
    """Each prompt ``n`` times in a row (choice index = prompt index x n + j), all queued as one call; with a
    seed, choice j samples with seed + j (n different answers, each reproducible). The copies share their
    prompt's prefill through the prefix cache (from 64 tokens on; a shorter prompt is recomputed)."""
    copies = []
    for prompt in prompts:
        for j in range(n):
            gen_conf = dict(prompt.gen_conf)
            if j and isinstance(gen_conf.get("seed"), int):
                gen_conf["seed"] += j
            copies.append(Prompt(message=prompt.message, gen_conf=gen_conf))
    return copies


def _logprobs(body: dict, kind: str, gen_conf: dict, names: dict) -> None:
    """Chat: ``logprobs: true`` and ``top_logprobs: N``; completions: ``logprobs: N`` (both ranges checked by
    the Executor as gen_conf.logprobs / gen_conf.top_logprobs)."""
    asked, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == "completion" and body.get("tools"):
        raise APIError(400, "tools are a chat completions parameter (/v1/chat/completions)", param="tools")
    if kind == "chat":
        if asked not in (None, False):
            gen_conf["logprobs"], names["logprobs"] = asked, "logprobs"
        if top is not None:
            gen_conf["top_logprobs"], names["top_logprobs"] = top, "top_logprobs"
        return
    if top is not None:
        raise APIError(400, "top_logprobs is a chat completions parameter; completions take logprobs: N",
                       param="top_logprobs")
    if asked is not None:  # OpenAI: an integer, the number of most likely tokens to list
        gen_conf["logprobs"] = True
        gen_conf["top_logprobs"], names["top_logprobs"] = asked, "logprobs"


def _response_format(body: dict, gen_conf: dict, names: dict) -> None:
    """``response_format`` (validated by the Executor: gen_conf.response_format) or one of vLLM's guided_*."""
    asked = [name for name in FORMAT_PARAMETERS if body.get(name) is not None]
    if len(asked) > 1:
        raise APIError(400, f"give one of {' or '.join(asked)}, not several", param=asked[1])
    if not asked:
        return
    name, value = asked[0], body[asked[0]]
    if name == "guided_json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise APIError(400, f"guided_json is not a JSON schema: {error}", param=name) from None
    gen_conf["response_format"] = value if name == "response_format" else GUIDED[name](value)
    names["response_format"] = name


def text_of(content, field: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise APIError(400, f"{field} must be a string or a list of text parts "
                   '([{"type": "text", "text": "..."}]); other content is not supported', param=field)


def chat_prompt(body: dict) -> tuple[Prompt, dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    converted = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{index}] must be an object with role and content",
                           param=f"messages[{index}]")
        content = message.get("content")
        if not (content is None and message.get("tool_calls")):  # an assistant's calls may come without text
            content = text_of(content, f"messages[{index}].content")
        # The tool fields of OpenAI's history: validated by the Executor with the rest of the message.
        converted.append({"role": message.get("role"), "content": content,
                          **{key: message[key] for key in ("tool_calls", "tool_call_id", "name") if key in message}})
    gen_conf, names = gen_conf_from(body, "chat")
    return Prompt(message=converted, gen_conf=gen_conf), names


def completion_prompts(body: dict) -> tuple[list[Prompt], dict]:
    """One Prompt per string of ``prompt`` (a string, or a list of strings as OpenAI and vLLM accept)."""
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) and text for text in texts):
        raise APIError(400, "prompt must be a non-empty string or a list of non-empty strings (token lists are "
                       "not supported)", param="prompt")
    gen_conf, names = gen_conf_from(body, "completion")
    return [Prompt(message=[{"role": "user", "content": text}], gen_conf={**gen_conf, "raw_prompt": True})
            for text in texts], names


def _one(prompt_and_names: tuple) -> tuple[list[Prompt], dict]:
    prompt, names = prompt_and_names
    return [prompt], names


def openai_param(field: str | None, names: dict, messages_name: str) -> str | None:
    """The Executor's field name (``gen_conf.max_new_tokens``, ``message[0].role``) in the client's terms."""
    if not field:
        return None
    if field.startswith("gen_conf."):
        key = field.split(".", 1)[1]
        head, _, rest = key.partition(".")  # response_format.json_schema.schema
        if head in names and rest:
            return names[head] if names[head] != head else key
        return names.get(key, key)
    if field.startswith("message"):
        return messages_name + field[len("message"):] if messages_name == "messages" else messages_name
    if field == "prompts":  # the number of prompts in one call
        return messages_name
    return field


def api_error_from_backend(name: str, message: str, names: dict, messages_name: str) -> APIError:
    """The Executor's error (its exception's name and message) as an OpenAI error in the client's terms."""
    error = ServiceError(name, message)
    field, status = error.field, error.status_code
    param = openai_param(field, names, messages_name)
    if field:
        message = (param or "") + message[len(field):]
        if field.startswith("gen_conf.") and param:
            message = message.replace(field.split(".", 1)[1], param)  # "1 <= max_new_tokens" -> "1 <= max_tokens"
    if status == 400:
        too_long = ((field == "message" and ("tokens" in message or "characters" in message))
                    or (field == "gen_conf.max_new_tokens" and "context" in message))
        return APIError(400, message, param=param, code="context_length_exceeded" if too_long else "invalid_value")
    if status == 503:
        return APIError(503, message, kind="server_error", code="server_busy")
    return APIError(500, message, kind="server_error")


# ---- the model, through the worker's own path --------------------------------------------------------------
class ExecutorBackend:
    """The OpenAI API's way to the model: the Executor's own ``answers`` and ``pieces`` (validation, limits,
    the call queue and the error boundary of the Jina endpoints), in the same process, with no network hop.
    Errors come back as OpenAI errors in the client's terms."""

    def __init__(self, answers, pieces):
        self._answers, self._pieces = answers, pieces

    async def answers(self, prompts: list, names: dict, messages_name: str, endpoint: str) -> list:
        """Whole answers (Generations, in order) to the prompts of one request, queued as one call."""
        try:
            return await self._answers(prompts, endpoint)
        except Exception as error:  # noqa: BLE001 - the Executor's boundary already logged and named it
            raise api_error_from_backend(type(error).__name__, str(error), names, messages_name) from None

    async def stream(self, prompt: Prompt, names: dict, messages_name: str, endpoint: str):
        """Yield Generation pieces; raise APIError for a refused or failed request."""
        pieces = self._pieces(prompt, endpoint)
        try:
            async for piece in pieces:
                yield piece
        except Exception as error:  # noqa: BLE001
            raise api_error_from_backend(type(error).__name__, str(error), names, messages_name) from None
        finally:
            await pieces.aclose()  # a client that left, or an error: the engine stops generating

    async def streams(self, prompts: list, names: dict, messages_name: str, endpoint: str):
        """(index, Generation) pieces of several streamed answers, as they come; the first error ends all."""
        pieces: asyncio.Queue = asyncio.Queue()

        async def pump(index, prompt):
            try:
                async for piece in self.stream(prompt, names, messages_name, endpoint):
                    await pieces.put((index, piece))
                await pieces.put((index, None))
            except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
                await pieces.put((index, error))

        tasks = [asyncio.ensure_future(pump(i, prompt)) for i, prompt in enumerate(prompts)]
        try:
            unfinished = len(prompts)
            while unfinished:
                index, piece = await pieces.get()
                if isinstance(piece, Exception):
                    raise piece
                if piece is None:
                    unfinished -= 1
                else:
                    yield index, piece
        finally:
            for task in tasks:
                task.cancel()


# ---- the HTTP app -----------------------------------------------------------------------------------------
def build_app(settings: Settings, backend: ExecutorBackend):
    from fastapi import FastAPI, Request

    app = FastAPI(title="jina-llm-stream OpenAI-compatible API", docs_url=None, redoc_url=None)
    card = {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "jina-llm-stream"}
    app.add_exception_handler(APIError, _error_response)
    app.add_middleware(CancelOnDisconnect)  # a client that leaves cancels its generation, streamed or not

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(settings, request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(settings, request)
        check_model(settings, model_id)
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(settings, backend, request, "chat", lambda body: _one(chat_prompt(body)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(settings, backend, request, "completion", completion_prompts)

    return app


def _error_response(_request, error: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status,
                        headers={"Retry-After": "1"} if error.status == 503 else None)


def authorize(settings: Settings, request) -> None:
    if settings.api_key:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")


def check_model(settings: Settings, name) -> None:
    if name != settings.model_id:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{settings.model_id}'",
                       param="model", code="model_not_found")


async def read_body(settings: Settings, request) -> dict:
    """The JSON object of a completion request: bounded in size, for this model, `stream` fields checked."""
    size = int(request.headers.get("content-length") or 0)
    raw = await request.body() if size <= settings.max_body_bytes else b""
    if size > settings.max_body_bytes or len(raw) > settings.max_body_bytes:
        raise APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes",
                       code="request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply
        raise APIError(400, invalid_json_message(error, raw)) from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    check_model(settings, body.get("model"))
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, 'stream_options must be an object like {"include_usage": true}', param="stream_options")
    return body


async def complete(settings: Settings, backend: ExecutorBackend, request, kind: str, build_prompts):
    """Chat or text completions, whole or streamed, one choice per prompt; the client leaving cancels them.
    Whole answers are one ``/chat`` call (all prompts queued as a unit), streams one ``/stream`` each."""
    from fastapi.responses import JSONResponse, StreamingResponse

    authorize(settings, request)
    body = await read_body(settings, request)
    prompts, names = build_prompts(body)
    n = choices_per_prompt(body)
    prompts = with_n_choices(prompts, n)
    shape = Shape(kind, settings.model_id, tools_of(body, shape_kind=kind))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if not body.get("stream") or shape.calls_tools:  # calls are found in whole answers
        answers = await backend.answers(prompts, names, shape.messages_name, request.url.path)
        if body.get("stream"):
            return StreamingResponse(_sse_of_whole(shape, answers, n, include_usage), media_type="text/event-stream")
        return JSONResponse({**shape.envelope(chunk=False), "usage": _usage(answers, n),
                             "choices": [shape.choice(index, answer.text, answer.finish_reason, chunk=False,
                                                      logprobs=answer.logprobs)
                                         for index, answer in enumerate(answers)]})
    pieces = backend.streams(prompts, names, shape.messages_name, request.url.path)
    first = await first_of(pieces)  # before the response starts: a refused request is an HTTP error status
    return StreamingResponse(_sse(shape, len(prompts), n, first, pieces, include_usage),
                             media_type="text/event-stream")


# ---- responses --------------------------------------------------------------------------------------------
def tools_of(body: dict, shape_kind: str):
    """The request's tools (tools.Tools) when answers may hold calls to find, else None."""
    if shape_kind != "chat" or not body.get("tools"):
        return None
    try:
        tools = parse_tools(body.get("tools"), body.get("tool_choice"), field="gen_conf")
    except RequestError as error:
        raise api_error_from_backend("RequestError", str(error), {"tools": "tools", "tool_choice": "tool_choice"},
                                     "messages") from None
    return tools if tools is not None and tools.choice != "none" else None


class Shape:
    """The JSON of chat completions and of (text) completions."""

    def __init__(self, kind: str, model_id: str, tools=None):
        self.kind, self.model_id, self.tools = kind, model_id, tools
        self.calls_tools = tools is not None
        self.messages_name = "messages" if kind == "chat" else "prompt"
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, chunk: bool) -> dict:
        kind = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.kind == "chat" else ""),
                "created": self.created, "model": self.model_id}

    def chunk_event(self, choices: list, include_usage: bool, **extra) -> str:
        """One server-sent event of a streamed answer (``usage: null`` on each chunk when usage is asked for)."""
        payload = {**self.envelope(True), "choices": choices, **({"usage": None} if include_usage else {}), **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def role_chunk(self, index: int) -> dict:
        return self.choice(index, None, None, True) | {"delta": {"role": "assistant", "content": ""}}

    def choice(self, index: int, text: str | None, finish_reason, chunk: bool, logprobs=None, offset: int = 0) -> dict:
        """``logprobs``: the Generation's entries (None when not asked); ``offset``: where ``text`` starts in
        the answer (completions' text_offset)."""
        reason = FINISH_REASONS.get(finish_reason, finish_reason)
        if self.kind == "completion":
            return {"index": index, "text": text or "", "logprobs": _completion_logprobs(logprobs, offset),
                    "finish_reason": reason}
        shown = None if logprobs is None else {"content": logprobs, "refusal": None}
        if self.calls_tools and not chunk:
            from .tools import parse_tool_calls

            content, calls = parse_tool_calls(text or "", self.tools)
            message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            return {"index": index, "message": message, "logprobs": shown,
                    "finish_reason": "tool_calls" if calls else reason}
        if chunk:
            return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": shown,
                    "finish_reason": reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": shown,
                "finish_reason": reason}


def _completion_logprobs(entries, offset: int):
    """The legacy completions shape: parallel lists, top_logprobs as {token: logprob}."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _usage(lasts: list, n: int) -> dict:
    """Usage of a request, from each choice's last Generation (None for one that never came); ``lasts`` holds
    ``n`` choices per prompt in a row (with_n_choices). As OpenAI counts it: completion tokens summed over
    the choices, each prompt counted once however many choices it has."""
    completion = sum((last.completion_tokens or 0) for last in lasts if last)
    prompt = cached = 0
    for start in range(0, len(lasts), n):
        came = [last for last in lasts[start:start + n] if last]
        if not came:
            continue
        prompt += came[0].prompt_tokens or 0  # the n copies are the same prompt, the same tokens
        # The prompt's cached tokens, once: those of its first choice (the first that came, should one not).
        # Not the max: the copies are queued in choice order, and choices 1..n-1 reuse the blocks choice 0
        # computed for this very request (from 64 tokens on), so the max would report a cache hit on a prompt
        # never seen before. Choice 0's hit is what earlier requests left: what the same request with n=1
        # reports, and prompt_tokens - cached_tokens stays about what this request's prompt cost to compute.
        cached += getattr(came[0], "cached_tokens", 0) or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _sse_of_whole(shape: Shape, answers: list, n: int, include_usage: bool):
    """A stream of answers that may call tools: their calls are found once each answer is complete, then
    sent as one tool-call delta per call (OpenAI's chunk shapes)."""
    def event(choices: list, **extra) -> str:
        return shape.chunk_event(choices, include_usage, **extra)

    for index, answer in enumerate(answers):
        whole = shape.choice(index, answer.text, answer.finish_reason, chunk=False, logprobs=answer.logprobs)
        message = whole["message"]
        yield event([shape.role_chunk(index)])
        if message["content"]:
            yield event([shape.choice(index, message["content"], None, True, answer.logprobs)])
        for position, call in enumerate(message.get("tool_calls", [])):
            yield event([shape.choice(index, None, None, True) | {"delta": {"tool_calls": [{"index": position, **call}]}}])
        yield event([shape.choice(index, None, None, True) | {"finish_reason": whole["finish_reason"]}])
    if include_usage:
        yield event([], usage=_usage(answers, n))
    yield "data: [DONE]\n\n"


async def _sse(shape: Shape, count: int, n: int, first, pieces, include_usage: bool):
    def event(choices: list, **extra) -> str:
        return shape.chunk_event(choices, include_usage, **extra)

    lasts, offsets = [None] * count, [0] * count
    if shape.kind == "chat":
        for index in range(count):
            yield event([shape.role_chunk(index)])
    try:
        async for index, piece in prepend(first, pieces):
            lasts[index] = piece
            if piece.text:
                ids = {} if piece.token_ids is None else {"token_ids": piece.token_ids}  # for the router only
                yield event([shape.choice(index, piece.text, None, True, piece.logprobs, offsets[index])], **ids)
                offsets[index] += len(piece.text)
            if piece.finish_reason:
                yield event([shape.choice(index, None if shape.kind == "chat" else "", piece.finish_reason, True)])
    except APIError as error:  # after the first piece: report it in the stream, then end it
        yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        yield event([], usage=_usage(lasts, n))
    yield "data: [DONE]\n\n"


# ---- serving it in the worker -----------------------------------------------------------------------------
class OpenAIServer:
    """uvicorn in a thread of the worker process, on a socket its other replicas on this machine share."""

    def __init__(self, settings: Settings, backend: ExecutorBackend, host: str, port: int, ssl_certfile=None,
                 ssl_keyfile=None):
        import uvicorn

        config = uvicorn.Config(build_app(settings, backend), host=host, port=port, log_level="warning",
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.host, self.port = host, port
        # Set by jina_server.py when its own router takes the OpenAI port in front of several replicas.
        self.router_ports = [int(p) for p in os.environ.get(OPENAI_REPLICA_PORTS_ENV, "").split(",") if p]
        if self.router_ports:
            config.ssl_certfile = config.ssl_keyfile = None  # the router holds TLS; the hop is the loopback

    def _socket(self):
        if self.router_ports:
            return self._router_socket()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise RuntimeError(f"openai_port={self.port}: cannot listen on {self.host}:{self.port} ({error}); "
                               "choose a free port") from None
        sock.set_inheritable(True)
        return sock

    def _router_socket(self):
        """Behind jina_server.py's router: the first of its ports no other replica holds (no SO_REUSEPORT, so
        a bound port is this replica's alone), on the loopback only."""
        for port in self.router_ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            self.host, self.port = "127.0.0.1", port
            sock.set_inheritable(True)
            return sock
        raise RuntimeError(f"every port of {OPENAI_REPLICA_PORTS_ENV}={','.join(map(str, self.router_ports))} is "
                           "taken: more replicas than ports")

    def start(self, timeout: float = 30.0) -> "OpenAIServer":
        import threading

        sock = self._socket()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="openai-api",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI API could not listen on port {self.port} (see the log above)")
            time.sleep(0.05)
        log.info("OpenAI-compatible API on port %d: /v1/models, /v1/chat/completions, /v1/completions", self.port)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
