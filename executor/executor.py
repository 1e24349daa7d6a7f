"""The Jina adapter: documents in, engine requests out, engine events back to documents.

``/chat`` (batch: ``Client.post``) and ``/stream`` (``Client.stream_doc``) share ``_prepare`` (one path
from a ``Prompt`` to token ids and settings) and the engine's call queue, so they cannot drift apart.
``_error_boundary`` is the one place that decides what a client sees when something goes wrong.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from dataclasses import replace
from typing import Optional

import torch
from docarray import DocList
from jina import Executor, requests

from schemas import Generation, Prompt

from . import jina_compat
from .detok import sent_text
from .engine import Engine, EngineConfig
from .errors import EngineError, ModelLoadError, RequestError, ServerBusyError
from .grammar import Grammars
from .kv_cache import parse_memory_size
from .metrics import EngineMetrics
from .openai_api import ExecutorBackend, OpenAIServer
from .openai_api import Settings as OpenAISettings
from .quantize import DEFAULT_QUANTIZE, check_quantize
from .speculation import DEFAULT_SPECULATE, check_speculate
from .model import PromptTooLong, encode_prompt, encode_raw_prompt, in_passing_thread, load
from .validation import Limits, fit_to_context, parse_gen_conf, validate_messages

jina_compat.install()
log = logging.getLogger("jina_llm_stream.executor")

STREAM_TEXT_MODES = ("delta", "cumulative")


# Set when several replicas share one machine: each replica's CPU threads, a number (jina_server.py) or
# ``share:N``, the cores this replica sees divided by N replicas (the docker-compose export's workers).
CPU_THREADS_ENV = "JINA_LLM_STREAM_CPU_THREADS"


def cpu_threads(value: str | None):
    """The threads ``JINA_LLM_STREAM_CPU_THREADS`` asks for, or None (unset or not understood)."""
    value = (value or "").strip()
    if value.startswith("share:") and value[len("share:"):].isdigit() and int(value[len("share:"):]) > 0:
        return max(1, len(os.sched_getaffinity(0)) // int(value[len("share:"):]))
    return int(value) if value.isdigit() and int(value) > 0 else None


def share_the_cpu() -> None:
    """Replicas on one machine each take their share of its cores: with torch's default (every core) in each,
    N replicas run N x cores compute threads on the cores, and a busy replica's answers reached its clients in
    bursts (the thread sending the pieces got no CPU for seconds: measured with 2 replicas on 2 cores)."""
    threads = cpu_threads(os.environ.get(CPU_THREADS_ENV))
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("this replica computes on %d CPU thread(s): its share of the machine's (%s)", threads,
                 CPU_THREADS_ENV)


class TokenStreamingExecutor(Executor):
    """Serves a Hugging Face causal LM: ``/chat`` for whole answers, ``/stream`` for pieces as they come."""

    def __init__(
        self,
        model_name: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = DEFAULT_QUANTIZE,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        max_new_tokens_limit: int = 2048,
        max_prompt_tokens: int = 4096,
        max_prompt_chars: int = 200_000,
        max_batch_size: int = 16,
        max_queue: int = 4096,
        max_prompts_per_call: int = 2048,
        prefill_chunk: int = 256,
        request_timeout: float = 300.0,
        kv_cache_memory: str = "auto",
        prefix_caching: bool = True,
        speculate: int = DEFAULT_SPECULATE,
        stream_text: str = "delta",
        log_prompts: bool = False,
        openai_port: Optional[int] = None,
        openai_host: str = "0.0.0.0",
        api_key: Optional[str] = None,
        ssl_certfile: Optional[str] = None,
        ssl_keyfile: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if stream_text not in STREAM_TEXT_MODES:
            raise ValueError(f"stream_text={stream_text!r} is not allowed: use one of {', '.join(STREAM_TEXT_MODES)}")
        self.stream_text = stream_text
        check_speculate(speculate)
        check_quantize(quantize)
        self.log_prompts = log_prompts
        if max_prompts_per_call > max_queue:
            log.info("max_prompts_per_call=%d is lowered to max_queue=%d: a larger call could never be queued",
                     max_prompts_per_call, max_queue)
        self.max_prompts_per_call = min(max_prompts_per_call, max_queue)
        # What a chat template may add around the content (role markers, system preambles) is bounded too.
        self.max_rendered_chars = 2 * max_prompt_chars + 65_536
        share_the_cpu()
        try:
            loaded = in_passing_thread(lambda: load(model_name, device=device, dtype=dtype,
                                                    trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                                    quantize=quantize))
        except ModelLoadError as error:
            log.error("%s", error)  # one plain line; Jina's own report of the failure follows
            raise
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        try:
            memory = parse_memory_size(kv_cache_memory)
        except ValueError as error:
            log.error("%s", error)
            raise
        context = loaded.context_length or 1 << 30
        self.engine = in_passing_thread(lambda: Engine(
            loaded.model, loaded.tokenizer, loaded.eos_token_ids,
            EngineConfig(max_batch_size=max_batch_size, max_queue=max_queue, prefill_chunk=prefill_chunk,
                         request_timeout=request_timeout, kv_cache_memory=memory, prefix_caching=prefix_caching,
                         speculate=speculate,
                         max_context=min(context, max_prompt_tokens + max_new_tokens_limit)),
        ))
        if self.engine.max_context < min(context, max_prompt_tokens + max_new_tokens_limit):
            log.warning("kv_cache_memory=%s holds prompt + answer of at most %d tokens: longer requests are refused",
                        kv_cache_memory, self.engine.max_context)
        context = min(context, self.engine.max_context)
        self.limits = Limits(
            max_new_tokens_limit=max_new_tokens_limit,
            max_prompt_tokens=min(max_prompt_tokens, context - 1),
            max_prompt_chars=max_prompt_chars,
            context_length=context,
            vocab_size=loaded.vocab_size,
        )
        registry = getattr(self.runtime_args, "metrics_registry", None)
        if registry is not None:  # Jina's --monitoring: our metrics join Jina's on the same endpoint
            self.engine.metrics = EngineMetrics(registry, self.engine.load, self.engine.kv_copies,
                                                self.engine.kv_usage, self.engine.kv_resident_bytes)
        self._call_preparer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._grammar_compiler = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.grammars = Grammars(loaded.tokenizer, loaded.vocab_size,
                                 loaded.eos_token_ids)
        self.engine.start()
        self._warm_up()
        self.openai_server = None
        if openai_port is not None:  # each replica serves it next to its own engine (SO_REUSEPORT balances)
            settings = OpenAISettings(model_id=loaded.name,
                                      api_key=api_key or os.environ.get("JINA_LLM_STREAM_API_KEY") or None)
            self.openai_server = OpenAIServer(settings, ExecutorBackend(self.answers, self.pieces), openai_host,
                                              openai_port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile).start()

    def _warm_up(self) -> None:
        """One real generation before Jina reports this Executor ready, so readiness means able to answer."""
        done = threading.Event()
        outcome = []
        prompt_ids = encode_prompt(self.tokenizer, [{"role": "user", "content": "warm-up"}])
        settings = fit_to_context(parse_gen_conf({"max_new_tokens": 2}, self.limits), len(prompt_ids), self.limits)

        def on_event(event):
            if isinstance(event, BaseException) or event.finish_reason:
                outcome.append(event)
                done.set()

        self.engine.submit(prompt_ids, settings, on_event, label="warm-up")
        if not done.wait(timeout=600) or isinstance(outcome[0], BaseException):
            raise RuntimeError(f"warm-up generation failed: {outcome[0] if outcome else 'timed out'}")

    @requests(on="/chat")
    async def chat(self, docs: DocList[Prompt], **kwargs) -> DocList[Generation]:
        """Whole answers, one per prompt, in order. The call is queued as a unit and its prompts enter the
        running batch as rows free up (executor/scheduler.py says who goes first)."""
        return DocList[Generation](await self.answers(docs, "/chat"))

    @requests(on="/stream")
    async def stream(self, doc: Prompt, **kwargs) -> Generation:
        """One Generation per new piece of text (or the whole text so far, with ``stream_text=cumulative``)."""
        async for piece in self.pieces(doc, "/stream", cumulative=self.stream_text == "cumulative"):
            yield piece

    # ---- the one path from Prompt documents to answers (the Jina endpoints and the OpenAI API) ----------
    async def answers(self, docs, endpoint: str) -> list:
        """Whole answers (Generations, in order) to the prompts of one call, queued as a unit."""
        with self._error_boundary(endpoint):
            if len(docs) > self.max_prompts_per_call:
                raise RequestError("prompts", len(docs), f"at most max_prompts_per_call={self.max_prompts_per_call} "
                                   "prompts in one call; send them in smaller requests (Jina Client: "
                                   f"post(..., request_size={min(100, self.max_prompts_per_call)}))")
            # Every prompt is checked before any work starts. A thousand chat templates take a while: off the
            # event loop that serves the other clients, on one thread, so that calls reach the engine's queue
            # in the order they arrived (a client's job split into requests then finishes in its order).
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._call_preparer, lambda: [self._prepare(doc) for doc in docs])
            answers = await self.engine.complete(prepared, label=endpoint)
        return [_generation(text, last, self.tokenizer) for text, last in answers]

    async def pieces(self, doc: Prompt, endpoint: str, cumulative: bool = False):
        """One Generation per new piece of text (``cumulative``: its text is the whole answer so far, a
        continuation's included); closing the iterator cancels the generation."""
        with self._error_boundary(endpoint):
            if isinstance(doc.gen_conf, dict) and {"response_format", "tool_choice"} & doc.gen_conf.keys():  # slow
                prompt_ids, settings = await asyncio.get_running_loop().run_in_executor(
                    self._grammar_compiler, self._prepare, doc)
            else:
                prompt_ids, settings = self._prepare(doc)
            migratable = settings.continuation is not None  # a router asks for the ids, to continue elsewhere
            so_far = ""  # with cumulative text, a continuation's first piece holds the text sent before it too
            if cumulative and migratable:
                so_far = sent_text(self.tokenizer, settings.stop, settings.continuation)
            async for event in self.engine.stream(prompt_ids, settings, label=endpoint):
                if event.text or event.finish_reason:
                    so_far += event.text
                    piece = _generation(so_far if cumulative else event.text, event, self.tokenizer)
                    if migratable:
                        piece.token_ids = event.token_ids
                    yield piece

    def _prepare(self, doc: Prompt):
        """Validate and tokenize one prompt; raises RequestError naming the field."""
        messages = validate_messages(doc.message, self.limits)
        settings = parse_gen_conf(doc.gen_conf, self.limits)
        if self.log_prompts:
            log.info("prompt messages=%r gen_conf=%r", messages, doc.gen_conf)
        if settings.raw_prompt:
            if len(messages) != 1:
                raise RequestError("message", f"<{len(messages)} messages>", "exactly one message when "
                                   "gen_conf.raw_prompt is true: its content is the prompt, sent without the chat template")
            return self._fit(encode_raw_prompt(self.tokenizer, messages[0]["content"]), settings)
        try:
            prompt_ids = encode_prompt(self.tokenizer, messages, max_chars=self.max_rendered_chars, tools=settings.tools)
        except PromptTooLong as error:
            raise RequestError("message", f"<{len(messages)} messages>", str(error)) from None
        except Exception as error:  # noqa: BLE001 - a template that refuses these messages (e.g. role order)
            raise RequestError("message", f"<{len(messages)} messages>", f"the chat template refused them: {error}")
        return self._fit(prompt_ids, settings)

    def _fit(self, prompt_ids: list, settings):
        settings = fit_to_context(settings, len(prompt_ids), self.limits)
        if settings.response_format is not None:  # compiled here, off the event loop and the engine thread
            forced_call = settings.tools is not None and settings.tools.constrained
            field = "gen_conf.tools" if forced_call else "gen_conf.response_format"
            settings = replace(settings, grammar=self.grammars.row_grammar(settings.response_format, field))
        return prompt_ids, settings

    @contextlib.contextmanager
    def _error_boundary(self, endpoint: str):
        """Client mistakes and a full queue pass through with their message; anything else is logged with
        its stack here and reaches the client as one line."""
        try:
            yield
        except (RequestError, ServerBusyError, EngineError) as error:
            log.warning("%s: %s: %s", endpoint, type(error).__name__, error)
            raise
        except Exception as error:
            log.exception("%s failed", endpoint)
            raise EngineError(f"internal error while generating: {type(error).__name__}: {error}") from error

    def close(self) -> None:
        if self.openai_server:
            self.openai_server.stop()
        self._call_preparer.shutdown(wait=False, cancel_futures=True)
        self._grammar_compiler.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
        super().close()


def _generation(text: str, event, tokenizer) -> Generation:
    return Generation(text=text, finish_reason=event.finish_reason, prompt_tokens=event.prompt_tokens,
                      completion_tokens=event.completion_tokens, cached_tokens=event.cached_tokens,
                      logprobs=None if event.logprobs is None else [_logprob_entry(e, tokenizer) for e in event.logprobs])


def _logprob_entry(logprob, tokenizer) -> dict:
    """OpenAI's shape of one token's log-probability (token text as the tokenizer decodes it alone)."""
    def token(token_id, value):
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**token(logprob.token_id, logprob.logprob),
            "top_logprobs": [token(token_id, value) for token_id, value in logprob.top]}
