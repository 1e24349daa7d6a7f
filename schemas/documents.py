from typing import Optional

from docarray import BaseDoc


class Prompt(BaseDoc):
    """A chat: ``message`` is a list of ``{"role", "content"}``; ``gen_conf`` holds generation settings."""

    message: list[dict]
    gen_conf: dict = {}


class Generation(BaseDoc):
    """A whole answer (``/chat``) or one piece of it (``/stream``).

    Only ``text`` is required; clients that declare just ``text`` keep working. ``finish_reason`` is
    set on the last piece: ``stop`` (EOS or a stop string), ``length`` (max_new_tokens) or ``time_limit``.
    """

    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    # With gen_conf.logprobs: per token of this text, {"token", "logprob", "bytes", "top_logprobs": [...]}.
    logprobs: Optional[list[dict]] = None
    # Only for a router that may continue the stream on another replica (it sent gen_conf.continuation, and
    # takes this out again before the client sees the piece): the answer's token ids in this piece.
    token_ids: Optional[list[int]] = None
