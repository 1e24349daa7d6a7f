"""Request checking: a client's ``gen_conf`` and messages -> validated ``SamplingSettings``, or a RequestError.

Everything a client sends is checked here, before any token is produced. Errors name the field, the bad
value and what is allowed. ``fit_to_context`` settles the answer's length against the prompt and the
context. No torch in here: what the settings mean for the logits is ``sampling.py``'s job.
"""

import math
from dataclasses import dataclass, field, replace

from .errors import RequestError
from .grammar import ResponseFormat, parse_response_format
from .tools import call_grammar, parse_tools

DEFAULT_MAX_NEW_TOKENS = 512
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 256
ALLOWED_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Limits:
    """Server-side bounds, set by the operator (CLI flags / config.yml / Executor arguments)."""

    max_new_tokens_limit: int = 2048
    max_prompt_tokens: int = 4096
    max_prompt_chars: int = 200_000
    max_messages: int = 256
    context_length: int = 1 << 30
    vocab_size: int = 1 << 31  # token ids a continuation may carry are below it (the model's embedding rows)


@dataclass(frozen=True)
class SamplingSettings:
    """What one request asked for, validated. ``max_new_tokens`` None means "as many as fit"."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple = ()
    raw_prompt: bool = False  # the one message's content is the prompt itself, without the chat template
    logprobs: bool = False  # report each token's log-probability
    top_logprobs: int = 0  # and this many most likely tokens at each step
    tools: object = None  # tools.Tools: functions the model may call (rendered by the chat template)
    response_format: object = None  # grammar.ResponseFormat: the answer is constrained to it
    grammar: object = field(default=None, compare=False)  # grammar.RowGrammar: this request's, once compiled
    # A continuation (request migration, executor/router.py): the answer's token ids another replica already
    # sent; the engine takes them as generated and sends only what follows. Not None (even empty): each
    # piece reports its token ids, so that the router can continue the answer elsewhere.
    continuation: tuple | None = None


# field -> (type, low, high, settings attribute). ``low``/``high`` are inclusive unless noted in
# EXCLUSIVE_LOW. Aliases map OpenAI names onto the transformers ones.
_NUMERIC_FIELDS = {
    "max_new_tokens": (int, 1, None, "max_new_tokens"),
    "max_tokens": (int, 1, None, "max_new_tokens"),
    "min_new_tokens": (int, 0, None, "min_new_tokens"),
    "temperature": (float, 0.0, 2.0, "temperature"),
    "top_k": (int, 0, 100_000, "top_k"),
    "top_p": (float, 0.0, 1.0, "top_p"),
    "min_p": (float, 0.0, 1.0, "min_p"),
    "typical_p": (float, 0.0, 1.0, "typical_p"),
    "repetition_penalty": (float, 0.0, 10.0, "repetition_penalty"),
    "no_repeat_ngram_size": (int, 0, 32, "no_repeat_ngram_size"),
    "presence_penalty": (float, -2.0, 2.0, "presence_penalty"),
    "frequency_penalty": (float, -2.0, 2.0, "frequency_penalty"),
    "seed": (int, 0, 2**63 - 1, "seed"),
    "top_logprobs": (int, 0, 20, "top_logprobs"),
    "num_beams": (int, 1, 1, None),
    "num_return_sequences": (int, 1, 1, None),
}
EXCLUSIVE_LOW = {"top_p", "typical_p", "repetition_penalty"}
BOOLEAN_FIELDS = ("do_sample", "raw_prompt", "logprobs")
ALLOWED_GEN_CONF_KEYS = tuple(sorted([*_NUMERIC_FIELDS, *BOOLEAN_FIELDS, "stop", "response_format", "tools",
                                      "tool_choice", "continuation"]))


def _range_text(name, low, high) -> str:
    op = "<" if name in EXCLUSIVE_LOW else "<="
    upper = f" <= {high}" if high is not None else ""
    return f"{low} {op} {name}{upper}"


def _check_number(name: str, value, kind, low, high):
    field = f"gen_conf.{name}"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind is int and not is_int:
        raise RequestError(field, value, f"an integer, {_range_text(name, low, high)}")
    if kind is float and not (is_int or isinstance(value, float)):
        raise RequestError(field, value, f"a number, {_range_text(name, low, high)}")
    if kind is float and not math.isfinite(value):
        raise RequestError(field, value, f"a finite number, {_range_text(name, low, high)}")
    too_low = value <= low if name in EXCLUSIVE_LOW else value < low
    if too_low or (high is not None and value > high):
        if name in ("num_beams", "num_return_sequences"):
            raise RequestError(field, value, "only 1 is supported (one answer per prompt, no beam search)")
        raise RequestError(field, value, f"allowed range is {_range_text(name, low, high)}")
    return kind(value)


def _check_stop(value) -> tuple:
    allowed = (
        f"a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
        f"of at most {MAX_STOP_STRING_CHARS} characters"
    )
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or len(items) > MAX_STOP_STRINGS:
        raise RequestError("gen_conf.stop", value, allowed)
    for item in items:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_STOP_STRING_CHARS:
            raise RequestError("gen_conf.stop", value, allowed)
    return tuple(dict.fromkeys(items))


def parse_gen_conf(gen_conf, limits: Limits) -> SamplingSettings:
    """Validate a client's ``gen_conf`` dict; every key must be on the allow-list."""
    if gen_conf is None:
        return SamplingSettings()
    if not isinstance(gen_conf, dict):
        raise RequestError("gen_conf", gen_conf, "an object (dict) of generation settings")
    unknown = sorted(str(key) for key in gen_conf if key not in ALLOWED_GEN_CONF_KEYS)
    if unknown:
        raise RequestError(f"gen_conf.{unknown[0]}", gen_conf[unknown[0]] if unknown[0] in gen_conf else None,
                           f"unknown setting; allowed keys are {', '.join(ALLOWED_GEN_CONF_KEYS)}")
    if "max_tokens" in gen_conf and "max_new_tokens" in gen_conf:
        if gen_conf["max_tokens"] != gen_conf["max_new_tokens"]:
            raise RequestError("gen_conf.max_tokens", gen_conf["max_tokens"],
                               "give either max_tokens or max_new_tokens (they mean the same), not both")
    values = {}
    for name, raw in gen_conf.items():
        if name in BOOLEAN_FIELDS:
            if not isinstance(raw, bool):
                raise RequestError(f"gen_conf.{name}", raw, "true or false")
            values[name] = raw
        elif name == "stop":
            values["stop"] = _check_stop(raw)
        elif name == "continuation":
            values["continuation"] = _check_continuation(raw, limits)
        elif name == "response_format":
            values["response_format"] = parse_response_format(raw, "gen_conf.response_format")
        elif name in ("tools", "tool_choice"):
            continue  # together, below
        else:
            kind, low, high, attribute = _NUMERIC_FIELDS[name]
            if attribute in ("max_new_tokens", "min_new_tokens"):
                high = limits.max_new_tokens_limit
            checked = _check_number(name, raw, kind, low, high)
            if attribute:
                values[attribute] = checked
    if "tools" in gen_conf or "tool_choice" in gen_conf:
        _tools_into(values, gen_conf.get("tools"), gen_conf.get("tool_choice"))
    settings = SamplingSettings(**values)
    if settings.top_logprobs and not settings.logprobs:
        raise RequestError("gen_conf.top_logprobs", settings.top_logprobs, "needs gen_conf.logprobs: true")
    if settings.max_new_tokens is not None and settings.min_new_tokens > settings.max_new_tokens:
        raise RequestError("gen_conf.min_new_tokens", settings.min_new_tokens,
                           f"must not exceed max_new_tokens ({settings.max_new_tokens})")
    return settings


