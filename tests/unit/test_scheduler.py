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
