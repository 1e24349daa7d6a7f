"""The scheduler: who gets the next free row, who gives one up, and which prompt tokens are computed next.

It decides; the engine carries the decisions out (vLLM's ``Scheduler``, SGLang's scheduler policy). No
torch and no Jina in here. ``WaitingCalls`` holds the prompts waiting for the engine, grouped by the call
that sent them; ``Scheduler`` adds the prompts being prefilled and the per-round decisions, and holds the
lock that guards the queue against caller threads.

A call (a ``/chat`` request with its prompts, a ``/stream`` request, an OpenAI request) is admitted as a
unit, or refused as a unit when the server-wide bound on waiting prompts would be passed. Its prompts
then wait in the call's own order and enter the engine as rows free up:

* a call with nothing in the engine goes first (oldest such call first), and when every row is taken it
  may take one from the call holding the most rows (the engine preempts that row and recomputes it
  later): so no call waits for another to finish, and an interactive request starts within a decode
  step even while a large batch job fills the engine;
* every other free row goes to the oldest call that still has prompts waiting: a job that a client
  splits into several requests (the Jina Client sends ``request_size`` documents per request) finishes
  them in the order it sent them.
"""

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

from .errors import ServerBusyError


class Call:
    """The sequences of one request, and how many of them are in the engine now."""

    _arrivals = itertools.count()

    def __init__(self, sequences):
        self.arrival = next(self._arrivals)
        self.sequences = list(sequences)
        self.waiting = deque(self.sequences)
        self.active = 0  # sequences of this call prefilling or running
        self.deadline = float("inf")  # the engine's: when its waiting sequences expire

    def __repr__(self) -> str:
        return f"Call(arrival={self.arrival}, waiting={len(self.waiting)}, active={self.active})"


