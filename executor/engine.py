"""The engine: token ids and settings in, text deltas out. No Jina in here.

One thread owns the model and runs rounds; each round carries out the decisions of the rooms around it:

    submit ─> Scheduler ──(Admit / Preempt / PrefillChunk / PrefillTogether)──> Engine round
                 │                                                               │
                 └── KVManager (prefix reuse, shared blocks)        ModelRunner (forward passes,
                                                                    the running batch's rows)
                                                                                 │ logits
                                                 sampling.choose_tokens <────────┘
                                                                                 │ tokens
                                                      OutputProcessor (accept, stop, emit, release)

A call (one request, or the many prompts of a ``/chat`` request) is queued whole (``scheduler.py`` says
who gets the next free row, and may have a row preempted so that no call waits for another to finish).
Prompts are prefilled in chunks (a long prompt delays the running answers by one chunk at most; short
prompts share one forward pass), starting from what the prefix cache holds (``kv_manager.py``), then join
the running batch, whose rows share one forward pass per decode step (continuous batching,
``model_runner.py``, over ``kv_cache.py``'s in-place storage). Each row keeps its own sampling settings,
processors and random generator (``sampling.py``), stop conditions and detokenizer (``output.py``).
Cancelled requests are dropped before the next step. The engine's own job: the thread, the order of a
round, and the error guards (a failed forward pass fails its requests, never the engine).
"""

import asyncio
import itertools
import logging
import threading
import time
from array import array
from dataclasses import dataclass, replace

import torch

from .detok import IncrementalDetokenizer
from .errors import EngineError
from .kv_cache import PoolFull
from .kv_manager import KVManager
from .model import context_length, sliding_window
from .model_runner import ModelRunner, cache_kwarg
from .output import OutputProcessor
from .sampling import RowSampler, choose_tokens
from .scheduler import Call, Preempt, PrefillChunk, Scheduler
from .sequence import Sequence
from .speculation import Speculator, verify_row

log = logging.getLogger("jina_llm_stream.engine")

# The KV pool holds at least one row this long (kv_cache.plan_kv_memory): without a max_context from the
# caller, a model's context is capped here.
DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16  # the most rows (sequences) decoded together; the memory plan may allow fewer
    max_queue: int = 4096  # prompts waiting for a row, over all calls
    prefill_chunk: int = 256
    request_timeout: float = 300.0
    kv_cache_memory: object = None  # kv_cache.parse_memory_size's result: None (auto), a fraction or bytes
    prefix_caching: bool = True
    max_context: int | None = None  # longest prompt + answer a row must hold; None: the model's context
    block_size: int = 16
    speculate: int = 0  # most draft tokens a row verifies per step (speculation.py); 0: no speculation


class RequestHandle:
    """What ``submit_call`` returns: lets the caller cancel its requests from any thread."""

    def __init__(self, engine: "Engine", call: Call):
        self._engine, self._call = engine, call

    def cancel(self) -> None:
        self._engine._cancel(self._call.sequences)


class AsyncCalls:
    """The asyncio side of the engine's API, over ``submit_call``: whole answers and streams of pieces."""

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

    async def stream(self, prompt_ids, settings, label: str = ""):
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


