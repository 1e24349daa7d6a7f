"""Prometheus metrics of the engine, registered in Jina's own registry (``--monitoring``)."""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineMetrics:
    """Called by the engine thread; each call is a few microseconds."""

    def __init__(self, registry, load):
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
        queue = Gauge(f"{prefix}_queue_depth", "Requests waiting for a batch slot", registry=registry)
        batch = Gauge(f"{prefix}_batch_size", "Requests in the running batch (prefilling or decoding)",
                      registry=registry)
        queue.set_function(lambda: load()["waiting"])
        batch.set_function(lambda: load()["running"] + load()["prefilling"])

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.inter_token.observe(seconds)

    def finished(self, endpoint: str, outcome: str, prompt_tokens: int, new_tokens: int, cached_tokens: int = 0) -> None:
        self.requests.labels(endpoint or "-", outcome).inc()
        self.prompt.inc(prompt_tokens)
        self.cached.inc(cached_tokens)
        self.generated.inc(new_tokens)
