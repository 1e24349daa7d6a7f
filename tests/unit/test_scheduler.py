"""The call queue's policy on its own: who takes the next free row, who gives one up. No model."""

from executor.scheduler import Call, WaitingCalls


class Seq:
    def __init__(self, name):
        self.name, self.call = name, None

    def __repr__(self):
        return self.name


def make_call(name: str, size: int) -> Call:
    sequences = [Seq(f"{name}{i}") for i in range(size)]
    call = Call(sequences)
    for sequence in sequences:
        sequence.call = call
    return call


def test_a_call_fits_or_not_as_a_whole():
    queue = WaitingCalls(max_waiting=10)
    assert queue.fits(10) and not queue.fits(11)
    queue.add(make_call("a", 7))
    assert len(queue) == 7 and queue.fits(3) and not queue.fits(4)


def test_oldest_call_first_but_a_call_without_rows_goes_before_it():
    queue = WaitingCalls(max_waiting=100)
    a, b = make_call("a", 3), make_call("b", 3)
    queue.add(a)
    queue.add(b)
    assert [queue.pop_next().name for _ in range(2)] == ["a0", "b0"]  # b has no row yet: it goes before a1
    assert [queue.pop_next().name for _ in range(3)] == ["a1", "a2", "b1"]  # then the oldest call first
    assert (a.active, b.active, len(queue)) == (3, 2, 1)


def test_preemption_only_for_a_call_without_rows_and_only_from_a_call_with_two_or_more():
    queue = WaitingCalls(max_waiting=100)
    batch = make_call("batch", 10)
    queue.add(batch)
    for _ in range(4):
        queue.pop_next()
    assert queue.call_to_preempt() is None  # nobody is waiting without a row
    interactive = make_call("chat", 1)
    queue.add(interactive)
    assert queue.call_to_preempt() is batch
    assert queue.pop_next().name == "chat0"
    assert queue.call_to_preempt() is None

    singles = WaitingCalls(max_waiting=100)
    first, second = make_call("x", 1), make_call("y", 1)
    singles.add(first)
    singles.pop_next()
    singles.add(second)
    assert singles.call_to_preempt() is None  # taking x's only row would just move the wait to x


def test_requeued_sequence_comes_back_first_in_its_call():
    queue = WaitingCalls(max_waiting=100)
    call = make_call("a", 3)
    queue.add(call)
    first = queue.pop_next()
    queue.requeue(first)
    assert (call.active, len(queue)) == (0, 3)
    assert queue.pop_next() is first


def test_removed_and_finished_sequences_leave_nothing_behind():
    queue = WaitingCalls(max_waiting=5)
    call = make_call("a", 5)
    queue.add(call)
    running = queue.pop_next()
    removed = queue.remove_waiting(lambda sequence: True)
    assert [s.name for s in removed] == ["a1", "a2", "a3", "a4"] and len(queue) == 0
    assert queue.fits(5)
    queue.leave_engine(running)
    assert call.active == 0 and queue.pop_next() is None and queue.call_to_preempt() is None


# ---- Scheduler: the decisions the engine carries out --------------------------------------------------
import time  # noqa: E402

import pytest  # noqa: E402

from executor.errors import ServerBusyError  # noqa: E402
from executor.scheduler import Admit, Preempt, PrefillChunk, PrefillTogether, Scheduler  # noqa: E402


class Prompt(Seq):
    """What the scheduler reads of a sequence."""

    def __init__(self, name, tokens=10):
        super().__init__(name)
        self.prompt_ids, self.generated = list(range(tokens)), []
        self.prefilled, self.active, self.cancelled, self.finished = 0, False, False, False
        self.deadline, self.preemptions = None, 0

    def context_ids(self):
        return self.prompt_ids + self.generated[:-1]


def prompt_call(name, *lengths):
    sequences = [Prompt(f"{name}{i}", length) for i, length in enumerate(lengths)]
    call = Call(sequences)
    for sequence in sequences:
        sequence.call = call
    return call


class NoCache:
    """A KV manager with nothing cached: records which prompts looked, in order."""

    def __init__(self):
        self.looked = []

    def claimed_blocks(self, prefilling):
        return {}

    def reuse_cached_prefix(self, sequence, context):
        self.looked.append(sequence)

    def waits_for_a_shared_block(self, sequence, context, claimed):
        return False


def admit_all(scheduler, running):
    """Carry out admissions as the engine does (no preemption expected)."""
    admitted = []
    while (decision := scheduler.next_admission(running)) is not None:
        assert isinstance(decision, Admit)
        scheduler.start_prefill(decision.sequence)
        admitted.append(decision.sequence)
    return admitted