class Engine(AsyncCalls):
    """Continuous-batching generation over a transformers causal LM: the thread and the order of a round."""

    def __init__(self, model, tokenizer, eos_token_ids, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device
        self._ids = itertools.count(1)
        self._admissions = itertools.count(1)  # the order rows were given in: the newest is preempted first
        max_context = config.max_context or min(context_length(model) or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
        self.kv = KVManager(model, self.device, cache_kwarg(model), config.kv_cache_memory, config.max_batch_size,
                            max_context, config.block_size, config.prefix_caching)
        self.plan = self.kv.plan
        self.max_context = self.plan.max_context  # callers refuse a longer prompt + max_new_tokens
        self.max_rows = self.plan.rows  # max_batch_size, or fewer when the memory plan holds fewer
        self.scheduler = Scheduler(config.max_queue, self.max_rows, config.prefill_chunk, config.block_size,
                                   config.request_timeout)
        self.runner = ModelRunner(model, self.kv, self.device, context_length(model))
        self.output = OutputProcessor(eos_token_ids, self._release)
        self.speculator = self._speculator(config.speculate)
        self._running = False
        self._thread = None

    @property
    def metrics(self):
        """Optional observer (metrics.EngineMetrics), set by the Executor when monitoring is on."""
        return self.output.metrics

    @metrics.setter
    def metrics(self, observer) -> None:
        self.output.metrics = observer

    @property
    def steps(self) -> int:
        """Decode steps run, for tests and metrics."""
        return self.runner.steps

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    # ---- public API -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self.scheduler.lock:
            self._running = False
            self.scheduler.lock.notify_all()
        if self._thread:
            self._thread.join(timeout=30)

    def submit(self, prompt_ids, settings, emit, label: str = "") -> RequestHandle:
        """Queue one request; ``emit`` is called from the engine thread with each TokenEvent or an
        exception. ``label`` (e.g. the endpoint) goes into the request's log line."""
        return self.submit_call([(prompt_ids, settings, emit)], label)

    def submit_call(self, requests, label: str = "") -> RequestHandle:
        """Queue the (prompt_ids, settings, emit) requests of one call, all or none: ServerBusyError when
        they would pass ``max_queue`` waiting prompts."""
        sequences = [Sequence(request_id=next(self._ids), prompt_ids=array("i", prompt_ids), settings=settings,
                              emit=emit, detok=IncrementalDetokenizer(self.tokenizer, settings.stop), label=label)
                     for prompt_ids, settings, emit in requests]
        call = Call(sequences)
        call.deadline = time.monotonic() + self.config.request_timeout
        for sequence in sequences:
            sequence.call = call
        self.scheduler.add(call)
        return RequestHandle(self, call)

    def load(self) -> dict:
        """Queue depth and batch size right now."""
        return {"waiting": len(self.scheduler.waiting), "prefilling": len(self.scheduler.prefilling),
                "running": len(self.runner.running)}

    def kv_usage(self) -> dict:
        """Token slots of the KV pool by holder (plain integers: safe from another thread)."""
        pool, prefix = self.kv.pool, self.kv.prefix
        batch = pool.batch_blocks * pool.block_size
        cached = len(prefix) * pool.block_size if prefix is not None else 0
        return {"batch": batch, "prefix_cache": cached, "free": pool.tokens - batch - cached}

    def kv_resident_bytes(self) -> int:
        """Bytes of the KV pool in memory now (kv_pool.KVPool.resident_bytes), for metrics and leak checks."""
        return self.kv.pool.resident_bytes()

    def kv_copies(self) -> dict:
        """What the running batch's KV storage copied (BatchKV.copy_stats), for metrics."""
        return self.kv.batch.copy_stats()

    def _cancel(self, sequences) -> None:
        """Cancel from any thread: waiting sequences leave the queue now (a cancelled call leaves nothing
        behind), active ones are dropped by the engine before its next step."""
        with self.scheduler.lock:
            for sequence in self.scheduler.cancel(sequences):
                self.output.end(sequence, "cancelled")

    def _release(self, sequence) -> None:
        """The output's release hook, once per request as it ends: its staged row and its place go back."""
        self.kv.release(sequence)
        if sequence.active:
            self.scheduler.leave_engine(sequence)

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            self._serve_forever()
        for sequence in self.scheduler.take_everything(self.runner.running):
            if not sequence.finished:
                self.output.fail(sequence, EngineError("the server is shutting down"))
        self.runner.running = []

    def _serve_forever(self) -> None:
        scheduler = self.scheduler
        while True:
            with scheduler.lock:
                while self._running and not (scheduler.waiting or scheduler.prefilling or self.runner.running):
                    scheduler.lock.wait()
                if not self._running:
                    break
            self._drop_cancelled_and_expired()
            self._admit()
            if scheduler.prefilling:
                self._prefill_round()
            if self.runner.running:
                self._decode_guarded()

    def _drop_cancelled_and_expired(self) -> None:
        done, rows = self.scheduler.take_done(self.runner.running, time.monotonic())
        for sequence, outcome in done:
            self.output.end(sequence, outcome)
        self.runner.remove_rows(rows)

    def _admit(self) -> None:
        with self.scheduler.lock:
            while (decision := self.scheduler.next_admission(self.runner.running, self._room_for)) is not None:
                if isinstance(decision, Preempt):
                    if decision.row is not None:
                        self.runner.remove_rows([decision.row])
                    self.kv.forget_computed(decision.victim)
                    self.scheduler.requeue(decision.victim)
                    if self.metrics is not None:
                        self.metrics.preempted("fairness")
                    continue
                sequence = decision.sequence
                if sequence.sampler is None:  # first admission (a preempted one keeps its sampler)
                    try:
                        sequence.sampler = self._sampler_for(sequence)
                        # A continuation then resumes like a preempted row: its context is prompt + answer
                        self.output.resume(sequence, sequence.settings.continuation or ())
                    except Exception as error:  # noqa: BLE001 - a bad setting must fail this request only
                        self.output.fail(sequence, error)
                        continue
                sequence.admission = next(self._admissions)
                self.scheduler.start_prefill(sequence)
                alone = not (self.runner.running or self.scheduler.waiting or len(self.scheduler.prefilling) > 1)
                try:
                    self.kv.stage(sequence, alone)  # now: the next sequence's room is counted with this one's row
                except RuntimeError as error:  # room_for said it fits: a bug, for this request only
                    self.scheduler.prefill_done(sequence)
                    self.output.fail(sequence, EngineError(f"generation failed: {error}"))

    def _room_for(self, sequence) -> bool:
        """Admission by tokens (kv.room_for); when the pool is short, a long row may read its head from the
        prefix cache first, so that the rows beside it need not be as long (kv.spill_long_row). A sequence
        longer than any row can hold is admitted at once, to be refused with its numbers (_sampler_for): room for
        it would never come, and it would wait in front of the queue for good."""
        if self._tokens_needed(sequence) > self.max_context:
            return True
        newcomer = self.kv.own_need(sequence)
        self.kv.spill_long_row(self.runner.running, newcomer)  # where padding costs more than the read
        while not self.kv.room_for(sequence):
            if not self.kv.spill_long_row(self.runner.running, newcomer, short=True):
                return False
        return True

    def _speculator(self, most: int):
        if most <= 0:
            return None
        window = sliding_window(self.model)
        if window is not None:
            log.info("speculate=%d is off for this model: its sliding-window attention (window %d) counts the "
                     "storage's columns, which a rejected draft would leave masked inside the window", most, window)
            return None
        return Speculator(most, packed=self.runner.packs_tokens)

    @staticmethod
    def _tokens_needed(sequence) -> int:
        """Prompt + the most it may answer: what its row must hold by the end (at most max_context)."""
        return len(sequence.prompt_ids) + sequence.max_new_tokens

    def _sampler_for(self, sequence) -> RowSampler:
        total = self._tokens_needed(sequence)
        if total > self.max_context:
            raise ValueError(f"prompt_tokens + max_new_tokens = {total} does not fit the KV cache's rows of "
                             f"{self.max_context} tokens")
        return RowSampler(self.model, sequence.settings, sequence.prompt_ids, self.device)

    # ---- prefill ----------------------------------------------------------------------------------
    def _prefill_round(self) -> None:
        """Carry out the scheduler's prefill decisions one by one; each prompt's computed blocks are
        remembered before the next prompt looks at the prefix cache."""
        for work in self.scheduler.prefill_work(self.kv):
            if isinstance(work, PrefillChunk):
                sequence, chunk = work.sequence, work.context[work.start:work.end]
                logits = self._guarded_prefill([sequence],
                                               lambda: self.runner.prefill_chunk(sequence, chunk, work.start))
                if logits is None:
                    continue
                sequence.prefilled = work.end
                self.kv.remember_prefill(sequence, work.context)
                if work.end == len(work.context):
                    self._prefilled([sequence], logits)
            else:
                sequences = [sequence for sequence, _ in work.pairs]
                logits = self._guarded_prefill(sequences, lambda: self.runner.prefill_together(work.pairs))
                if logits is None:
                    continue
                for sequence, context in work.pairs:
                    self.kv.remember_prefill(sequence, context)
                self._prefilled(sequences, logits)

    def _guarded_prefill(self, sequences, forward):
        """Run ``forward``; if it fails (e.g. out of memory), fail these requests only and keep serving."""
        try:
            for sequence in sequences:
                self.kv.stage(sequence)
            return forward()
        except Exception as error:  # noqa: BLE001
            log.exception("prefill failed for request(s) %s", [s.request_id for s in sequences])
            for sequence in sequences:
                self.scheduler.prefill_done(sequence)
                self.output.fail(sequence, EngineError(f"generation failed: {error}"))
            return None

    def _prefilled(self, sequences, logits: torch.Tensor) -> None:
        """These sequences' caches are complete: choose their first tokens and let them join the batch."""
        for sequence in sequences:
            self.scheduler.prefill_done(sequence)
        for sequence in sequences:
            if sequence.generated:  # resumed after a preemption: its next input is known already
                self._join(sequence, sequence.generated[-1])
        fresh = [(row, s) for row, s in enumerate(sequences) if not s.generated]
        if not fresh:
            return
        rows = torch.tensor([row for row, _ in fresh], device=logits.device)
        chosen = choose_tokens([s.sampler for _, s in fresh], logits[rows, -1, :])
        for (_, sequence), (token, logprob) in zip(fresh, chosen):
            if self.output.accept(sequence, token, logprob):
                self._join(sequence, token)

    def _join(self, sequence, next_token: int) -> None:
        """The prefilled sequence joins the batch; when the rows grew meanwhile and the pool no longer holds it
        beside them, it waits again (its blocks are in the prefix cache: resuming is cheap)."""
        try:
            self.runner.join(sequence, next_token)
        except PoolFull as error:
            self._preempt(sequence, f"it could not join ({error})")

    # ---- decode -----------------------------------------------------------------------------------
    def _decode_guarded(self) -> None:
        try:
            self._decode_step()
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: fail this batch, keep serving
            # Rows that finished in this step before it failed have ended already (their last event is out).
            unfinished = [sequence for sequence in self.runner.running if not sequence.finished]
            log.exception("decode step failed; failing the %d unfinished requests of this batch", len(unfinished))
            for sequence in unfinished:
                self.output.fail(sequence, EngineError(f"generation failed: {error}"))
            self.runner.drop_all()

    def _decode_step(self) -> None:
        drafts = self.speculator.plan(self.runner.running) if self.speculator else None
        rows = len(self.runner.running)
        self._make_room(1 + max((len(draft) for draft in drafts), default=0) if drafts is not None else 1)
        if len(self.runner.running) != rows:  # rows were preempted: the drafts no longer line up, a plain step
            drafts = None
        if not self.runner.running:
            return
        running = self.runner.running
        started = time.perf_counter()
        if drafts is not None:
            self._verify_step(drafts)
            return
        chosen = choose_tokens([s.sampler for s in running], self.runner.decode())
        self.runner.set_next_tokens([token for token, _ in chosen])
        leaving = [i for i, (s, (token, logprob)) in enumerate(zip(running, chosen))
                   if not self.output.accept(s, token, logprob)]
        if self.speculator:
            self.speculator.plain_step(len(running), time.perf_counter() - started)
        self.runner.remove_rows(leaving)

    def _make_room(self, width: int) -> None:
        """The KV pool must hold this step's ``width`` new tokens per row: while it cannot, a long row reads its
        head from the prefix cache (kv.spill_long_row) or, when none can, the most recently admitted sequence
        (running or prefilling) gives its row back and waits again; it is recomputed later, from the prefix
        cache where its blocks are still there."""
        while not self.kv.batch.room_for_step(width):
            if self.kv.spill_long_row(self.runner.running, short=True):
                continue
            active = self.runner.running + self.scheduler.prefilling
            if len(self.runner.running) <= 1 and not self.scheduler.prefilling:
                raise EngineError("the KV pool cannot hold the next token of the only running request")
            victim = max(active, key=lambda sequence: sequence.admission)
            if victim in self.scheduler.prefilling:
                self.scheduler.prefilling.remove(victim)
            else:
                self.runner.remove_rows([self.runner.running.index(victim)])
            self._preempt(victim, f"the KV pool ({self.kv.pool.tokens} tokens) is short for "
                                  f"{len(self.runner.running)} rows' next step")

    def _preempt(self, victim, why: str) -> None:
        """A sequence out of the batch and the prefilling list gives its row back and waits again."""
        self.kv.forget_computed(victim)
        with self.scheduler.lock:
            self.scheduler.requeue(victim)
        log.info("request %d preempted: %s", victim.request_id, why)
        if self.metrics is not None:
            self.metrics.preempted("kv_pool")

    def _verify_step(self, drafts: list) -> None:
        """A speculative step: every row's next token and draft in one forward pass; each row keeps what its
        own distribution accepts (speculation.verify_row), the rest leaves the storage."""
        running, started = self.runner.running, time.perf_counter()
        logits = self.runner.verify(drafts)
        kept, next_tokens, leaving = [], [], []
        for row, (sequence, draft) in enumerate(zip(running, drafts)):
            accept = lambda token, logprob, s=sequence: self.output.accept(s, token, logprob)  # noqa: E731
            inputs, token, accepted = verify_row(sequence.sampler, logits[row], draft, accept)
            if draft:
                sequence.drafter.record(len(draft), accepted)
            kept.append(inputs)
            next_tokens.append(0 if token is None else token)
            if token is None:
                leaving.append(row)
        self.runner.commit(kept, next_tokens)
        padding = len(running) * self.runner.verify_width - self.runner.verify_tokens
        self.speculator.verify_step(len(running), self.runner.verify_tokens, padding, time.perf_counter() - started,
                                    emitted=sum(kept))
        self.runner.remove_rows(leaving)
