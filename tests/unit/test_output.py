"""executor/output.py on its own: what stops an answer, what each event carries, one release per request.
No model: a stand-in detokenizer and sampler."""

from array import array

from executor.errors import EngineError
from executor.output import OutputProcessor
from executor.sampling import TokenLogprob
from executor.sequence import Sequence
from executor.validation import SamplingSettings

EOS = 0


class Detok:
    """Each token's text is its number; "stop" after the token 99."""

    def __init__(self):
        self.stopped = False

    def push(self, token: int) -> str:
        self.stopped = token == 99
        return "" if token == 7 else f"<{token}>"  # 7 holds its text back until the next token or the end

    def flush(self) -> str:
        return "[flush]"


class Sampler:
    def __init__(self):
        self.history = []

    def accepted(self, token: int) -> None:
        self.history.append(token)


class Metrics:
    def __init__(self):
        self.calls = []

    def first_token(self, seconds):
        self.calls.append("first")

    def next_token(self, seconds):
        self.calls.append("next")

    def finished(self, *args):
        self.calls.append(("finished",) + args)


def make(max_new_tokens=5, logprobs=False):
    events, released = [], []
    sequence = Sequence(request_id=1, prompt_ids=array("i", [5, 6, 7]), emit=events.append, detok=Detok(),
                        settings=SamplingSettings(max_new_tokens=max_new_tokens, logprobs=logprobs), label="/chat")
    sequence.sampler = Sampler()
    output = OutputProcessor([EOS], released.append)
    output.metrics = Metrics()
    return output, sequence, events, released


def test_tokens_become_events_until_max_new_tokens_with_the_last_text_and_length():
    output, sequence, events, released = make(max_new_tokens=3)
    assert output.accept(sequence, 11) and output.accept(sequence, 12)
    assert not output.accept(sequence, 13)
    assert [(e.text, e.finish_reason) for e in events] == [("<11>", None), ("<12>", None), ("<13>[flush]", "length")]
    assert [(e.prompt_tokens, e.completion_tokens) for e in events] == [(3, 1), (3, 2), (3, 3)]
    assert sequence.generated == [11, 12, 13] and sequence.sampler.history == [11, 12, 13]
    assert released == [sequence] and sequence.finished
    assert output.metrics.calls[:3] == ["first", "next", "next"]
    assert output.metrics.calls[-1] == ("finished", "/chat", "length", 3, 3, 0)


def test_eos_ends_the_answer_without_becoming_part_of_it():
    output, sequence, events, released = make()
    assert output.accept(sequence, 11)
    assert not output.accept(sequence, EOS)
    assert sequence.generated == [11] and sequence.sampler.history == [11]
    assert [(e.text, e.finish_reason) for e in events] == [("<11>", None), ("[flush]", "stop")]
    assert released == [sequence]


def test_a_stop_string_ends_the_answer_and_text_held_back_is_not_sent_empty():
    output, sequence, events, released = make()
    assert output.accept(sequence, 7)  # no text yet: no event
    assert events == []
    assert not output.accept(sequence, 99)
    assert [(e.text, e.finish_reason) for e in events] == [("<99>[flush]", "stop")]


def test_logprobs_go_out_with_the_event_of_their_tokens():
    output, sequence, events, _ = make(logprobs=True)
    first, second = TokenLogprob(7, -0.5, []), TokenLogprob(8, -0.25, [])
    output.accept(sequence, 7, first)  # held back: its logprob waits for the next event
    output.accept(sequence, 8, second)
    assert events[0].logprobs == [first, second]
    assert sequence.pending_logprobs == []


def test_failure_cancellation_and_time_limit_each_release_once_with_their_outcome():
    for outcome in ("error", "cancelled", "time_limit"):
        output, sequence, events, released = make()
        if outcome == "error":
            output.fail(sequence, EngineError("boom"))
            assert isinstance(events[0], EngineError)
        else:
            output.end(sequence, outcome)
            assert [e.finish_reason for e in events] == ([] if outcome == "cancelled" else ["time_limit"])
        assert released == [sequence] and sequence.finished
        assert output.metrics.calls[-1][2] == {"error": "error:EngineError"}.get(outcome, outcome)


def test_a_listener_that_raises_cancels_its_request_and_nothing_else():
    output, sequence, _, _ = make()

    def broken(event):
        raise RuntimeError("client gone")

    sequence.emit = broken
    assert output.accept(sequence, 11)  # the engine goes on; the scheduler drops it before the next step
    assert sequence.cancelled