def _check_continuation(value, limits: Limits) -> tuple:
    """The token ids of an answer begun elsewhere: a list of at most max_new_tokens_limit token ids."""
    allowed = (f"a list of at most {limits.max_new_tokens_limit} token ids, each 0 <= id < {limits.vocab_size} "
               "(the answer so far, as a router continuing a stream sends it)")
    if not isinstance(value, list) or len(value) > limits.max_new_tokens_limit:
        raise RequestError("gen_conf.continuation", value if not isinstance(value, list) else
                           f"<{len(value)} ids>", allowed)
    for token in value:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < limits.vocab_size:
            raise RequestError("gen_conf.continuation", token, allowed)
    return tuple(value)


def _tools_into(values: dict, tools, tool_choice) -> None:
    """``tools`` for the template; with tool_choice required or named, the answer is constrained to a call."""
    parsed = parse_tools(tools, tool_choice)
    values["tools"] = parsed
    if parsed is not None and parsed.constrained:
        if values.get("response_format") is not None:
            raise RequestError("gen_conf.tool_choice", tool_choice, "not together with response_format: a forced "
                               "tool call has its own format")
        values["response_format"] = ResponseFormat("lark", call_grammar(parsed))


def fit_to_context(settings: SamplingSettings, prompt_tokens: int, limits: Limits) -> SamplingSettings:
    """Check the prompt's size and settle ``max_new_tokens``: a default is lowered to fit, a value the
    client chose is refused if it does not fit (never lowered silently)."""
    if prompt_tokens > limits.max_prompt_tokens:
        raise RequestError("message", f"<{prompt_tokens} tokens after the chat template>",
                           f"the prompt may have at most {limits.max_prompt_tokens} tokens; shorten it")
    room = limits.context_length - prompt_tokens
    if room < 1:
        raise RequestError("message", f"<{prompt_tokens} tokens after the chat template>",
                           f"the prompt must leave room in the context of {limits.context_length} tokens "
                           "(the model's, or what kv_cache_memory holds)")
    settings = _fit_answer_length(settings, room, prompt_tokens, limits)
    done = len(settings.continuation or ())
    if done >= settings.max_new_tokens:
        raise RequestError("gen_conf.continuation", f"<{done} ids>", f"fewer ids than max_new_tokens "
                           f"({settings.max_new_tokens}): an answer that long is finished")
    return settings


