"""Sampling: one row's settings -> transformers' logits processors -> the next token of each row.

The processors are the list that ``model.generate`` builds (same classes, same order; one of them,
``MinNewTokensInPlace``, without its allocations per call), so ``temperature``,
``top_k``, ``repetition_penalty`` ... mean exactly what they mean there. ``presence_penalty`` and
``frequency_penalty`` have their OpenAI meaning (transformers has no processor for them), applied to the
generated tokens only. ``RowSampler`` is one request's state (processors, the token history they read, its
own generator: with a seed, each position's draw depends on the seed and the position only);
``choose_tokens`` picks every running row's next token from one step's logits.
Requests are validated before they get here (``validation.py``).
"""

import copy
import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

from .validation import SamplingSettings

class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties: ``logit -= presence * [count > 0] + frequency * count`` over generated tokens."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class MinNewTokensInPlace(MinNewTokensLengthLogitsProcessor):
    """transformers' ``MinNewTokensLengthLogitsProcessor`` (EOS at -inf until ``min_new_tokens`` are generated),
    the same scores without its allocations per call (a vocabulary-sized arange and ``isin``, a clone of the
    scores): the EOS ids are found once, and the scores are written in place, as ``RowSampler.process`` writes
    its result back in place anyway. ``make bench`` asks every row for ``min_new_tokens``: per row and step
    this cost ~1 ms of a 40 ms GPT-2 step on 2 cores."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id, device="cpu"):
        super().__init__(prompt_length_to_skip, min_new_tokens, eos_token_id, device)
        self._eos_columns = None  # (vocabulary size, the EOS ids inside it)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] - self.prompt_length_to_skip >= self.min_new_tokens:
            return scores
        vocab = scores.shape[-1]
        if self._eos_columns is None or self._eos_columns[0] != vocab:
            ids = self.eos_token_id.flatten()  # ids outside the vocabulary mask nothing, as with isin
            self._eos_columns = (vocab, ids[(ids >= 0) & (ids < vocab)].to(scores.device))
        return scores.index_fill_(-1, self._eos_columns[1], -math.inf)

    @classmethod
    def replacing(cls, processor: MinNewTokensLengthLogitsProcessor) -> "MinNewTokensInPlace":
        return cls(processor.prompt_length_to_skip, processor.min_new_tokens, processor.eos_token_id,
                   processor.eos_token_id.device)


SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p")


def to_generation_config(settings: SamplingSettings, base: GenerationConfig) -> GenerationConfig:
    """The model's own generation defaults, overridden by what the client set."""
    config = copy.deepcopy(base)
    overrides = {
        name: getattr(settings, name)
        for name in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                     "typical_p", "repetition_penalty", "no_repeat_ngram_size")
        if getattr(settings, name) is not None
    }
    if settings.temperature == 0.0:
        overrides["do_sample"] = False  # temperature 0 means greedy, as in OpenAI's API
    if not overrides.get("do_sample", config.do_sample):
        # Greedy ignores these; leaving them set makes transformers warn on every request.
        for name in SAMPLING_ONLY:
            overrides.pop(name, None)
            setattr(config, name, None)
    config.update(**overrides)
    config.num_beams = 1
    config.num_return_sequences = 1
    return config


