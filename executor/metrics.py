"""Prometheus metrics of the engine, registered in Jina's own registry (``--monitoring``)."""

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineMetrics:
    """Called by the engine thread; each call is a few microseconds."""

    def __init__(self, registry, load, kv_copies=None, kv_usage=None, kv_resident=None):
        prefix = "jina_llm_stream"
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram(f"{prefix}_inter_token_latency_seconds", "Time between two tokens of a request",
                                     buckets=_LATENCY_BUCKETS, registry=registry)
        self.generated = Counter(f"{prefix}_generated_tokens", "Tokens generated", registry=registry)
        self.prompt = Counter(f"{prefix}_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.cached = Counter(f"{prefix}_cached_prompt_tokens", "Prompt tokens served from the prefix cache "
                              "(a part of the prompt tokens)", registry=registry)
        self.requests = Counter(f"{prefix}_requests", "Finished requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=registry)
        self.drafted = Counter(f"{prefix}_draft_tokens", "Tokens drafted by speculative decoding (--speculate) "
                               "and verified", registry=registry)
        self.draft_accepted = Counter(f"{prefix}_draft_accepted_tokens", "Drafted tokens the model accepted (each "
                                      "saved a decode step)", registry=registry)
        self.preemptions = Counter(f"{prefix}_preemptions", "Rows given back and recomputed later, by reason: "
                                   "kv_pool (the KV pool was short for the running rows' next tokens: the newest "
                                   "row waits again) or fairness (a request with nothing running took a row from "
                                   "the request holding the most)", ["reason"], registry=registry)
        queue = Gauge(f"{prefix}_queue_depth", "Requests waiting for a batch slot", registry=registry)
        batch = Gauge(f"{prefix}_batch_size", "Requests in the running batch (prefilling or decoding)",
                      registry=registry)
        queue.set_function(lambda: load()["waiting"])
        batch.set_function(lambda: load()["running"] + load()["prefilling"])
        if kv_copies is not None:
            registry.register(_KVCopies(prefix, kv_copies))
        if kv_usage is not None:
            pool = Gauge(f"{prefix}_kv_pool_tokens", "Token slots of the KV pool (kv_pool.py) by holder: batch "
                         "(the running rows, at the columns of the longest), prefix_cache (cached blocks) or free",
                         ["holder"], registry=registry)
            for holder in ("batch", "prefix_cache", "free"):
                pool.labels(holder).set_function(lambda holder=holder: kv_usage()[holder])
        if kv_resident is not None:
            Gauge(f"{prefix}_kv_pool_resident_bytes", "Bytes of the KV pool in memory: on a CPU its pages arrive as "
                  "they are first written (kv_pool.lazy_zeros), so this grows with the tokens held, up to the pool's "
                  "size", registry=registry).set_function(kv_resident)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.inter_token.observe(seconds)

    def finished(self, endpoint: str, outcome: str, prompt_tokens: int, new_tokens: int, cached_tokens: int = 0) -> None:
        self.requests.labels(endpoint or "-", outcome).inc()
        self.prompt.inc(prompt_tokens)
        self.cached.inc(cached_tokens)
        self.generated.inc(new_tokens)

    def preempted(self, reason: str) -> None:
        self.preemptions.labels(reason).inc()

    def speculated(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.draft_accepted.inc(accepted)


class _KVCopies(Collector):
    """What the running batch's KV cache copied (``BatchKV.copy_stats``), read when scraped: the engine only
    adds integers."""

    def __init__(self, prefix: str, stats):
        self.prefix, self.stats = prefix, stats

    def collect(self):
        stats = self.stats()
        copied = CounterMetricFamily(f"{self.prefix}_kv_copied_bytes", "Bytes of keys and values the running "
                                     "batch's KV cache copied, by cause: join (a row's own tokens and any move of "
                                     "the live columns it forced), staged (a prompt being prefilled moved to "
                                     "another row), leave (the last row moved into a leaving row's place), move "
                                     "(the live columns moved at a step), resize (rows laid out longer or shorter), hit (cached blocks "
                                     "copied into a row: models whose attention cannot read them in place)",
                                     labels=["cause"])
        for cause, value in stats["copied_bytes"].items():
            copied.add_metric([cause], value)
        rows = CounterMetricFamily(f"{self.prefix}_kv_rows", "Rows that joined or left the running batch",
                                   labels=["event"])
        rows.add_metric(["join"], stats["joins"])
        rows.add_metric(["leave"], stats["leaves"])
        moves = CounterMetricFamily(f"{self.prefix}_kv_moves", "Moves of the running batch's live columns (each "
                                    "copies every row), forced by a joining row or at a step", labels=["at"])
        moves.add_metric(["join"], stats["moves"] - stats["step_moves"])
        moves.add_metric(["step"], stats["step_moves"])
        moved = CounterMetricFamily(f"{self.prefix}_kv_moved_bytes", "Bytes those moves copied (at a join: a part "
                                    "of kv_copied_bytes{cause=\"join\"}; at a step: all of cause=\"move\")",
                                    labels=["at"])
        moved.add_metric(["join"], stats["join_moved_bytes"])
        moved.add_metric(["step"], stats["copied_bytes"]["move"])
        return [copied, rows, moves, moved]


class RoutingMetrics:
    """The routers' counters, in the registry of the process that routes (the Jina gateway's for Jina's protocols,
    the OpenAI router's for the OpenAI API): where each request went and why, and what became of requests whose
    replica died under them. Every label value is there from the start, at 0, so a rate over it is defined."""

    REASONS = ("prefix", "least_loaded")  # executor/router.py's Route.reason
    # continued: a stream went on on another replica; reissued: a whole answer (/chat, a non-streamed completion)
    # was sent again from its start to another replica; exhausted: no migration was left (--migrations), the
    # client got the error; no_replica: no other replica could take it, the client got the error.
    OUTCOMES = ("continued", "reissued", "exhausted", "no_replica")

    def __init__(self, registry):
        prefix, self.registry = "jina_llm_stream", registry
        self.routed = Counter(f"{prefix}_routed_requests", "Requests sent to a replica, by why that one: prefix "
                              "(it was sent the longest prefix of the messages) or least_loaded", ["reason"],
                              registry=registry)
        self.migrations = Counter(f"{prefix}_migrations", "Requests whose replica died under them, by outcome: "
                                  "continued, reissued, exhausted, no_replica", ["outcome"], registry=registry)
        for reason in self.REASONS:
            self.routed.labels(reason)
        for outcome in self.OUTCOMES:
            self.migrations.labels(outcome)

    def route(self, route) -> None:
        self.routed.labels(route.reason).inc()

    def migration(self, outcome: str) -> None:
        self.migrations.labels(outcome).inc()


class NoRoutingMetrics:
    """RoutingMetrics' calls where nothing is scraped (no --monitoring)."""

    def route(self, route) -> None:
        pass

    def migration(self, outcome: str) -> None:
        pass
