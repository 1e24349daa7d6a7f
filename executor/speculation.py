"""Speculative decoding without a draft model: guesses from the request's own tokens, verified in the batch.

A row's draft is what followed the last time its latest n tokens appeared in its prompt or its answer
(prompt lookup, the n-gram speculation of llama.cpp and vLLM): an answer that quotes its passages, code that
repeats its identifiers, JSON that echoes the question. Each row verifies its draft in the same forward pass
as the other rows (``ModelRunner.verify``), then its tokens are chosen position by position from the model's
own distribution (``sampling.choose_against_draft``): a greedy answer is the one plain decoding gives, a
sampled one follows the same distribution. The tokens of a rejected draft leave the storage
(``BatchKV.commit_step``), so neither the batch nor the prefix cache ever holds them.

Drafting pays only where the drafts are accepted: a verify step computes ``width`` tokens per row instead
of one. So each row keeps its acceptance record (decayed counts: recent steps weigh most), the batch keeps
a line fitted to its measured steps (seconds = fixed + per token x tokens in the step), and each step takes
the width with the most expected tokens per second; width 1 is a plain decode step. Rows that draft
nothing (no match, a grammar, no room left) ride along at the chosen width.

The model of a step can be wrong where it matters (a verify step's own overheads, a CPU shared with other
work), so it is checked against what verify steps really deliver: ``Payoff`` keeps how many tokens per second
they gave against the latest plain steps of as many rows, over the gain they were chosen for, and
a width must promise enough to cover that shortfall. A rule that has stopped drafting eases back a little on
every step it declines, so one bad stretch does not switch speculation off for good. That is what lets it be
on by default: where drafts pay (quotes, RAG answers) they pay several times over; where they do not (free
text at many rows) verify steps stop.
"""

from collections import deque

from .sampling import choose_against_draft, logprob_of

MAX_SPECULATE = 32  # the largest --speculate: a step's width grows with it
NGRAM_SIZES = (3, 2)  # the longest match is tried first
DECAY = 0.7  # per step: the weight of a row's older acceptance record (a few steps of rejections turn it around)
PRIOR_ACCEPTANCE = 0.5  # a row's acceptance before it has a record (counts one success and one failure)
# What one more token in a step costs, as a fraction of a one-row step, until the steps measured say
# better (2 cores, SmolLM2-135M: ~0.06; a GPU: far less).
PRIOR_TOKEN_COST = 0.06
DEFAULT_SPECULATE = 16  # the CLI's, config.yml's and the Executor's default --speculate
MARGIN = 1.05  # a verify step must promise 5% more tokens per second than a plain one, after Payoff's correction


def check_speculate(speculate: int) -> None:
    if not 0 <= speculate <= MAX_SPECULATE:
        raise ValueError(f"speculate={speculate} is not allowed: use 0 (off) to {MAX_SPECULATE} draft tokens per step")


class NgramDrafter:
    """One row's n-gram index (the n tokens -> where they last continued) and acceptance record."""

    def __init__(self):
        self.tokens: list = []
        self._index = {n: {} for n in NGRAM_SIZES}
        self.successes = self.trials = 0.0
        self.drafted = self.accepted = 0  # totals, for the request's log line and metrics

    def sync(self, sequence) -> None:
        """Index the tokens the sequence gained since the last call (prompt first, then its answer)."""
        known, prompt = len(self.tokens), sequence.prompt_ids
        new = list(prompt[known:]) + sequence.generated[max(0, known - len(prompt)):]
        for token in new:
            position = len(self.tokens)
            for n in NGRAM_SIZES:
                if position >= n:
                    self._index[n][tuple(self.tokens[position - n:position])] = position
            self.tokens.append(token)

    def propose(self, most: int) -> list:
        """Up to ``most`` tokens that followed the latest earlier occurrence of the last n tokens."""
        if most <= 0:
            return []
        for n in NGRAM_SIZES:
            if len(self.tokens) >= n:
                start = self._index[n].get(tuple(self.tokens[-n:]))
                if start is not None:
                    return self.tokens[start:start + most]
        return []

    def acceptance(self) -> float:
        """The chance that a drafted token is kept, from the decayed record."""
        return (self.successes + PRIOR_ACCEPTANCE) / (self.trials + 1.0)

    def record(self, drafted: int, accepted: int) -> None:
        """A verify step kept ``accepted`` of ``drafted`` tokens: each kept one was a success, the first
        rejected one a failure (the ones after it were never tested)."""
        self.successes += accepted
        self.trials += accepted + (accepted < drafted)
        self.drafted += drafted
        self.accepted += accepted

    def forget_a_little(self) -> None:
        self.successes *= DECAY
        self.trials *= DECAY