def build_logits_processors(model, config: GenerationConfig, settings: SamplingSettings, prompt_length: int,
                            device) -> LogitsProcessorList:
    """The processor list ``model.generate`` would build for ``config`` (same classes, same order)."""
    # transformers keeps these two helpers private; requirements.txt pins the version they were checked on,
    # and tests/unit/test_engine.py compares our output with model.generate for the same settings.
    model._prepare_special_tokens(config, True, device=device)
    processors = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_length,
        encoder_input_ids=None,
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(),
        device=device,
        model_kwargs={},
    )
    for index, processor in enumerate(processors):
        if type(processor) is MinNewTokensLengthLogitsProcessor:
            processors[index] = MinNewTokensInPlace.replacing(processor)
    if settings.presence_penalty or settings.frequency_penalty:
        processors.insert(0, PresenceFrequencyPenalty(settings.presence_penalty, settings.frequency_penalty,
                                                      prompt_length))
    return processors


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the scores it was chosen from, and the most likely ones."""

    token_id: int
    logprob: float
    top: list  # [(token_id, logprob)], most likely first, settings.top_logprobs of them


def position_seed(seed: int, position: int) -> int:
    """A seed for one position of a seeded answer (a multiplicative hash: neighbouring seeds and positions
    give unrelated generators)."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class RowSampler:
    """How one request chooses its tokens: its grammar's mask, its logits processors (over its prompt and the
    tokens accepted so far), then greedy or its own seeded generator. Kept across a preemption."""

    def __init__(self, model, settings, prompt_ids, device):
        config = to_generation_config(settings, model.generation_config)
        self.settings = settings
        self.processors = build_logits_processors(model, config, settings, len(prompt_ids), device)
        self.do_sample = bool(config.do_sample)
        self.generator = None
        if self.do_sample:
            self.generator = torch.Generator(device=device)
            if settings.seed is None:
                self.generator.seed()
        self.length = len(prompt_ids)  # tokens of the history: the prompt, then each accepted token
        self.history = None  # [1, prompt + max_new_tokens]: what the processors read
        if len(self.processors):
            self.history = torch.tensor([list(prompt_ids) + [0] * settings.max_new_tokens], dtype=torch.long,
                                        device=device)

    def draw_generator(self) -> torch.Generator:
        """The generator for the token at this position. Seeded, it is reseeded from the seed and the position
        alone: a seed gives the same token at the same position whatever was drawn before (how many tokens a
        speculative step verified, a continuation on another replica), the answer at every run. Unseeded,
        one generator draws on."""
        if self.settings.seed is not None:
            self.generator.manual_seed(position_seed(self.settings.seed, self.length))
        return self.generator

    def accepted(self, token: int) -> None:
        if self.history is not None:
            self.history[0, self.length] = token
        self.length += 1

    def process(self, scores: torch.Tensor) -> None:
        """Apply the grammar's mask and the processors to this row's ``scores`` (``[1, vocab]``) in place.
        The mask comes first: top-k/top-p would otherwise keep only tokens the grammar forbids."""
        grammar = self.settings.grammar
        if grammar is not None:
            grammar.mask(scores[0])
        if self.history is not None:
            row_scores = scores
            # Called one by one: LogitsProcessorList inspects each one's signature on every call.
            for processor in self.processors:
                row_scores = processor(self.history[:, :self.length], row_scores)
            scores.copy_(row_scores)
        if grammar is not None:
            grammar.keep_an_end(scores[0])


def choose_tokens(samplers: list, logits: torch.Tensor) -> list:
    """The next token of each row (``logits``: ``[rows, vocab]``, one sampler per row), with its
    TokenLogprob where the row asked for log-probabilities: a list of ``(token, TokenLogprob or None)``."""
    scores = logits.float()
    for row, sampler in enumerate(samplers):
        sampler.process(scores[row:row + 1])
    chosen = scores.argmax(dim=-1)
    for row, sampler in enumerate(samplers):
        if sampler.do_sample:
            chosen[row] = sample(sampler, scores[row])
    tokens = chosen.tolist()
    return [(token, logprob_of(scores[row], token, sampler.settings.top_logprobs) if sampler.settings.logprobs
             else None) for row, (sampler, token) in enumerate(zip(samplers, tokens))]


def logprob_of(scores: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-softmax of the scores the token was chosen from (after the row's mask and processors)."""
    logprobs = torch.log_softmax(scores, dim=-1)
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(token, float(logprobs[token]),
                        list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [])


def sample(sampler: RowSampler, scores: torch.Tensor) -> int:
    """A sampled row's token from its processed ``scores`` (``[vocab]``)."""
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=sampler.draw_generator())[0])


def choose_against_draft(sampler: RowSampler, scores: torch.Tensor, draft_token) -> int:
    """The next token from ``scores`` (``[vocab]``, processed) where a draft guessed ``draft_token`` (or None):
    the token plain decoding chooses (greedy: the argmax; sampled: a draw), and the draft is kept when it is
    that token. Sampled, that keeps the draft with its probability p and otherwise yields a token from the
    distribution without it, renormalised: exactly speculative sampling with a one-hot draft, and, with a
    seed (a draw fixed by seed and position), the very token plain decoding draws."""
    return int(scores.argmax()) if not sampler.do_sample else sample(sampler, scores)
