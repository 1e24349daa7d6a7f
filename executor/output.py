"""The output: chosen tokens -> the answer's pieces, and the one way every request ends.

``accept`` records a token and checks what stops the answer (EOS, a stop string, a complete grammar,
``max_new_tokens``); the text it completes goes to the request's listener as a ``TokenEvent``. Every request
ends through ``_release`` (finished, failed, timed out or cancelled): one log line, the metrics, and the
engine's release hook, which gives its row and staged cache back (vLLM's ``OutputProcessor`` and
``update_from_output``, TGI's ``StoppingCriteria``). No torch, no model in here.
"""

import logging
import os
import time

from .errors import EngineError, RequestError
from .sequence import TokenEvent

log = logging.getLogger("jina_llm_stream.engine")


class OutputProcessor:
    """Turns accepted tokens into events and ends requests. ``release`` is called once per request as it
    ends (from the engine thread; from a caller's thread for a request cancelled while it waited)."""

    def __init__(self, eos_token_ids, release):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.release = release
        self.metrics = None  # optional observer: first_token(s), next_token(s), finished(label, outcome, p, n, c)

    def accept(self, sequence, token: int, logprob=None) -> bool:
        """Record ``token`` (chosen with ``logprob``), emit the text it completes; False when the request is
        finished (it has then been released)."""
        if token in self.eos_token_ids:
            self.finish(sequence, "stop")
            return False
        grammar_goes_on = True
        if sequence.settings.grammar is not None:
            try:
                grammar_goes_on = sequence.settings.grammar.advance(token)
            except RuntimeError as error:  # e.g. the grammar's work bound ran out: this request fails alone
                self.fail(sequence, EngineError(f"response_format: {error}"))
                return False
        sequence.generated.append(token)
        if logprob is not None:
            sequence.pending_logprobs.append(logprob)
        self._timestamp(sequence)
        sequence.sampler.accepted(token)
        text = sequence.detok.push(token)
        if sequence.detok.stopped or not grammar_goes_on:  # a complete grammar ends the answer
            self.finish(sequence, "stop", text)
            return False
        if len(sequence.generated) >= sequence.max_new_tokens:
            self.finish(sequence, "length", text)
            return False
        if text:
            self._emit(sequence, self._event(sequence, text, None))
        return True

    def resume(self, sequence, token_ids) -> None:
        """A continuation: ``token_ids``, the answer's tokens another server already sent, become this
        request's own, as if accepted here, but nothing is sent. The detokenizer, the grammar and the sampler's
        history then stand where the first server's stood, so the next piece is exactly the next text an
        uninterrupted run sends (a stop string's held-back start included). RequestError when the ids could
        not have been sent by a run that goes on."""
        for index, token in enumerate(token_ids):
            grammar = sequence.settings.grammar
            goes_on = token not in self.eos_token_ids and (grammar is None or _grammar_takes(grammar, token))
            sequence.generated.append(token)
            sequence.sampler.accepted(token)
            sequence.detok.push(token)
            if not goes_on or sequence.detok.stopped:
                raise RequestError("gen_conf.continuation", f"<id {token} at {index}>",
                                   "the ids of an answer that goes on: this one ends there")
        sequence.reported = len(sequence.generated)

    def finish(self, sequence, reason: str, text: str = "") -> None:
        """The answer ends with ``reason`` (stop, length, time_limit): the last piece of text goes out."""
        text += sequence.detok.flush()
        self._release(sequence, reason)
        self._emit(sequence, self._event(sequence, text, reason))

    def fail(self, sequence, error: BaseException) -> None:
        self._release(sequence, f"error:{type(error).__name__}")
        self._emit(sequence, error)

    def end(self, sequence, outcome: str) -> None:
        """A scheduler's verdict: ``cancelled`` (nobody listens: nothing is sent) or ``time_limit``."""
        if outcome == "cancelled":
            self._release(sequence, "cancelled")
        else:
            self.finish(sequence, outcome)

    def _event(self, sequence, text: str, reason) -> TokenEvent:
        logprobs = None
        if sequence.settings.logprobs:
            logprobs, sequence.pending_logprobs = sequence.pending_logprobs, []
        token_ids, sequence.reported = sequence.generated[sequence.reported:], len(sequence.generated)
        return TokenEvent(text, reason, len(sequence.prompt_ids), len(sequence.generated), sequence.cached_tokens,
                          logprobs, token_ids)

    def _timestamp(self, sequence) -> None:
        now = time.monotonic()
        if self.metrics:
            if sequence.first_token_at is None:
                self.metrics.first_token(now - sequence.submitted_at)
            else:
                self.metrics.next_token(now - sequence.last_token_at)
        if sequence.first_token_at is None:
            sequence.first_token_at = now
        sequence.last_token_at = now

    def _release(self, sequence, outcome: str) -> None:
        """The one end of every request: its resources go back, one log line (never the prompt text)."""
        sequence.finished = True
        self.release(sequence)
        now = time.monotonic()
        ttft = (sequence.first_token_at - sequence.submitted_at) * 1000 if sequence.first_token_at else float("nan")
        decode_s = now - sequence.first_token_at if sequence.first_token_at else 0.0
        rate = (len(sequence.generated) - 1) / decode_s if decode_s > 0 and len(sequence.generated) > 1 else 0.0
        preempted = f" preempted={sequence.preemptions}" if sequence.preemptions else ""
        drafter = sequence.drafter
        drafted = f" drafted={drafter.drafted} accepted={drafter.accepted}" if drafter and drafter.drafted else ""
        log.info("pid=%d request=%s endpoint=%s prompt_tokens=%d cached_tokens=%d new_tokens=%d ttft_ms=%.0f "
                 "tokens_per_s=%.1f finish=%s%s%s", os.getpid(), sequence.request_id, sequence.label or "-",
                 len(sequence.prompt_ids), sequence.cached_tokens, len(sequence.generated), ttft, rate, outcome,
                 preempted, drafted)
        if self.metrics:
            self.metrics.finished(sequence.label, outcome, len(sequence.prompt_ids), len(sequence.generated),
                                  sequence.cached_tokens)
            if drafted:
                self.metrics.speculated(drafter.drafted, drafter.accepted)

    @staticmethod
    def _emit(sequence, event) -> None:
        try:
            sequence.emit(event)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
            log.exception("could not deliver an event for request %s", sequence.request_id)
            sequence.cancelled = True


def _grammar_takes(grammar, token: int) -> bool:
    """Whether ``grammar`` takes ``token`` and can go on after it."""
    try:
        return grammar.advance(token)
    except RuntimeError:
        return False
