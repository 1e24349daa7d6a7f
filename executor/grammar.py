"""Constrained decoding: a response format -> a grammar -> each step, a mask of the tokens it allows.

``parse_response_format`` validates what a client asked for (OpenAI's ``json_object`` and ``json_schema``,
plus ``regex`` and ``choice``) with bounds on its size and nesting. ``Grammars`` compiles a format for one
tokenizer with llguidance (compiled grammars are cached by format, least recently used out) and gives each
request its own ``RowGrammar``: the engine masks the row's scores with it after the row's other processors,
then advances it with the chosen token. EOS is allowed only where the grammar may end; a grammar that
cannot go on ends the answer (finish ``stop``).

Why llguidance: it computes each step's mask lazily from an Earley parser and a lazy lexer (no automaton
of the whole schema built up front, which costs outlines-core seconds on larger schemas), its work per
grammar and per step is bounded by "fuel" limits (a hostile schema or regex runs out of fuel instead of
hanging the engine), it imports with the pydantic 1 that Jina needs (xgrammar 0.2 imports pydantic 2), and
vLLM and SGLang serve it as a backend. JSON is compiled without free whitespace: separators are fixed
(", " and ": "), so a weak model cannot fill max_tokens with newlines between tokens.
"""

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RequestError

FORMAT_KINDS = ("text", "json_object", "json_schema", "regex", "choice")
MAX_SPEC_CHARS = 65_536  # a schema's JSON, a pattern, or the choices together
MAX_NESTING = 32  # of a schema's JSON
MAX_CHOICES = 512
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED_GRAMMARS = 64


@dataclass(frozen=True)
class ResponseFormat:
    """A validated format: ``kind`` and ``spec`` (canonical JSON of the schema or choices, or the pattern)."""

    kind: str
    spec: str


def parse_response_format(value, field: str = "response_format") -> ResponseFormat | None:
    """The format a request asked for, or None for free text; RequestError naming the field otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in FORMAT_KINDS:
        raise RequestError(field, value, 'an object with "type" one of ' + ", ".join(FORMAT_KINDS) +
                           ', e.g. {"type": "json_object"}')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_schema", json.dumps({"type": "object"}))
    if kind == "json_schema":
        wrapper = value.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, dict):
            raise RequestError(f"{field}.json_schema", wrapper, 'an object with the schema under "schema": '
                               '{"name": ..., "schema": {...}, "strict": true}')
        return ResponseFormat("json_schema", _bounded_json(schema, f"{field}.json_schema.schema"))
    if kind == "regex":
        pattern = value.get("pattern")
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_SPEC_CHARS:
            raise RequestError(f"{field}.pattern", pattern, f"a regular expression of 1 to {MAX_SPEC_CHARS} characters")
        return ResponseFormat("regex", pattern)
    choices = value.get("choices")
    if (not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(choice, str) and choice for choice in choices)):
        raise RequestError(f"{field}.choices", choices, f"a list of 1 to {MAX_CHOICES} non-empty strings")
    return ResponseFormat("choice", _bounded_json(choices, f"{field}.choices"))


def _bounded_json(value, field: str) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    if len(text) > MAX_SPEC_CHARS:
        raise RequestError(field, f"<{len(text)} characters>", f"at most {MAX_SPEC_CHARS} characters of JSON")
    depth, deepest = 0, 0
    for character in text:  # brackets inside strings count too: a bound, not a parse
        depth += character in "[{"
        depth -= character in "]}"
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise RequestError(field, f"<nested {deepest} deep>", f"at most {MAX_NESTING} levels of nesting")
    return text


class Grammars:
    """Compiles response formats for one tokenizer (thread-safe; called off the event loop)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids):
        self._hf_tokenizer, self.vocab_size, self.eos_token_ids = hf_tokenizer, vocab_size, list(eos_token_ids)
        self._tokenizer = None
        self._compiled: OrderedDict = OrderedDict()  # ResponseFormat -> a matcher to copy
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        import llguidance.hf

        if self._tokenizer is None:  # about a second for a 150k vocabulary: once, on first use
            # The model's end-of-turn tokens are the grammar's EOS: allowed where the grammar may end.
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_token_ids)
        return self._tokenizer

    def row_grammar(self, response_format: ResponseFormat, field: str = "response_format") -> "RowGrammar":
        with self._lock:
            template = self._compiled.get(response_format)
            if template is not None:
                self._compiled.move_to_end(response_format)
            else:
                template = self._compile(response_format, field)
                self._compiled[response_format] = template
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return RowGrammar(template.deep_copy(), self.vocab_size, self.eos_token_ids)

    def _compile(self, response_format: ResponseFormat, field: str):
        import llguidance

        matcher_class = llguidance.LLMatcher
        try:
            if response_format.kind == "json_schema":
                grammar = matcher_class.grammar_from_json_schema(response_format.spec, defaults=JSON_OPTIONS)
            elif response_format.kind == "regex":
                grammar = matcher_class.grammar_from_regex(response_format.spec)
            elif response_format.kind == "lark":  # built by the server (tool calls), never sent by a client
                grammar = matcher_class.grammar_from_lark(response_format.spec)
            else:
                choices = json.loads(response_format.spec)
                grammar = matcher_class.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices))
        except ValueError as error:
            raise RequestError(field, _shown(response_format), f"not a valid {response_format.kind}: {error}")
        matcher = matcher_class(self._llg_tokenizer(), grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            raise RequestError(field, _shown(response_format),
                               f"cannot be compiled to a grammar: {matcher.get_error()[:300]}")
        return matcher


def _shown(response_format: ResponseFormat) -> str:
    return response_format.spec if len(response_format.spec) <= 80 else f"<{response_format.kind}>"


def _limits():
    import llguidance

    # Grammar size and the parser's and lexer's work per step, bounded below llguidance's defaults: a step
    # of a well-formed schema takes well under a millisecond; a hostile one errors instead of stalling.
    return llguidance.LLParserLimits(max_grammar_size=200_000, step_lexer_fuel=200_000, step_max_items=50_000,
                                     initial_lexer_fuel=1_000_000, max_lexer_states=100_000)


class RowGrammar:
    """One request's position in its grammar."""

    def __init__(self, matcher, vocab_size: int, eos_token_ids: list):
        self.matcher, self.vocab_size, self.eos_token_ids = matcher, vocab_size, eos_token_ids

    def mask(self, scores: torch.Tensor) -> None:
        """Set the scores of the tokens the grammar does not allow next to -inf (``scores``: one row). A
        matcher in error (its work bound ran out) masks nothing: ``advance`` then fails the request."""
        if self.matcher.is_error():
            return
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(words, bitorder="little")[:scores.shape[-1]]
        if len(allowed) < scores.shape[-1]:
            allowed = np.concatenate([allowed, np.zeros(scores.shape[-1] - len(allowed), dtype=np.uint8)])
        scores.masked_fill_(torch.from_numpy(allowed == 0).to(scores.device), float("-inf"))

    def keep_an_end(self, scores: torch.Tensor) -> None:
        """After the row's processors: if they left nothing the grammar allows (min_new_tokens forbids EOS
        where the grammar is complete), the grammar wins and the answer ends."""
        if not torch.isfinite(scores).any():
            scores[self.eos_token_ids[0]] = 0.0

    def advance(self, token: int) -> bool:
        """Take ``token``; False when the grammar cannot go on after it (the answer is complete)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()[:200]}")
        return not self.matcher.is_stopped()
