"""The generation engine: token ids and settings in, text deltas out. No Jina in here.

One scheduler thread owns the model. A call (one request, or the many prompts of a ``/chat`` request)
is admitted whole into a bounded queue; ``scheduler.WaitingCalls`` decides which waiting prompt takes
the next free row, and may have a row preempted (recomputed later) so that no call waits for another to
finish. Prompts are prefilled in chunks (so a long prompt delays the running answers by one chunk at
most; short prompts share one forward pass), then join a running batch that shares one forward pass per
decode step (continuous batching). Each row keeps its own sampling settings, logits processors, random
generator, stop conditions and detokenizer. Keys and values live in ``kv_cache.py``: the running batch's
storage is preallocated and written in place, sized by a memory plan, and whole blocks of finished and
prefilled tokens stay in a prefix cache that later prompts start from. Prompts that arrive together and
share blocks compute them once: a prompt waits while an earlier one computes the blocks it needs next.
Cancelled requests are dropped before the next step.
"""

import asyncio
import inspect
import itertools
import logging
import os
import threading
import time
from array import array
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from .detok import IncrementalDetokenizer
from .kv_cache import BatchKV, PrefixCache, StagedKV, plan_kv_memory, probe_layer_shapes
from .sampling import SamplingSettings, ServerBusyError, build_logits_processors, to_generation_config
from .scheduler import Call, WaitingCalls

log = logging.getLogger("jina_llm_stream.engine")

# A prefill forward pass costs about as much as ~50 prompt tokens on its own (it reads every weight). A
# cached prefix shorter than this is cheaper to recompute in the pass that prefills short prompts together
# than to reuse in a pass of its own (a batch job's prompts often share just the chat template's first block).
MIN_REUSED_TOKENS = 64


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    max_queue: int = 4096  # prompts waiting for a row, over all calls
    prefill_chunk: int = 256
    request_timeout: float = 300.0
    kv_cache_memory: object = None  # kv_cache.parse_memory_size's result: None (auto), a fraction or bytes
    prefix_caching: bool = True
    max_context: int | None = None  # longest prompt + answer a row must hold; None: the model's context
    block_size: int = 16


@dataclass
class TokenEvent:
    """A piece of the answer. ``finish_reason`` is set on the last one: stop, length or time_limit."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # With settings.logprobs: one TokenLogprob per token since the previous event (not EOS).
    logprobs: list | None = None


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the scores it was chosen from, and the most likely ones."""

    token_id: int
    logprob: float
    top: list  # [(token_id, logprob)], most likely first, settings.top_logprobs of them


