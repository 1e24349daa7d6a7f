"""Prefix-aware routing: which replica a request goes to, so that requests sharing a prefix meet its cache.

Each replica keeps its own prefix cache (executor/kv_cache.py), so a chat's second turn, or the next question
behind the same RAG passages, is cheap only on the replica that served the first. The router remembers, per
replica, the prefixes it sent there and sends each request to the replica holding the longest of its prefix,
unless that replica is overloaded against the others; without a match worth having it goes to the least
loaded one (SGLang's cache-aware router, at block granularity).

The gateway has no tokenizer, so prefixes are text: a request's messages as one canonical string (role and
content of each, in order; a chat's earlier turns are a prefix of its later ones), cut into blocks of
``BLOCK_CHARS`` characters, each block's hash chained to the one before (as the prefix cache's block hashes
are). A replica's remembered blocks are bounded and evicted least recently used first. Nothing here knows
Jina or HTTP: the gateways call ``choose`` with a request's messages and ``finished`` when it is done.
"""

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("jina_llm_stream.router")

BLOCK_CHARS = 64
# A match shorter than this is not worth unbalancing the load for: the replica recomputes a few blocks (about
# MIN_REUSED_TOKENS of executor/kv_manager.py, at ~4 characters a token).
MIN_MATCH_CHARS = 256
# A replica is overloaded when it has this many requests in flight more than the least loaded one, or more
# than twice as many when that is more: one hot prefix cannot pin all load on one replica.
LOAD_SLACK = 4
BLOCKS_PER_REPLICA = 1 << 16  # 64k blocks x 64 characters: prompts of 4 MB of text per replica, ~8 MB of memory
ROUTING_CHOICES = ("prefix", "round_robin")  # --routing: this router, or Jina's replicas in turn
ROUTING_ENV = "JINA_LLM_STREAM_ROUTING"  # how --routing reaches the gateway's process
# How often one request may be continued on another replica when its replica dies mid-stream (--migrations).
DEFAULT_MIGRATIONS = 1
MIGRATIONS_ENV = "JINA_LLM_STREAM_MIGRATIONS"  # how --migrations reaches the gateway's process


def migrations() -> int:
    """The gateway's bound on continuations per request (jina_server.py's --migrations), 0 or more."""
    import os

    try:
        return max(0, int(os.environ.get(MIGRATIONS_ENV, DEFAULT_MIGRATIONS)))
    except ValueError:
        return DEFAULT_MIGRATIONS


def routing_text(messages) -> str:
    """The canonical text of a chat: each message's role and text content, in order (a list of content parts
    contributes its text parts). Separators that cannot occur in JSON text keep turns from running together."""
    parts = []
    for message in messages or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(f"{message.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e")
    return "".join(parts)


def block_hashes(text: str, block: int = BLOCK_CHARS) -> list:
    """Chained hashes of the whole blocks of ``text``: the i-th stands for the first i + 1 blocks."""
    hashes, running = [], 0
    for start in range(0, len(text) - block + 1, block):
        running = hash((running, text[start:start + block]))
        hashes.append(running)
    return hashes


class _Remembered:
    """One replica's remembered block hashes, least recently used first."""

    def __init__(self, capacity: int):
        self.capacity, self.blocks = capacity, OrderedDict()

    def matched(self, hashes: list) -> int:
        """Leading blocks of ``hashes`` this replica was sent (a chained hash stands for its whole prefix, so
        the first miss ends the match)."""
        count = 0
        for block_hash in hashes:
            if block_hash not in self.blocks:
                break
            count += 1
        return count

    def add(self, hashes: list) -> None:
        for block_hash in hashes:
            self.blocks[block_hash] = None
            self.blocks.move_to_end(block_hash)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


@dataclass(frozen=True)
class Route:
    replica: str
    reason: str  # "prefix" (the longest match) or "least_loaded" (no match worth it, or the best overloaded)
    matched_chars: int


class PrefixRouter:
    """Chooses among ``replicas`` (any hashable names: addresses) and counts what each has in flight."""

    REASONS = ("prefix", "least_loaded")

    def __init__(self, replicas: list, capacity: int = BLOCKS_PER_REPLICA, on_route=None):
        self._lock = threading.Lock()  # gateways may route from several threads
        self._capacity = capacity
        self._remembered = {replica: _Remembered(capacity) for replica in replicas}
        self._in_flight = dict.fromkeys(replicas, 0)
        self._turn = 0  # breaks ties between equally loaded replicas in turn
        self._on_route = on_route  # called with each Route (metrics)

    def sync(self, replicas) -> None:
        """The replicas now reachable: new ones start with nothing remembered, gone ones are forgotten."""
        with self._lock:
            for replica in replicas:
                if replica not in self._in_flight:
                    self._remembered[replica] = _Remembered(self._capacity)
                    self._in_flight[replica] = 0
            for replica in [r for r in self._in_flight if r not in replicas]:
                del self._remembered[replica], self._in_flight[replica]

    @property
    def replicas(self) -> list:
        return list(self._in_flight)

    def in_flight(self, replica) -> int:
        return self._in_flight[replica]

    def choose(self, messages, exclude=()) -> Route:
        """The replica for a request with these messages (not one of ``exclude``: replicas that failed it);
        counts it in flight there until ``finished``."""
        hashes = block_hashes(routing_text(messages))
        with self._lock:
            candidates = [r for r in self._in_flight if r not in exclude] or list(self._in_flight)
            route = self._pick(candidates, hashes)
            self._remembered[route.replica].add(hashes)
            self._in_flight[route.replica] += 1
        log.debug("routed to %s: %s (%d characters matched)", route.replica, route.reason, route.matched_chars)
        if self._on_route is not None:
            self._on_route(route)
        return route

    def finished(self, replica) -> None:
        with self._lock:
            if self._in_flight.get(replica, 0) > 0:
                self._in_flight[replica] -= 1

    def _pick(self, candidates: list, hashes: list) -> Route:
        least = min(self._in_flight[r] for r in candidates)
        bound = least + max(LOAD_SLACK, least)
        matches = {r: self._remembered[r].matched(hashes) for r in candidates}
        best = max(candidates, key=lambda r: (matches[r], -self._in_flight[r]))
        matched_chars = matches[best] * BLOCK_CHARS
        if matched_chars >= MIN_MATCH_CHARS and self._in_flight[best] < bound:
            return Route(best, "prefix", matched_chars)
        idle = [r for r in candidates if self._in_flight[r] == least]
        self._turn += 1
        chosen = idle[self._turn % len(idle)]
        return Route(chosen, "least_loaded", matches[chosen] * BLOCK_CHARS)