def expected_kept(acceptance: float, drafted: int) -> float:
    """Expected accepted tokens of a draft of ``drafted``: each is kept only if all before it were."""
    return sum(acceptance ** i for i in range(1, drafted + 1))


class StepCost:
    """Seconds per step as fixed + per_token x tokens computed + per_padding x padded positions: a least-squares
    fit over recent steps. ``tokens`` are what the Linear layers compute (rows x width for a dense step; a
    packed verify step computes only its drafts, token_packing.py); ``padding`` is what attention still
    reads beyond them (rows x width - tokens), which at long rows is far from free. Each slope is pulled
    towards its prior (per token: a fraction of a one-row step; per padded position: nothing) as if
    ``PRIOR_WEIGHT`` were spread over the steps seen: a few noisy steps (a new shape's first run, another
    process on the CPU) cannot make tokens look dear or free; many steps of different sizes decide. Plain
    steps have no padding, so only verify steps tell what padding costs."""

    PRIOR_WEIGHT = 64.0  # tokens squared

    def __init__(self, window: int = 256):
        self._samples = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float, padding: int = 0) -> None:
        self._samples.append((tokens, padding, seconds))

    def line(self) -> tuple:
        """(fixed, per_token, per_padding) seconds."""
        samples = self._samples
        if not samples:
            return 1.0 - PRIOR_TOKEN_COST, PRIOR_TOKEN_COST, 0.0
        count = len(samples)
        mean_tokens, mean_padding, mean_seconds = (sum(sample[i] for sample in samples) / count for i in range(3))
        prior = PRIOR_TOKEN_COST * mean_seconds / (1 + PRIOR_TOKEN_COST * (mean_tokens - 1))
        weight = self.PRIOR_WEIGHT
        centred = [(t - mean_tokens, p - mean_padding, s - mean_seconds) for t, p, s in samples]
        tt = sum(t * t for t, _, _ in centred) + weight
        pp = sum(p * p for _, p, _ in centred) + weight
        tp = sum(t * p for t, p, _ in centred)
        ts = sum(t * s for t, _, s in centred) + weight * prior
        ps = sum(p * s for _, p, s in centred)
        determinant = tt * pp - tp * tp  # > 0: the prior's weight is on the diagonal
        per_token = max((ts * pp - ps * tp) / determinant, 0.01 * prior)  # noise must not make tokens look free
        per_padding = max((ps * tt - ts * tp) / determinant, 0.0)
        return max(mean_seconds - per_token * mean_tokens - per_padding * mean_padding, 0.0), per_token, per_padding


class Payoff:
    """How far verify steps keep their promise: a decayed mean of (tokens per second they delivered over the
    latest plain steps' rate) / (the gain they were chosen for). 1: as promised; 0.7: they delivered 70% of
    it. Declined steps ease it back towards 1 (``RECOVERY`` of the gap each), so drafting is tried again."""

    DECAY = 0.8  # per verify step: a handful of them decide
    RECOVERY = 0.02  # per declined step: about 35 declined steps halve the gap

    def __init__(self):
        self.ratio = 1.0

    def delivered(self, promised_gain: float, delivered_gain: float) -> None:
        observed = delivered_gain / promised_gain
        self.ratio = self.DECAY * self.ratio + (1 - self.DECAY) * min(observed, 2.0)

    def declined(self) -> None:
        self.ratio += (1.0 - self.ratio) * self.RECOVERY


