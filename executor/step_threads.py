"""How many CPU threads a decode or verify step computes on: measured per step size, where it cannot change a token.

The engine's forward passes run in its own thread, not the process's first one. libgomp (torch's OpenMP on
Linux) counts that first thread as one of its workers, so the engine thread's team of N threads makes the
process hold more OpenMP threads than CPUs as soon as N is the number of cores; libgomp then lets an idle
worker spin only ~100 rounds before it sleeps on a futex, and each of a decode step's ~200 small matmuls
waits to wake it. Measured on 2 cores, the default model's 210 4-bit matmuls of one row: 3.2 ms from the main
thread at 2 threads, 13-14 ms from another thread at 2 threads, 5.0 ms at 1; the whole one-row decode step in
the engine thread 30.9 ms at 2 threads, 15.8 ms at 1 (int8: 26.9 / 22.7). Where a step's matmuls are big (many
rows, a large model) the second thread pays for its wake-ups. So each size of step (its kind and the tokens it
computes, in powers of two) tries both counts in turn and keeps the faster, and measures again now and then.
The output head is one matmul big enough to pay for the wake-up at any size (the default model's 49152 x 576
int8 head: 2.2 ms at 1 thread, 0.8 ms at 2), so it runs at the configured count inside a narrower step
(measured in one process, steps alternating: one row 18.2 -> 17.5 ms, 16 rows 68.9 -> 65.3 ms).

Only where the count cannot change the answer: the 4- and 8-bit kernels split a product by its outputs, never
a sum (logits bitwise equal at 1 and 2 threads, tests/unit/test_step_threads.py), while float32 GEMMs may split
sums, so a float model keeps the configured count (its greedy answers equal ``model.generate``'s).
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .quantize import thread_count_invariant

TRIALS = 4  # steps at each count before choosing
REVISIT = 2048  # steps of one size after which its choice is measured again


@dataclass
class SizeRecord:
    """One size of step: the seconds measured at each count this round, and the count chosen."""

    seconds: dict = field(default_factory=dict)  # count -> [seconds of its trial steps]
    chosen: int | None = None
    steps_since_choice: int = 0

    @property
    def settled(self) -> bool:
        """A count is chosen and not yet due to be measured again."""
        return self.chosen is not None and self.steps_since_choice < REVISIT


class StepThreads:
    """``step(kind, tokens)`` wraps one forward pass: it sets the thread count chosen for that size and
    records how long the pass took. ``counts``: the candidates (one count: nothing to choose)."""

    def __init__(self, counts: tuple, head=None):
        self.counts = tuple(sorted(set(counts)))
        self.configured = max(self.counts)
        self._sizes: dict = {}
        self._count = self.configured  # the count of the step running now
        if head is not None and len(self.counts) > 1:
            head.register_forward_pre_hook(self._widen)
            head.register_forward_hook(self._narrow_again)

    @classmethod
    def for_model(cls, model, device) -> "StepThreads":
        """Both 1 and the configured count for a quantized model on a CPU with more than one thread; else the
        configured count alone."""
        configured = torch.get_num_threads()
        if device.type == "cpu" and configured > 1 and thread_count_invariant(model):
            return cls((1, configured), head=model.get_output_embeddings())
        return cls((configured,))

    def count_for(self, kind: str, tokens: int) -> int:
        """The count this step of ``tokens`` computed positions runs at: the one chosen, or the next trial."""
        if len(self.counts) == 1:
            return self.counts[0]
        record = self._record(kind, tokens)
        if record.settled:
            return record.chosen
        # A round of trials, alternating so that the rows' growing contexts weigh on each count alike.
        return min(self.counts, key=lambda count: len(record.seconds.get(count, ())))

    def observe(self, kind: str, tokens: int, count: int, seconds: float) -> None:
        if len(self.counts) == 1:
            return
        record = self._record(kind, tokens)
        if record.settled:
            record.steps_since_choice += 1
            return
        record.seconds.setdefault(count, []).append(seconds)
        if all(len(record.seconds.get(c, ())) >= TRIALS for c in self.counts):
            record.chosen = min(self.counts, key=lambda c: sorted(record.seconds[c])[TRIALS // 2])
            record.seconds, record.steps_since_choice = {}, 0

    def _record(self, kind: str, tokens: int) -> SizeRecord:
        return self._sizes.setdefault((kind, tokens.bit_length()), SizeRecord())

    @contextmanager
    def step(self, kind: str, tokens: int):
        count = self.count_for(kind, tokens)
        if count != self.configured:
            torch.set_num_threads(count)
        self._count, started = count, time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            if count != self.configured:
                torch.set_num_threads(self.configured)
            self._count = self.configured
        self.observe(kind, tokens, count, elapsed)

    def _widen(self, module, inputs) -> None:
        if self._count != self.configured:
            torch.set_num_threads(self.configured)

    def _narrow_again(self, module, inputs, output) -> None:
        if self._count != self.configured:
            torch.set_num_threads(self._count)

    def choices(self) -> dict:
        """{(kind, tokens bucket): count chosen}, for logs and tests."""
        return {size: record.chosen for size, record in self._sizes.items() if record.chosen is not None}