class WaitingCalls:
    """The waiting prompts of every call in flight, bounded by ``max_waiting`` prompts in all."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._calls: list[Call] = []  # calls with prompts waiting or in the engine, oldest first
        self._waiting = 0

    def __len__(self) -> int:
        """Prompts waiting for a row, over all calls."""
        return self._waiting

    def fits(self, prompts: int) -> bool:
        return self._waiting + prompts <= self.max_waiting

    def add(self, call: Call) -> None:
        """Queue a whole call; the caller checked ``fits`` first."""
        self._calls.append(call)
        self._waiting += len(call.waiting)

    def peek_next(self):
        """The sequence ``pop_next`` would return, left in the queue."""
        call = self._next_call()
        return call.waiting[0] if call is not None else None

    def pop_next(self):
        """The sequence that should take a free row now (counted as active in its call), or None."""
        call = self._next_call()
        if call is None:
            return None
        self._waiting -= 1
        call.active += 1
        return call.waiting.popleft()

    def _next_call(self) -> Call | None:
        with_waiting = [call for call in self._calls if call.waiting]
        for call in with_waiting:  # oldest first: a call with nothing in the engine yet
            if call.active == 0:
                return call
        return with_waiting[0] if with_waiting else None

    def call_to_preempt(self) -> Call | None:
        """When every row is taken: the call that should give one up, so that a call with nothing in the
        engine can start. None when no call is left without a row, or when no call holds two or more."""
        if not any(call.waiting and call.active == 0 for call in self._calls):
            return None
        richest = max(self._calls, key=lambda call: (call.active, -call.arrival))
        return richest if richest.active >= 2 else None

    def requeue(self, sequence) -> None:
        """A preempted sequence waits again, first in its call."""
        sequence.call.active -= 1
        sequence.call.waiting.appendleft(sequence)
        self._waiting += 1

    def leave_engine(self, sequence) -> None:
        """An active sequence is finished (or cancelled, or failed)."""
        sequence.call.active -= 1
        self._forget_if_done(sequence.call)

    def remove_waiting(self, predicate) -> list:
        """Take the waiting sequences for which ``predicate`` is true out of the queue; returns them."""
        removed = []
        for call in list(self._calls):
            if not call.waiting:
                continue
            kept = deque()
            for sequence in call.waiting:  # predicate called once per sequence: it may finish it
                (removed if predicate(sequence) else kept).append(sequence)
            if len(kept) != len(call.waiting):
                call.waiting = kept
                self._forget_if_done(call)
        self._waiting -= len(removed)
        return removed

    def _forget_if_done(self, call: Call) -> None:
        if not call.waiting and call.active == 0 and call in self._calls:
            self._calls.remove(call)


# ---- the decisions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Admit:
    """``sequence`` takes a free row: the engine prepares its sampler, then hands it back (``start_prefill``)."""

    sequence: object


@dataclass(frozen=True)
class Preempt:
    """``victim`` gives its row up: the engine frees it (``row``: its index among the running rows, None when
    it was still prefilling), then hands it back (``requeue``)."""

    victim: object
    row: int | None


@dataclass(frozen=True)
class PrefillChunk:
    """Compute ``context[start:end]`` of one sequence in a forward pass of its own."""

    sequence: object
    context: list
    start: int
    end: int


@dataclass(frozen=True)
class PrefillTogether:
    """Whole contexts ``[(sequence, context)]`` of several sequences in one padded forward pass."""

    pairs: list


class Scheduler:
    """The waiting calls, the prompts being prefilled, and each round's decisions: who is admitted, who is
    preempted, who is dropped (cancelled or past its deadline) and which prompt tokens are prefilled. It
    decides; the engine carries each decision out (the model, the KV storage, the answers are not its job).

    ``lock`` guards the waiting calls, the one thing that caller threads touch (submitting, cancelling);
    the engine thread waits on it for work."""

    def __init__(self, max_queue: int, max_rows: int, prefill_chunk: int, block_size: int, request_timeout: float):
        self.lock = threading.Condition()
        self.waiting = WaitingCalls(max_queue)
        self.prefilling: list = []  # admitted sequences whose context is not fully computed yet, oldest first
        self.max_rows, self.prefill_chunk, self.block_size = max_rows, prefill_chunk, block_size
        self.request_timeout = request_timeout
        self.preemptions = 0

    # -- caller threads (each takes the lock) --
    def add(self, call: Call) -> None:
        """Queue a whole call, or raise ServerBusyError (nothing queued) when it would pass ``max_queue``."""
        with self.lock:
            if not self.waiting.fits(len(call.sequences)):
                raise ServerBusyError(
                    f"server busy: {len(self.waiting)} prompts are already waiting and this call brings "
                    f"{len(call.sequences)} (max_queue={self.waiting.max_waiting}); retry later"
                )
            self.waiting.add(call)
            self.lock.notify_all()

    def cancel(self, sequences) -> list:
        """Mark these cancelled; the waiting ones leave the queue now (returned: the engine retires them)."""
        with self.lock:
            for sequence in sequences:
                if not sequence.finished:
                    sequence.cancelled = True
            removed = self.waiting.remove_waiting(lambda s: s.cancelled)
            self.lock.notify_all()
            return removed

    # -- the engine thread --
    def next_admission(self, running: list, room=None):
        """The next decision for a free row (Admit, Preempt) or None; call with the lock held, carry each out
        before asking again. Every row taken: a call with nothing in the engine may have one preempted. The
        next sequence waits while ``room(sequence)`` says the KV pool cannot hold it yet."""
        if len(running) + len(self.prefilling) >= self.max_rows:
            return self._preemption(running)
        sequence = self.waiting.peek_next()
        if sequence is None or (room is not None and not room(sequence)):
            return None
        self.waiting.pop_next()
        sequence.active = True
        now = time.monotonic()
        # request_timeout bounds each prompt from its first row on; its call's waiting prompts expire only
        # when the call got no new row for that long (a long job is not cut off).
        sequence.deadline = sequence.deadline or now + self.request_timeout
        sequence.call.deadline = now + self.request_timeout
        return Admit(sequence)

    def _preemption(self, running: list):
        """The call with the most rows gives one up: its cheapest sequence to redo (fewest tokens computed),
        which waits again at the front of its call; its answer so far, sampler and detokenizer are kept."""
        call = self.waiting.call_to_preempt()
        if call is None:
            return None
        prefilling = [s for s in self.prefilling if s.call is call]
        if prefilling:
            victim = min(prefilling, key=lambda s: s.prefilled)
            self.prefilling.remove(victim)
            return Preempt(victim, None)
        row = min((i for i, s in enumerate(running) if s.call is call),
                  key=lambda i: len(running[i].prompt_ids) + len(running[i].generated))
        return Preempt(running[row], row)

    def start_prefill(self, sequence) -> None:
        self.prefilling.append(sequence)

    def requeue(self, victim) -> None:
        """A preempted sequence, its row freed, waits again (call with the lock held)."""
        victim.active = False
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.requeue(victim)

    def leave_engine(self, sequence) -> None:
        """An active sequence is finished, failed or cancelled: its row is free for the next one."""
        sequence.active = False
        with self.lock:
            self.waiting.leave_engine(sequence)

    def take_done(self, running: list, now: float) -> tuple:
        """Cancelled sequences and those past their deadline: ``([(sequence, outcome)], running row
        indices)``, outcome ``cancelled`` or ``time_limit``. Waiting and prefilling ones leave here; the
        engine ends them all and removes the rows."""
        done = []

        def is_done(sequence) -> bool:
            outcome = "cancelled" if sequence.cancelled else \
                "time_limit" if now > (sequence.deadline or sequence.call.deadline) else None
            if outcome:
                done.append((sequence, outcome))
            return outcome is not None

        with self.lock:
            self.waiting.remove_waiting(is_done)
        self.prefilling = [s for s in self.prefilling if not is_done(s)]
        rows = [index for index, s in enumerate(running) if is_done(s)]
        return done, rows

    def prefill_work(self, kv):
        """This round's prefill work, at most ``prefill_chunk`` prompt tokens, oldest requests first, one
        decision at a time: the engine computes each (and the KV manager remembers its blocks) before the next
        prompt looks at the prefix cache. A prompt first takes what the prefix cache holds of it, and waits
        while an earlier prompt computes the block it needs next. Prompts that fit whole in what is left of the
        round share one forward pass (short prompts of a batch job would otherwise cost a pass each); longer
        ones advance by a chunk of their own, ending on a block boundary so that the blocks can be shared."""
        budget = self.prefill_chunk
        claimed = kv.claimed_blocks(self.prefilling)
        together = []
        for sequence in list(self.prefilling):
            if budget <= 0:
                break
            context = sequence.context_ids()
            kv.reuse_cached_prefix(sequence, context)
            if kv.waits_for_a_shared_block(sequence, context, claimed):
                continue
            if sequence.prefilled == 0 and len(context) <= budget:
                together.append((sequence, context))
                budget -= len(context)
                continue
            start = sequence.prefilled
            end = min(len(context), start + budget)
            aligned = end - end % self.block_size
            if end < len(context) and aligned > start:
                end = aligned
            budget -= end - start
            yield PrefillChunk(sequence, context, start, end)
        if together:
            yield PrefillTogether(together)

    def prefill_done(self, sequence) -> None:
        """Its context is computed (or it failed): it leaves the prefilling list."""
        self.prefilling.remove(sequence)

    def take_everything(self, running: list) -> list:
        """Shutting down: every sequence the engine knows of, taken out of the queue and the lists."""
        with self.lock:
            pending = self.waiting.remove_waiting(lambda sequence: True) + self.prefilling + list(running)
        self.prefilling = []
        return pending
