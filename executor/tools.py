"""Tool calls: the ``tools`` a request offers, how they reach the prompt, and the calls found in an answer.

The format is the widely used one of Hermes and Qwen2.5 templates: the model answers a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. A chat template that knows tools gets them
through ``apply_chat_template(tools=...)``; for one that does not, ``plain_messages`` writes them into the
system message in that format, earlier calls into the assistant's text and tool answers as
``<tool_response>`` user turns. ``tool_choice`` ``required`` or a named function constrains the answer to a
call whose arguments follow the function's ``parameters`` schema (``call_grammar``, a llguidance grammar);
``auto`` lets the model choose, and ``parse_tool_calls`` finds the calls it made.
"""

import json
import re
import uuid
from dataclasses import dataclass

from .errors import RequestError

MAX_TOOLS = 64
MAX_TOOLS_CHARS = 65_536
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class Tools:
    """Validated ``tools`` (OpenAI's list of functions) and ``tool_choice`` (none, auto, required or a name)."""

    functions: tuple  # ({"name", "description", "parameters"}, ...)
    choice: str  # "none" | "auto" | "required" | "function:<name>"

    @property
    def names(self) -> list:
        return [f["name"] for f in self.functions]

    @property
    def for_template(self) -> list:
        return [{"type": "function", "function": dict(f)} for f in self.functions]

    @property
    def constrained(self) -> bool:
        return self.choice == "required" or self.choice.startswith("function:")


def parse_tools(tools, tool_choice, field: str = "gen_conf") -> Tools | None:
    """RequestError naming ``{field}.tools`` / ``{field}.tool_choice`` for anything malformed."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError(f"{field}.tool_choice", tool_choice, "needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise RequestError(f"{field}.tools", tools, f"a list of at most {MAX_TOOLS} function tools")
    if len(json.dumps(tools)) > MAX_TOOLS_CHARS:
        raise RequestError(f"{field}.tools", f"<{len(json.dumps(tools))} characters>",
                           f"at most {MAX_TOOLS_CHARS} characters of JSON")
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not NAME.match(function["name"]):
            raise RequestError(f"{field}.tools[{index}]", tool, '{"type": "function", "function": {"name": '
                               '"letters, digits, _ . - (at most 64)", "description": ..., "parameters": {...}}}')
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise RequestError(f"{field}.tools[{index}].function.parameters", parameters, "a JSON schema object")
        functions.append({"name": function["name"], "description": str(function.get("description", "")),
                          "parameters": parameters})
    names = [f["name"] for f in functions]
    return Tools(tuple(functions), _choice(tool_choice, names, field))


def _choice(tool_choice, names: list, field: str) -> str:
    if tool_choice is None:
        return "auto"
    if tool_choice in ("none", "auto", "required"):
        return tool_choice
    name = None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
    if name not in names:
        raise RequestError(f"{field}.tool_choice", tool_choice, 'none, auto, required or {"type": "function", '
                           f'"function": {{"name": one of {names}}}}}')
    return f"function:{name}"


def strict_objects(schema):
    """The schema with ``"additionalProperties": false`` on each object that names its properties and says nothing
    of others (OpenAI's strict function calling; xgrammar's strict mode in vLLM): a forced call's arguments hold
    the function's own properties, not ones a small model invents (the default model in int8 copied the
    schema's "type" and "description" into the arguments until max_tokens cut the JSON). Only subschemas are
    visited (a property may be named like a keyword)."""
    if not isinstance(schema, dict):
        return schema
    strict = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            strict[key] = {name: strict_objects(value) for name, value in schema[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            strict[key] = [strict_objects(value) for value in schema[key]]
    for key in ("items", "not", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            strict[key] = strict_objects(schema[key])
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        strict["additionalProperties"] = False
    return strict


def call_grammar(tools: Tools) -> str:
    """A llguidance (Lark) grammar: exactly one call of an allowed function, its arguments valid for it."""
    allowed = tools.names if tools.choice == "required" else [tools.choice.split(":", 1)[1]]
    calls = [{"type": "object",
              "properties": {"name": {"const": f["name"]}, "arguments": strict_objects(f["parameters"])},
              "required": ["name", "arguments"], "additionalProperties": False}
             for f in tools.functions if f["name"] in allowed]
    schema = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
              "anyOf": calls}
    return 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)


def parse_tool_calls(text: str, tools: Tools) -> tuple:
    """(content without the calls or None, [OpenAI tool_calls]) of an answer; text that only looks like a
    call (not JSON, an unknown function) stays content."""
    calls, kept, last = [], [], 0
    for match in CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not (isinstance(call, dict) and call.get("name") in tools.names and isinstance(call.get("arguments"), dict)):
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
    content = ("".join(kept) + text[last:]).strip() if calls else text
    return (content or None), calls


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def plain_messages(messages: list, tools: Tools | None) -> list:
    """For a template without tool support: tools in the system message, calls and answers as text."""
    plain = []
    for message in messages:
        content = message.get("content") or ""
        if message["role"] == "assistant" and message.get("tool_calls"):
            content += "".join("\n<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                               "arguments": _arguments(c["function"]["arguments"])})
                               + "\n</tool_call>" for c in message["tool_calls"])
            plain.append({"role": "assistant", "content": content.strip()})
        elif message["role"] == "tool":
            plain.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            plain.append({"role": message["role"], "content": content})
    if tools is not None:
        described = "\n".join(json.dumps(t) for t in tools.for_template)
        preamble = ("You may call functions to answer. The functions, as JSON schemas:\n<tools>\n" + described +
                    "\n</tools>\nTo call one, answer with <tool_call>\n{\"name\": <function name>, \"arguments\": "
                    "<arguments object>}\n</tool_call>")
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + preamble}
        else:
            plain.insert(0, {"role": "system", "content": preamble})
    return plain


def for_template(messages: list) -> list:
    """Messages for a template that knows tools: each call's arguments as an object, as templates expect."""
    rendered = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                     for c in message["tool_calls"]]
            message = {**message, "tool_calls": calls}
        rendered.append(message)
    return rendered


def _arguments(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