def test_admission_fills_free_rows_and_starts_each_prompts_deadline():
    scheduler = Scheduler(max_queue=10, max_rows=3, prefill_chunk=256, block_size=16, request_timeout=5.0)
    call = prompt_call("a", 10, 10, 10, 10)
    scheduler.add(call)
    before = time.monotonic()
    admitted = admit_all(scheduler, running=[])
    assert admitted == call.sequences[:3] and scheduler.prefilling == admitted
    assert all(s.active and before + 5.0 <= s.deadline <= time.monotonic() + 5.0 for s in admitted)
    assert len(scheduler.waiting) == 1 and call.active == 3


def test_a_full_queue_refuses_a_call_whole():
    scheduler = Scheduler(max_queue=3, max_rows=3, prefill_chunk=256, block_size=16, request_timeout=5.0)
    scheduler.add(prompt_call("a", 1, 1))
    with pytest.raises(ServerBusyError, match="max_queue=3"):
        scheduler.add(prompt_call("b", 1, 1))
    assert len(scheduler.waiting) == 2


def test_a_call_without_rows_gets_the_cheapest_row_of_the_richest_call():
    scheduler = Scheduler(max_queue=10, max_rows=3, prefill_chunk=256, block_size=16, request_timeout=5.0)
    job = prompt_call("job", 30, 10, 20)
    scheduler.add(job)
    running = admit_all(scheduler, running=[])
    scheduler.prefilling = []  # all three run now
    for sequence in running:
        sequence.prefilled = len(sequence.prompt_ids)
    chat = prompt_call("chat", 5)
    scheduler.add(chat)
    decision = scheduler.next_admission(running)
    assert decision == Preempt(job.sequences[1], 1)  # fewest tokens to recompute
    running.pop(1)
    scheduler.requeue(decision.victim)
    assert decision.victim.preemptions == 1 and scheduler.preemptions == 1 and not decision.victim.active
    assert scheduler.next_admission(running) == Admit(chat.sequences[0])


def test_a_prompt_still_prefilling_is_preempted_before_a_running_row():
    scheduler = Scheduler(max_queue=10, max_rows=2, prefill_chunk=256, block_size=16, request_timeout=5.0)
    job = prompt_call("job", 30, 10)
    scheduler.add(job)
    admitted = admit_all(scheduler, running=[])
    running = [admitted[0]]
    scheduler.prefilling = [admitted[1]]
    scheduler.add(prompt_call("chat", 5))
    assert scheduler.next_admission(running) == Preempt(admitted[1], None)
    assert scheduler.prefilling == []


def test_cancelled_and_expired_sequences_are_taken_wherever_they_are():
    scheduler = Scheduler(max_queue=10, max_rows=2, prefill_chunk=256, block_size=16, request_timeout=5.0)
    call = prompt_call("a", 10, 10, 10, 10)
    scheduler.add(call)
    first, second = admit_all(scheduler, running=[])
    scheduler.prefilling = [second]
    running = [first]
    first.deadline = time.monotonic() - 1  # past its deadline while running
    call.sequences[3].cancelled = True  # still waiting
    done, rows = scheduler.take_done(running, time.monotonic())
    assert sorted((s.name, outcome) for s, outcome in done) == [("a0", "time_limit"), ("a3", "cancelled")]
    assert rows == [0] and scheduler.prefilling == [second] and len(scheduler.waiting) == 1


def test_prefill_work_is_handed_out_one_decision_at_a_time_within_the_budget():
    scheduler = Scheduler(max_queue=10, max_rows=4, prefill_chunk=256, block_size=16, request_timeout=5.0)
    call = prompt_call("a", 100, 500, 100, 80)
    scheduler.add(call)
    short, long, other, last = admit_all(scheduler, running=[])
    kv = NoCache()
    work = scheduler.prefill_work(kv)
    first = next(work)
    # The long prompt takes what is left after the first short one, ending on a block boundary; the prompt
    # after it has not looked at the prefix cache yet (the engine remembers this chunk's blocks first).
    assert first == PrefillChunk(long, long.context_ids(), 0, 144) and kv.looked == [short, long]
    long.prefilled = 144
    rest = list(work)
    # 12 tokens are left: the next prompt advances by them (too few for a whole block); the short prompt's
    # shared pass comes last, and the last prompt waits for the next round.
    assert rest == [PrefillChunk(other, other.context_ids(), 0, 12), PrefillTogether([(short, short.context_ids())])]
    assert kv.looked == [short, long, other]