def _fit_answer_length(settings: SamplingSettings, room: int, prompt_tokens: int, limits: Limits) -> SamplingSettings:
    """A default ``max_new_tokens`` lowered to the room left; a chosen one refused when it does not fit."""
    if settings.max_new_tokens is None:
        chosen = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens_limit, room)
        if settings.min_new_tokens > chosen:
            raise RequestError("gen_conf.min_new_tokens", settings.min_new_tokens,
                               f"at most {chosen} tokens fit after this prompt")
        return replace(settings, max_new_tokens=chosen)
    if settings.max_new_tokens > room:
        raise RequestError("gen_conf.max_new_tokens", settings.max_new_tokens,
                           f"prompt ({prompt_tokens} tokens) + max_new_tokens must fit the context of "
                           f"{limits.context_length} tokens (the model's, or what kv_cache_memory holds): at most "
                           f"{room} here")
    return settings


def validate_messages(message, limits: Limits) -> list:
    """``message`` must be a non-empty list of ``{"role": str, "content": str}``."""
    if not isinstance(message, list) or not message:
        raise RequestError("message", message, 'a non-empty list of {"role": str, "content": str} objects')
    if len(message) > limits.max_messages:
        raise RequestError("message", f"<{len(message)} messages>", f"at most {limits.max_messages} messages")
    total_chars = 0
    for index, item in enumerate(message):
        field = f"message[{index}]"
        extra = MESSAGE_TOOL_KEYS.get(item.get("role"), set()) if isinstance(item, dict) else set()
        if not isinstance(item, dict) or not {"role", "content"} <= set(item) <= {"role", "content"} | extra:
            raise RequestError(field, item, 'an object with the keys "role" and "content" (assistant: also '
                               '"tool_calls"; tool: also "tool_call_id" and "name")')
        role, content = item["role"], item["content"]
        if role not in ALLOWED_ROLES:
            raise RequestError(f"{field}.role", role, f"one of {', '.join(ALLOWED_ROLES)}")
        if not isinstance(content, str) and not (content is None and item.get("tool_calls")):
            raise RequestError(f"{field}.content", content, "a string (null only beside tool_calls)")
        total_chars += len(content or "") + _check_tool_fields(item, field)
        if total_chars > limits.max_prompt_chars:
            raise RequestError("message", f"<more than {limits.max_prompt_chars} characters>",
                               f"at most {limits.max_prompt_chars} characters of content in all")
    return [{"role": item["role"], "content": item["content"] or "",
             **{key: item[key] for key in MESSAGE_TOOL_KEYS.get(item["role"], ()) if key in item}} for item in message]


MESSAGE_TOOL_KEYS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id", "name"}}


def _check_tool_fields(item: dict, field: str) -> int:
    """Characters of the tool fields (counted with the content); RequestError when malformed."""
    size = 0
    for key in ("tool_call_id", "name"):
        if key in item:
            if not isinstance(item[key], str) or len(item[key]) > 256:
                raise RequestError(f"{field}.{key}", item[key], "a string of at most 256 characters")
            size += len(item[key])
    calls = item.get("tool_calls")
    if calls is None:
        return size
    allowed = 'a list of {"id": str, "type": "function", "function": {"name": str, "arguments": JSON string or object}}'
    if not isinstance(calls, list) or len(calls) > 64:
        raise RequestError(f"{field}.tool_calls", calls, allowed)
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), (str, dict)):
            raise RequestError(f"{field}.tool_calls[{index}]", call, allowed)
        size += len(function["name"]) + len(str(function["arguments"]))
    return size
