"""The errors that cross rooms: a client's mistake, a full queue, a failed generation.

Imports nothing: validation, grammar, tools, the engine and the Executor all raise these, and the
Executor's one error boundary decides what a client sees for each.
"""


class RequestError(ValueError):
    """A client mistake, reported to that client; the server carries on."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.allowed = field, allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}={shown} is not allowed: {allowed}")


class ServerBusyError(RuntimeError):
    """The queue is full: the client should retry later."""


class EngineError(RuntimeError):
    """The model failed while working on this request (e.g. out of memory); other requests go on."""


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the server must not start."""