class Speculator:
    """Chooses each step's drafts and width; ``max_draft`` bounds a row's draft (``--speculate``). ``packed``:
    a verify step's Linear layers compute only the drafted positions (token_packing.py), so a row pays for
    its own draft, not for the step's width. The engine reports each step it ran (``plain_step``,
    ``verify_step``)."""

    def __init__(self, max_draft: int, packed: bool = False):
        self.max_draft, self.packed = max_draft, packed
        self.cost = StepCost()
        self.payoff = Payoff()
        self._promised = 1.0  # the gain the step being run was chosen for
        # rows -> seconds of the latest plain steps of that many rows (a decayed mean): what a verify step is
        # measured against. Not the line: it knows nothing of context length, and rows grow longer as they run.
        self._plain_seconds: dict = {}

    def plan(self, running: list) -> list | None:
        """Each row's draft for this step (all cut to the chosen width), or None for a plain step."""
        drafts, acceptances = [], []
        for sequence in running:
            drafter = self._drafter(sequence)
            if drafter is None:
                drafts.append([])
                acceptances.append(0.0)
                continue
            drafter.forget_a_little()
            room = sequence.max_new_tokens - len(sequence.generated) - 1
            drafts.append(drafter.propose(min(self.max_draft, room)))
            acceptances.append(drafter.acceptance())
        longest = max(map(len, drafts), default=0)
        if not longest:
            return None
        width = self.best_width(len(running), drafts, acceptances, longest)
        if width == 1:
            self.payoff.declined()
            return None
        return [draft[:width - 1] for draft in drafts]

    def best_width(self, rows: int, drafts: list, acceptances: list, longest: int) -> int:
        """The width with the most expected tokens per second, if it promises enough over a plain step (MARGIN,
        after the payoff verify steps have shown); else 1. Records the promised gain for ``verify_step``."""
        fixed, per_token, per_padding = self.cost.line()  # fitted once per step, not once per candidate width
        plain_rate = rows / (fixed + per_token * rows)
        best, best_rate = 1, plain_rate
        for width in range(2, longest + 2):
            tokens = rows + sum(expected_kept(p, min(width - 1, len(d))) for d, p in zip(drafts, acceptances))
            computed = rows + sum(min(width - 1, len(d)) for d in drafts) if self.packed else rows * width
            rate = tokens / (fixed + per_token * computed + per_padding * (rows * width - computed))
            if rate > best_rate:
                best, best_rate = width, rate
        self._promised = best_rate / plain_rate
        return best if self._promised * self.payoff.ratio >= MARGIN else 1

    def plain_step(self, rows: int, seconds: float) -> None:
        self.cost.observe(rows, seconds)
        before = self._plain_seconds.get(rows)
        self._plain_seconds[rows] = seconds if before is None else 0.5 * (before + seconds)

    def verify_step(self, rows: int, computed: int, padding: int, seconds: float, emitted: int) -> None:
        """A verify step of ``rows`` computed ``computed`` positions (``padding`` more read) in ``seconds`` and
        gave ``emitted`` tokens: what it delivered against the latest plain steps of as many rows (when there
        were any), then it joins the line."""
        plain_seconds = self._plain_seconds.get(rows)
        if plain_seconds is not None:
            self.payoff.delivered(self._promised, (emitted / seconds) / (rows / plain_seconds))
        self.cost.observe(computed, seconds, padding)

    @staticmethod
    def _drafter(sequence):
        """The row's drafter, made on first use; None for rows that do not speculate: a grammar decides their
        tokens one at a time. (Seeded rows draft: their draw at a position depends on the seed and the position
        only, so a verify step chooses the very tokens plain decoding draws.)"""
        if sequence.settings.grammar is not None:
            return None
        if sequence.drafter is None:
            sequence.drafter = NgramDrafter()
        sequence.drafter.sync(sequence)
        return sequence.drafter


def verify_row(sampler, logits, draft: list, accept) -> tuple:
    """Choose one row's tokens position by position against its draft (``logits``: ``[width, vocab]``) and
    hand each to ``accept(token, logprob)`` (False: the request is finished). Stops at the first token that
    differs from the draft (the model's own choice there is kept: no step is wasted) or at the end of the
    draft (its last position gives one more token). Returns (inputs to keep: the row's next token and the
    accepted drafts, the next input token or None when finished, drafts accepted)."""
    for position in range(len(draft) + 1):
        scores = logits[position:position + 1].float()
        sampler.process(scores)
        guess = draft[position] if position < len(draft) else None
        token = choose_against_draft(sampler, scores[0], guess)
        logprob = logprob_of(scores[0], token, sampler.settings.top_logprobs) if sampler.settings.logprobs else None
        if not accept(token, logprob):
            return position + 1, None, position
        if token != guess:
            return position + 1, token, position
    raise AssertionError("unreachable: the last position has no guess")