class EngineError(RuntimeError):
    """The model failed while working on this request (e.g. out of memory); other requests go on."""


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine."""

    request_id: int
    prompt_ids: array  # int32: thousands of prompts may wait at once
    settings: SamplingSettings
    emit: object
    detok: IncrementalDetokenizer
    processors: object = None
    do_sample: bool = False
    generator: torch.Generator | None = None
    ids_buffer: torch.Tensor | None = None
    cache: object = None
    prefilled: int = 0
    cached_tokens: int = 0
    block_hashes: tuple = ()  # (context length, hashes of its whole blocks), for sharing blocks being computed
    generated: list = field(default_factory=list)
    call: Call | None = None
    deadline: float | None = None  # request_timeout after it first got a row
    prepared: bool = False
    active: bool = False  # holds a row (prefilling or running)
    preemptions: int = 0
    cancelled: bool = False
    finished: bool = False
    label: str = ""
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    chosen_logprob: TokenLogprob | None = None  # of the token being accepted
    pending_logprobs: list = field(default_factory=list)  # accepted since the last event

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    def context_ids(self) -> list:
        """The tokens whose KV cache the row needs before its next step: the prompt, and after a
        preemption also the answer so far except its last token (the next step's input)."""
        return list(self.prompt_ids) + self.generated[:-1]


class RequestHandle:
    """What ``submit_call`` returns: lets the caller cancel its requests from any thread."""

    def __init__(self, engine: "Engine", call: Call):
        self._engine, self._call = engine, call

    def cancel(self) -> None:
        self._engine._cancel(self._call.sequences)


class Engine:
    """Continuous-batching decode loop over a transformers causal LM."""

    def __init__(self, model, tokenizer, eos_token_ids, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = next(model.parameters()).device
        self._ids = itertools.count(1)
        self._waiting = WaitingCalls(config.max_queue)
        self._prefilling: list[_Sequence] = []
        self._rows: list[_Sequence] = []  # rows of the running batch, in the order of self._batch's rows
        self._positions = None  # [rows] position id of each row's next token
        self._next_tokens = None  # [rows, 1] token each row feeds into the next step
        self._lock = threading.Condition()
        self._running = False
        self._thread = None
        parameters = inspect.signature(model.forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in parameters
        # transformers 5 renamed the cache argument; remote-code models may still use the old name.
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._set_up_kv_storage()
        self.steps = 0  # decode steps run, for tests and metrics
        self.preemptions = 0
        self.metrics = None  # optional observer: first_token(s), next_token(s), finished(label, outcome, p, n)

    def _set_up_kv_storage(self) -> None:
        """Size the running batch's rows and the prefix cache from the budget; both are allocated now."""
        config = self.config
        self._shapes = shapes = probe_layer_shapes(self.model, self.device, self._cache_kwarg)
        self.plan = plan_kv_memory(config.kv_cache_memory, sum(s.bytes_per_token for s in shapes),
                                   config.max_batch_size, config.max_context or _model_context(self.model),
                                   self.device, config.block_size, config.prefix_caching)
        log.info("%s", self.plan.describe())
        if config.prefix_caching and not self.plan.prefix_blocks:
            log.warning("prefix caching is on but the KV cache budget leaves no room for it: no prefix is reused")
        self.max_context = self.plan.max_context  # callers refuse a longer prompt + max_new_tokens
        self.max_rows = self.plan.rows
        self._batch = BatchKV(shapes, self.plan.rows, self.plan.columns, self.device)
        self._prefix = (PrefixCache(shapes, self.plan.prefix_blocks, config.block_size, self.device)
                        if self.plan.prefix_blocks else None)

    # ---- public API -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread:
            self._thread.join(timeout=30)

    def submit(self, prompt_ids, settings: SamplingSettings, emit, label: str = "") -> RequestHandle:
        """Queue one request; ``emit`` is called from the engine thread with each TokenEvent or an
        exception. ``label`` (e.g. the endpoint) goes into the request's log line."""
        return self.submit_call([(prompt_ids, settings, emit)], label)

    def submit_call(self, requests, label: str = "") -> RequestHandle:
        """Queue the (prompt_ids, settings, emit) requests of one call, all or none: ServerBusyError when
        they would pass ``max_queue`` waiting prompts."""
        sequences = [
            _Sequence(request_id=next(self._ids), prompt_ids=array("i", prompt_ids), settings=settings, emit=emit,
                      detok=IncrementalDetokenizer(self.tokenizer, settings.stop), label=label)
            for prompt_ids, settings, emit in requests
        ]
        call = Call(sequences)
        call.deadline = time.monotonic() + self.config.request_timeout
        for sequence in sequences:
            sequence.call = call
        with self._lock:
            if not self._waiting.fits(len(sequences)):
                raise ServerBusyError(
                    f"server busy: {len(self._waiting)} prompts are already waiting and this call brings "
                    f"{len(sequences)} (max_queue={self.config.max_queue}); retry later"
                )
            self._waiting.add(call)
            self._lock.notify_all()
        return RequestHandle(self, call)

    async def complete(self, requests, label: str = "") -> list:
        """Whole answers to the (prompt_ids, settings) requests of one call, in order: a list of
        (text, last TokenEvent). The first failure fails the call and cancels the rest; so does
        cancelling the awaiting task. Events are gathered on the engine thread, so the caller's loop
        wakes once per answer, not once per token."""
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pieces = [[] for _ in requests]
        logprobs = [[] for _ in requests]
        finals = [None] * len(requests)
        remaining = [len(requests)]

        def settle(error=None):
            if not done.done():
                done.set_exception(error) if error else done.set_result(None)

        def collector(index):
            def emit(event):
                if isinstance(event, BaseException):
                    loop.call_soon_threadsafe(settle, event)
                    return
                pieces[index].append(event.text)
                if event.logprobs:
                    logprobs[index].extend(event.logprobs)
                if event.finish_reason:
                    finals[index] = replace(event, logprobs=logprobs[index]) if event.logprobs is not None else event
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        loop.call_soon_threadsafe(settle)
            return emit

        handle = self.submit_call([(ids, settings, collector(i)) for i, (ids, settings) in enumerate(requests)],
                                  label)
        try:
            await done
        finally:
            handle.cancel()  # no-op for finished requests; the rest of a failed or abandoned call stop here
        return [("".join(texts), final) for texts, final in zip(pieces, finals)]

    async def stream(self, prompt_ids, settings: SamplingSettings, label: str = ""):
        """Async iterator of TokenEvents; closing it (or cancelling its task) cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the caller's loop is gone: nobody is listening any more
                handle.cancel()

        handle = self.submit(prompt_ids, settings, emit, label)
        # A consumer cancelled while this generator waits at `yield` (e.g. the server sending a piece to a
        # client that just left) never resumes it; the `finally` below would then wait for garbage
        # collection. Cancelling when the consuming task ends does not wait.
        task = asyncio.current_task()
        stop_with_task = lambda _task: handle.cancel()  # noqa: E731
        if task is not None:
            task.add_done_callback(stop_with_task)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason:
                    return
        finally:
            handle.cancel()
            if task is not None:
                task.remove_done_callback(stop_with_task)

    def load(self) -> dict:
        """Queue depth and batch size right now."""
        return {"waiting": len(self._waiting), "prefilling": len(self._prefilling), "running": len(self._rows)}

    def kv_copies(self) -> dict:  # what the running batch's KV cache copied (BatchKV.copy_stats), for metrics
        return self._batch.copy_stats()

    def _cancel(self, sequences) -> None:
        """Cancel from any thread: waiting sequences leave the queue now (a cancelled call leaves nothing
        behind), active ones are dropped by the engine before its next step."""
        with self._lock:
            for sequence in sequences:
                if not sequence.finished:
                    sequence.cancelled = True
            for sequence in self._waiting.remove_waiting(lambda s: s.cancelled):
                self._retire_cancelled(sequence)
            self._lock.notify_all()

    # ---- scheduler loop ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _loop(self) -> None:
        with torch.inference_mode():
            self._serve_forever()
        self._fail_everything(EngineError("the server is shutting down"))

    def _serve_forever(self) -> None:
        while True:
            with self._lock:
                while self._running and not (self._waiting or self._prefilling or self._rows):
                    self._lock.wait()
                if not self._running:
                    break
            self._drop_cancelled_and_expired()
            self._admit()
            if self._prefilling:
                self._prefill_some()
            if self._rows:
                self._decode_guarded()

    def _admit(self) -> None:
        with self._lock:
            while True:
                if len(self._rows) + len(self._prefilling) >= self.max_rows:
                    if not self._preempt_for_a_call_without_rows():
                        return
                sequence = self._waiting.pop_next()
                if sequence is None:
                    return
                sequence.active = True
                now = time.monotonic()
                # request_timeout bounds each prompt from its first row on; its call's waiting prompts
                # expire only when the call got no new row for that long (a long job is not cut off).
                sequence.deadline = sequence.deadline or now + self.config.request_timeout
                sequence.call.deadline = now + self.config.request_timeout
                if not sequence.prepared:
                    try:
                        self._prepare(sequence)
                    except Exception as error:  # noqa: BLE001 - a bad setting must fail this request only
                        self._finish_with_error(sequence, error)
                        continue
                self._prefilling.append(sequence)

    def _preempt_for_a_call_without_rows(self) -> bool:
        """Every row is taken and a call has none: the call with the most rows gives one up. Its cheapest
        sequence to redo (fewest tokens computed) waits again at the front of its call and is recomputed
        when it gets a row back; its answer so far, sampler state and detokenizer are kept."""
        call = self._waiting.call_to_preempt()
        if call is None:
            return False
        prefilling = [s for s in self._prefilling if s.call is call]
        if prefilling:
            victim = min(prefilling, key=lambda s: s.prefilled)
            self._prefilling.remove(victim)
        else:
            index = min((i for i, s in enumerate(self._rows) if s.call is call),
                        key=lambda i: len(self._rows[i].prompt_ids) + len(self._rows[i].generated))
            victim = self._rows[index]
            self._remove_rows([index])
        self._drop_staged(victim)
        victim.prefilled, victim.active = 0, False
        victim.preemptions += 1
        self.preemptions += 1
        self._waiting.requeue(victim)
        return True

    def _prepare(self, sequence: _Sequence) -> None:
        config = to_generation_config(sequence.settings, self.model.generation_config)
        prompt_length = len(sequence.prompt_ids)
        if prompt_length + sequence.max_new_tokens > self.max_context:
            raise ValueError(f"prompt_tokens + max_new_tokens = {prompt_length + sequence.max_new_tokens} does not fit "
                             f"the KV cache's rows of {self.max_context} tokens")
        sequence.processors = build_logits_processors(self.model, config, sequence.settings, prompt_length,
                                                      self.device)
        sequence.do_sample = bool(config.do_sample)
        if sequence.do_sample:
            sequence.generator = torch.Generator(device=self.device)
            if sequence.settings.seed is not None:
                sequence.generator.manual_seed(sequence.settings.seed)
            else:
                sequence.generator.seed()
        if len(sequence.processors):
            sequence.ids_buffer = torch.tensor([list(sequence.prompt_ids) + [0] * sequence.max_new_tokens],
                                               dtype=torch.long, device=self.device)
        sequence.prepared = True

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._waiting.remove_waiting(lambda sequence: self._retire_if_done(sequence, now))
        self._prefilling = [s for s in self._prefilling if not self._retire_if_done(s, now)]
        leaving = [index for index, s in enumerate(self._rows) if self._retire_if_done(s, now)]
        self._remove_rows(leaving)

    def _retire_if_done(self, sequence: _Sequence, now: float) -> bool:
        if sequence.cancelled:
            self._retire_cancelled(sequence)
            return True
        if now > (sequence.deadline or sequence.call.deadline):
            self._finish(sequence, "time_limit")
            return True
        return False

    # ---- prefill ----------------------------------------------------------------------------------
    def _prefill_some(self) -> None:
        """Prefill at most ``prefill_chunk`` prompt tokens this round, oldest requests first. A prompt first
        takes what the prefix cache holds of it, and waits while an earlier prompt computes the block it
        needs next. Prompts that fit whole in what is left of the round share one forward pass (short prompts
        of a batch job would otherwise cost a forward pass each); longer ones advance by a chunk on their own."""
        budget = self.config.prefill_chunk
        claimed = self._claimed_blocks()
        together = []
        for sequence in list(self._prefilling):
            if budget <= 0:
                break
            context = sequence.context_ids()
            self._reuse_cached_prefix(sequence, context)
            if self._waits_for_a_shared_block(sequence, context, claimed):
                continue
            if sequence.prefilled == 0 and len(context) <= budget:
                together.append((sequence, context))
                budget -= len(context)
                continue
            start = sequence.prefilled
            end = min(len(context), start + budget)
            aligned = end - end % self.config.block_size  # whole blocks can be shared while it goes on
            if end < len(context) and aligned > start:
                end = aligned
            budget -= end - start
            chunk = context[start:end]
            logits = self._guarded_prefill([sequence], lambda: self._forward_prefill(sequence, chunk, start))
            if logits is not None:
                sequence.prefilled = end
                self._remember_prefill(sequence, context)
                if end == len(context):
                    self._prefilled([sequence], logits)
        if together:
            sequences = [sequence for sequence, _ in together]
            logits = self._guarded_prefill(sequences, lambda: self._forward_prefill_together(together))
            if logits is not None:
                for sequence, context in together:
                    self._remember_prefill(sequence, context)
                self._prefilled(sequences, logits)

    # ---- the prefix cache -------------------------------------------------------------------------
    def _reuse_cached_prefix(self, sequence: _Sequence, context: list) -> None:
        """Extend the sequence's own cache with the cached blocks that follow what it has (at least the last
        context token is left to compute: its logits choose the first new token)."""
        size = self.config.block_size
        if self._prefix is None or sequence.prefilled % size:
            return
        path = self._prefix.match(context, len(context) - 1)
        have = sequence.prefilled // size
        if len(path) <= have or (have == 0 and len(path) * size < MIN_REUSED_TOKENS):
            return
        if sequence.cache is None:
            sequence.cache = self._batch.stage()
        self._prefix.read_into(path, have, sequence.cache)
        if not sequence.generated:  # a resumed (preempted) sequence already reported its cached tokens
            sequence.cached_tokens += (len(path) - have) * size
        sequence.prefilled = len(path) * size

    def _remember_prefill(self, sequence: _Sequence, context: list) -> None:
        if self._prefix is not None:
            self._prefix.insert(context, sequence.prefilled, sequence.cache.tokens)

    def _remember_rows(self, indices) -> None:
        """Rows about to leave the batch: keep their whole blocks (prompt and answer) for later prompts."""
        if self._prefix is None:
            return
        for index in indices:
            sequence, length = self._rows[index], self._batch.lengths[index]
            tokens = (list(sequence.prompt_ids) + sequence.generated)[:length]
            self._prefix.insert(tokens, length, lambda a, b, row=index: self._batch.row_kv(row, a, b))

    def _block_hashes(self, sequence: _Sequence, context: list) -> list:
        if not sequence.block_hashes or sequence.block_hashes[0] != len(context):
            size, hashes, running = self.config.block_size, [], 0
            for start in range(0, len(context) - size + 1, size):
                running = hash((running, tuple(context[start:start + size])))
                hashes.append(running)
            sequence.block_hashes = (len(context), hashes)
        return sequence.block_hashes[1]

    def _claimed_blocks(self) -> dict:
        """Each block some prefilling prompt has yet to compute -> the first prompt (oldest) computing it."""
        claimed = {}
        if self._prefix is None:
            return claimed
        for sequence in self._prefilling:
            hashes = self._block_hashes(sequence, sequence.context_ids())
            for block_hash in hashes[sequence.prefilled // self.config.block_size:]:
                claimed.setdefault(block_hash, sequence)
        return claimed

    def _waits_for_a_shared_block(self, sequence: _Sequence, context: list, claimed: dict) -> bool:
        """The next block of this prompt is being computed by an earlier prompt: take it from the cache later
        instead of computing it twice."""
        if self._prefix is None or sequence.prefilled % self.config.block_size:
            return False
        size = self.config.block_size
        hashes = self._block_hashes(sequence, context)
        index = sequence.prefilled // size
        shared = 0  # blocks from here on that an earlier prompt is computing
        while index + shared < len(hashes) and (index + shared + 1) * size < len(context) \
                and claimed.get(hashes[index + shared], sequence) is not sequence:
            shared += 1  # (the block holding the last token is computed by each prompt: its logits are needed)
        return shared > 0 and (index + shared) * size >= MIN_REUSED_TOKENS

    def _guarded_prefill(self, sequences, forward):
        """Run ``forward``; if it fails (e.g. out of memory), fail these requests only and keep serving."""
        try:
            for sequence in sequences:
                if sequence.cache is None:
                    sequence.cache = self._batch.stage()
            return forward()
        except Exception as error:  # noqa: BLE001
            log.exception("prefill failed for request(s) %s", [s.request_id for s in sequences])
            for sequence in sequences:
                self._prefilling.remove(sequence)
                self._finish_with_error(sequence, EngineError(f"generation failed: {error}"))
            return None

    def _prefilled(self, sequences, logits: torch.Tensor) -> None:
        """These sequences' caches are complete: choose their first tokens and let them join the batch."""
        for sequence in sequences:
            self._prefilling.remove(sequence)
        resumed = [s for s in sequences if s.generated]  # after a preemption: the next input is known already
        for sequence in resumed:
            self._join_batch(sequence, sequence.generated[-1])
        fresh = [(row, s) for row, s in enumerate(sequences) if not s.generated]
        if not fresh:
            return
        rows = torch.tensor([row for row, _ in fresh], device=logits.device)
        tokens = self._choose_tokens([s for _, s in fresh], logits[rows, -1, :])
        for (_, sequence), token in zip(fresh, tokens):
            if self._accept_token(sequence, token):
                self._join_batch(sequence, token)

    def _forward_prefill(self, sequence: _Sequence, token_ids: list, start: int) -> torch.Tensor:
        end = start + len(token_ids)
        logits = self._prefill_logits(torch.tensor([token_ids], dtype=torch.long, device=self.device),
                                      torch.ones((1, end), dtype=torch.long, device=self.device),
                                      torch.arange(start, end, device=self.device).unsqueeze(0), sequence.cache)
        sequence.cache.filled = end
        return logits

    def _forward_prefill_together(self, together) -> torch.Tensor:
        """Whole prompts of several sequences in one left-padded forward pass (a temporary cache of at most
        ``prefill_chunk`` tokens); each sequence's tokens, without the padding, then go to its staged row."""
        width = max(len(context) for _, context in together)
        pads = [width - len(context) for _, context in together]
        input_ids = torch.tensor([[0] * pad + context for pad, (_, context) in zip(pads, together)],
                                 dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads], dtype=torch.long, device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # Without a config every layer keeps every token (a sliding-window layer would drop the old ones): the
        # batch and the prefix cache need them all.
        cache = DynamicCache()
        logits = self._prefill_logits(input_ids, mask, positions, cache)
        for row, (pad, (sequence, context)) in enumerate(zip(pads, together)):
            sequence.cache.write([(layer.keys[row, :, pad:], layer.values[row, :, pad:]) for layer in cache.layers], 0)
            sequence.prefilled = len(context)
        return logits

    def _prefill_logits(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One prefill forward pass that extends ``cache`` in place; logits of the last position only."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
        kwargs[self._cache_kwarg] = cache
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits

    # ---- the running batch --------------------------------------------------------------------------
    def _join_batch(self, sequence: _Sequence, next_token: int) -> None:
        length = sequence.prefilled
        self._batch.join(sequence.cache, length)
        token = torch.tensor([[next_token]], dtype=torch.long, device=self.device)
        position = torch.tensor([length], dtype=torch.long, device=self.device)
        if not self._rows:
            self._positions, self._next_tokens = position, token
        else:
            self._positions = torch.cat([self._positions, position])
            self._next_tokens = torch.cat([self._next_tokens, token])
        sequence.cache = None
        self._rows.append(sequence)

    def _remove_rows(self, indices) -> None:
        if not indices:
            return
        self._remember_rows(indices)
        order = self._batch.remove_rows(indices)
        self._rows = [self._rows[i] for i in order]
        if not order:
            self._positions = self._next_tokens = None
            return
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self._positions, self._next_tokens = self._positions[index], self._next_tokens[index]

    def _decode_guarded(self) -> None:
        try:
            self._decode_step()
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: fail this batch, keep serving
            log.exception("decode step failed; failing the %d requests of this batch", len(self._rows))
            for sequence in self._rows:
                self._finish_with_error(sequence, EngineError(f"generation failed: {error}"))
            self._batch.remove_rows(range(len(self._rows)))
            self._rows = []
            self._positions = self._next_tokens = None

    def _decode_step(self) -> None:
        mask = self._batch.start_step(1)
        output = self.model(
            input_ids=self._next_tokens,
            attention_mask=mask,
            position_ids=self._positions.unsqueeze(1),
            use_cache=True,
            **{self._cache_kwarg: self._batch},  # written in place
        )
        self._batch.end_step(1)
        self._positions = self._positions + 1
        self.steps += 1
        tokens = self._choose_tokens(self._rows, output.logits[:, -1, :])
        self._next_tokens = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        leaving = [i for i, (s, t) in enumerate(zip(self._rows, tokens)) if not self._accept_token(s, t)]
        self._remove_rows(leaving)

    def _choose_tokens(self, sequences, logits: torch.Tensor) -> list:
        """Next token of each row: its grammar's mask (before top-k/top-p, which would otherwise keep only
        tokens the grammar forbids), the row's own processors, then greedy or its own seeded sampling."""
        scores = logits.float()
        for row, sequence in enumerate(sequences):
            if sequence.settings.grammar is not None:
                sequence.settings.grammar.mask(scores[row])
            if sequence.ids_buffer is not None:
                length = len(sequence.prompt_ids) + len(sequence.generated)
                row_scores = scores[row:row + 1]
                # Called one by one: LogitsProcessorList inspects each one's signature on every call.
                for processor in sequence.processors:
                    row_scores = processor(sequence.ids_buffer[:, :length], row_scores)
                scores[row:row + 1] = row_scores
            if sequence.settings.grammar is not None:
                sequence.settings.grammar.keep_an_end(scores[row])
        chosen = scores.argmax(dim=-1)
        for row, sequence in enumerate(sequences):
            if sequence.do_sample:
                probs = torch.softmax(scores[row], dim=-1)
                chosen[row] = torch.multinomial(probs, 1, generator=sequence.generator)[0]
        tokens = chosen.tolist()
        for row, sequence in enumerate(sequences):
            if sequence.settings.logprobs:
                sequence.chosen_logprob = _logprob_of(scores[row], tokens[row], sequence.settings.top_logprobs)
        return tokens

    # ---- per-token bookkeeping --------------------------------------------------------------------
    def _accept_token(self, sequence: _Sequence, token: int) -> bool:
        """Record ``token``, emit the text it completes; False when the request is finished."""
        if token in self.eos_token_ids:
            self._finish(sequence, "stop")
            return False
        grammar_goes_on = True
        if sequence.settings.grammar is not None:
            try:
                grammar_goes_on = sequence.settings.grammar.advance(token)
            except RuntimeError as error:  # e.g. the grammar's work bound ran out: this request fails alone
                self._finish_with_error(sequence, EngineError(f"response_format: {error}"))
                return False
        sequence.generated.append(token)
        if sequence.chosen_logprob is not None:
            sequence.pending_logprobs.append(sequence.chosen_logprob)
        self._timestamp(sequence)
        if sequence.ids_buffer is not None:
            sequence.ids_buffer[0, len(sequence.prompt_ids) + len(sequence.generated) - 1] = token
        text = sequence.detok.push(token)
        if sequence.detok.stopped or not grammar_goes_on:  # a complete grammar ends the answer
            self._finish(sequence, "stop", text)
            return False
        if len(sequence.generated) >= sequence.max_new_tokens:
            self._finish(sequence, "length", text)
            return False
        if text:
            self._emit(sequence, TokenEvent(text, None, len(sequence.prompt_ids), len(sequence.generated),
                                            sequence.cached_tokens, self._take_logprobs(sequence)))
        return True

    @staticmethod
    def _take_logprobs(sequence: _Sequence):
        if not sequence.settings.logprobs:
            return None
        taken, sequence.pending_logprobs = sequence.pending_logprobs, []
        return taken

    def _timestamp(self, sequence: _Sequence) -> None:
        now = time.monotonic()
        if self.metrics:
            if sequence.first_token_at is None:
                self.metrics.first_token(now - sequence.submitted_at)
            else:
                self.metrics.next_token(now - sequence.last_token_at)
        if sequence.first_token_at is None:
            sequence.first_token_at = now
        sequence.last_token_at = now

    def _finish(self, sequence: _Sequence, reason: str, text: str = "") -> None:
        text += sequence.detok.flush()
        self._log_outcome(sequence, reason)
        self._emit(sequence, TokenEvent(text, reason, len(sequence.prompt_ids), len(sequence.generated),
                                        sequence.cached_tokens, self._take_logprobs(sequence)))

    def _finish_with_error(self, sequence: _Sequence, error: BaseException) -> None:
        self._log_outcome(sequence, f"error:{type(error).__name__}")
        self._emit(sequence, error)

    def _retire_cancelled(self, sequence: _Sequence) -> None:
        self._log_outcome(sequence, "cancelled")

    def _drop_staged(self, sequence: _Sequence) -> None:
        """A prompt leaving before it joined the batch frees the row it was prefilled in."""
        if isinstance(sequence.cache, StagedKV):
            self._batch.unstage(sequence.cache)
        sequence.cache = None

    def _log_outcome(self, sequence: _Sequence, outcome: str) -> None:
        """One line per request; never the prompt text."""
        sequence.finished = True
        self._drop_staged(sequence)
        if sequence.active:
            sequence.active = False
            with self._lock:
                self._waiting.leave_engine(sequence)
        now = time.monotonic()
        ttft = (sequence.first_token_at - sequence.submitted_at) * 1000 if sequence.first_token_at else float("nan")
        decode_s = now - sequence.first_token_at if sequence.first_token_at else 0.0
        rate = (len(sequence.generated) - 1) / decode_s if decode_s > 0 and len(sequence.generated) > 1 else 0.0
        preempted = f" preempted={sequence.preemptions}" if sequence.preemptions else ""
        log.info("pid=%d request=%s endpoint=%s prompt_tokens=%d cached_tokens=%d new_tokens=%d ttft_ms=%.0f "
                 "tokens_per_s=%.1f finish=%s%s", os.getpid(), sequence.request_id, sequence.label or "-",
                 len(sequence.prompt_ids), sequence.cached_tokens, len(sequence.generated), ttft, rate, outcome,
                 preempted)
        if self.metrics:
            self.metrics.finished(sequence.label, outcome, len(sequence.prompt_ids), len(sequence.generated),
                                  sequence.cached_tokens)

    def _emit(self, sequence: _Sequence, event) -> None:
        try:
            sequence.emit(event)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
            log.exception("could not deliver an event for request %s", sequence.request_id)
            sequence.cancelled = True

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            pending = self._waiting.remove_waiting(lambda sequence: True) + self._prefilling + self._rows
        self._prefilling, self._rows = [], []
        for sequence in pending:
            if not sequence.finished:
                self._finish_with_error(sequence, error)


def _logprob_of(scores: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-softmax of the scores the token was chosen from (after the row's mask and processors)."""
    logprobs = torch.log_softmax(scores, dim=-1)
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(token, float(logprobs[token]),
                        list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [])


def _model_context(model) -> int:
    """The model's context length (capped: rows are reserved at full length), when the caller gives none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config.get_text_config(decoder=True), name, None)
        if isinstance(value, int) and value > 0:
            return min(value, 8192)
    return 8192
