"""One request's state inside the engine (``Sequence``), and the pieces of its answer (``TokenEvent``).

Plain data, no behaviour beyond reading it. The fields are grouped by the room that writes them, so a reader
can tell who changes what: the request as submitted (nobody), the scheduler's (``scheduler.py``), the KV
manager's (``kv_manager.py``), sampling's (``sampling.RowSampler``), speculation's (``speculation.py``) and
the output's (``output.py``).
"""

import time
from array import array
from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    """A piece of the answer. ``finish_reason`` is set on the last one: stop, length or time_limit."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # With settings.logprobs: one sampling.TokenLogprob per token since the previous event (not EOS).
    logprobs: list | None = None
    # The answer's token ids since the previous event (what a router needs to continue it elsewhere).
    token_ids: list | None = None


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    # -- the request, as submitted --
    request_id: int
    prompt_ids: array  # int32: thousands of prompts may wait at once
    settings: object  # validation.SamplingSettings
    emit: object  # called with each TokenEvent, or an exception
    detok: object  # detok.IncrementalDetokenizer (the output's)
    label: str = ""  # e.g. the endpoint, for the log line and metrics
    call: object = None  # scheduler.Call: the request it came in with
    submitted_at: float = field(default_factory=time.monotonic)

    # -- the scheduler's --
    deadline: float | None = None  # request_timeout after it first got a row
    active: bool = False  # holds a row (prefilling or running)
    preemptions: int = 0
    admission: int = 0  # the order it last got a row in (the newest row is preempted first)
    cancelled: bool = False  # set from any thread; the engine drops it before its next step

    # -- sampling's (set when it first gets a row) --
    sampler: object = None  # sampling.RowSampler

    # -- the KV manager's --
    cache: object = None  # kv_cache.StagedKV while it is prefilled
    prefilled: int = 0  # context tokens whose keys and values are in ``cache``
    cached_tokens: int = 0  # of them, prompt tokens that came from the prefix cache
    block_hashes: tuple = ()  # (context length, hashes of its whole blocks), for sharing blocks being computed

    # -- speculation's (speculation.py; None for rows that never drafted) --
    drafter: object = None  # speculation.NgramDrafter: its n-gram index and acceptance record

    # -- the output's --
    generated: list = field(default_factory=list)  # accepted token ids
    pending_logprobs: list = field(default_factory=list)  # accepted since the last event
    reported: int = 0  # of ``generated``, the ids already carried by an event (TokenEvent.token_ids)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    def context_ids(self) -> list:
        """The tokens whose KV cache the row needs before its next step: the prompt, and after a
        preemption also the answer so far except its last token (the next step's input)."""
        return list(self.prompt_ids) + self.generated[:-1]

    def tokens(self) -> list:
        """Prompt and answer so far."""
        return list(self.prompt_ids) + self.generated
