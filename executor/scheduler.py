"""Who gets the next free row: the prompts waiting for the engine, grouped by the call that sent them.

No torch and no Jina in here; the engine holds its lock around every method.

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
from collections import deque


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
