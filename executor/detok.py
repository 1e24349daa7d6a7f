"""Incremental detokenization and stop-string hold-back.

Pure functions and a tiny state holder, no model and no Jina: the engine feeds token ids in, gets text
deltas out. Two rules make the joined deltas equal ``decode(all_ids)`` exactly:

* Decode a small window (TGI's prefix/read offsets) and emit only the part after the window's already
  emitted prefix, so tokenizers that strip the first token's leading space (SentencePiece "▁") do so on
  both sides of the subtraction and the space survives.
* Hold back while the text ends in U+FFFD: the last token ended in the middle of a multi-byte character
  and the next one completes it. SentencePiece byte-fallback pieces (``<0xE2>``) are decoded as a group,
  so a trailing one is held back too until a normal piece follows. At the end everything is flushed.
"""

import functools
import re
from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"
DECODE_KWARGS = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def decode(tokenizer, ids) -> str:
    """The one way this service turns ids into text (``/chat`` and ``/stream`` both end up here)."""
    return tokenizer.decode(ids, **DECODE_KWARGS)


@functools.lru_cache(maxsize=16)
def _token_kinds(tokenizer) -> tuple:
    """(byte-fallback ids, special ids). A byte piece's text depends on the byte pieces next to it, and
    special tokens are skipped by the decode, so they do not separate two byte pieces."""
    pattern = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    byte_ids = frozenset(i for piece, i in tokenizer.get_vocab().items() if pattern.fullmatch(piece))
    return byte_ids, frozenset(tokenizer.all_special_ids)


def ends_in_byte_piece(tokenizer, ids) -> bool:
    byte_ids, special_ids = _token_kinds(tokenizer)
    if not byte_ids:
        return False
    for token in reversed(ids):
        if token not in special_ids:
            return token in byte_ids
    return False


def decode_delta(tokenizer, ids, prefix_offset: int, read_offset: int, final: bool = False):
    """Return ``(delta, prefix_offset, read_offset)`` for ``ids`` (all generated ids so far).

    ``ids[prefix_offset:read_offset]`` is the window whose text was already emitted. When nothing can be
    emitted yet the offsets are returned unchanged, so the next call retries with one more token.
    """
    if not final and ends_in_byte_piece(tokenizer, ids):
        return "", prefix_offset, read_offset
    prefix_text = decode(tokenizer, ids[prefix_offset:read_offset])
    new_text = decode(tokenizer, ids[prefix_offset:])
    if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
        return new_text[len(prefix_text):], read_offset, len(ids)
    return "", prefix_offset, read_offset


def held_back_length(text: str, stop_strings) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


def find_stop(text: str, stop_strings, search_from: int):
    """Index of the earliest stop string that starts at or after ``search_from``, or None."""
    hits = [index for index in (text.find(stop, search_from) for stop in stop_strings) if index >= 0]
    return min(hits) if hits else None


@dataclass
class IncrementalDetokenizer:
    """Per-request state: ids so far, decode offsets, text so far and how much of it was emitted.

    ``push`` returns the text that is safe to send now. A stop string is cut before it is ever sent
    (vLLM's rule: never stream, then retract); ``stopped`` tells the engine to finish the request.
    """

    tokenizer: object
    stop_strings: tuple = ()
    ids: list = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Everything not yet sent, at the end of the answer (EOS, length, or a time limit)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        delta, self._prefix_offset, self._read_offset = decode_delta(
            self.tokenizer, self.ids, self._prefix_offset, self._read_offset, final
        )
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop_strings), default=0) + 1)
        self.text += delta
        stop_at = find_stop(self.text, self.stop_strings, search_from) if self.stop_strings else None
        if stop_at is not None:
            self.stopped = True
            self.text = self.text[:stop_at]
            safe_end = stop_at
        elif final:
            safe_end = len(self.text)
        else:
            safe_end = len(self.text) - held_back_length(self.text, self.stop_strings)
        out = self.text[self.emitted:safe_end]
        self.emitted = max(self.emitted, safe_end)
        return out


def sent_text(tokenizer, stop_strings, ids) -> str:
    """The text a stream of the answer ``ids`` has sent (a possible stop string's start held back is not):
    what a continuation of them starts after."""
    detok = IncrementalDetokenizer(tokenizer, tuple(stop_strings))
    for token in ids:
        detok.push(token)
    return detok.text[:detok.emitted]
