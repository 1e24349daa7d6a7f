"""executor/metrics.py on its own: the engine's metrics in a registry of their own, as a scrape reads them."""

import torch
from prometheus_client import CollectorRegistry, generate_latest

from executor.kv_cache import BatchKV, LayerShape
from executor.metrics import EngineMetrics

SHAPES = [LayerShape(kv_heads=2, key_dim=3, value_dim=3, dtype=torch.float32)] * 2  # 96 bytes a token
CPU = torch.device("cpu")


def tokens(length: int) -> list:
    return [(torch.ones(2, length, 3), torch.ones(2, length, 3)) for _ in SHAPES]


def test_kv_copies_are_counters_by_cause_read_from_the_batch_at_each_scrape():
    registry = CollectorRegistry()
    batch = BatchKV(SHAPES, max_rows=4, columns=64, device=CPU)
    EngineMetrics(registry, lambda: {"waiting": 0, "prefilling": 0, "running": batch.rows}, batch.copy_stats)
    value = registry.get_sample_value
    assert value("jina_llm_stream_kv_copied_bytes_total", {"cause": "join"}) == 0
    batch.add_row(tokens(3), 3)
    batch.add_row(tokens(5), 5)  # longer than the write column: the running row's 3 tokens move first
    batch.add_row(tokens(2), 2)
    batch.remove_rows([0])  # the last row fills the hole: 5 columns
    assert value("jina_llm_stream_kv_copied_bytes_total", {"cause": "join"}) == (3 + 3 + 5 + 2) * 96
    assert value("jina_llm_stream_kv_copied_bytes_total", {"cause": "leave"}) == 5 * 96
    assert value("jina_llm_stream_kv_copied_bytes_total", {"cause": "move"}) == 0
    assert value("jina_llm_stream_kv_copied_bytes_total", {"cause": "staged"}) == 0
    assert value("jina_llm_stream_kv_rows_total", {"event": "join"}) == 3
    assert value("jina_llm_stream_kv_rows_total", {"event": "leave"}) == 1
    assert value("jina_llm_stream_kv_moves_total", {"at": "join"}) == 1
    assert value("jina_llm_stream_kv_moves_total", {"at": "step"}) == 0
    assert value("jina_llm_stream_kv_moved_bytes_total", {"at": "join"}) == 3 * 96
    assert value("jina_llm_stream_kv_moved_bytes_total", {"at": "step"}) == 0
    batch.add_row(tokens(30), 30)  # 2 rows x 5 live tokens move for it
    batch.remove_rows([2])  # the 30-token row leaves (the last row: no copy); 25 columns of padding remain
    batch.start_step(1)  # compaction: 2 rows x 5 live tokens move back
    assert value("jina_llm_stream_kv_moves_total", {"at": "join"}) == 2
    assert value("jina_llm_stream_kv_moves_total", {"at": "step"}) == 1
    assert value("jina_llm_stream_kv_moved_bytes_total", {"at": "join"}) == (3 + 10) * 96
    assert value("jina_llm_stream_kv_moved_bytes_total", {"at": "step"}) == 10 * 96
    assert value("jina_llm_stream_kv_copied_bytes_total", {"cause": "move"}) == 10 * 96
    text = generate_latest(registry).decode()
    assert "# TYPE jina_llm_stream_kv_copied_bytes_total counter" in text
    assert 'jina_llm_stream_kv_copied_bytes_total{cause="leave"} 480.0' in text
    assert value("jina_llm_stream_batch_size") == 2
    assert value("jina_llm_stream_kv_rows_total", {"event": "leave"}) == 2


def test_without_a_kv_cache_the_other_metrics_stand_alone():
    registry = CollectorRegistry()
    EngineMetrics(registry, lambda: {"waiting": 1, "prefilling": 0, "running": 0})
    assert registry.get_sample_value("jina_llm_stream_queue_depth") == 1
    assert registry.get_sample_value("jina_llm_stream_kv_copied_bytes_total", {"cause": "join"}) is None


def test_kv_pool_holders_are_read_at_each_scrape_and_preemptions_are_counted_by_reason():
    from executor.kv_cache import PrefixCache
    from executor.kv_pool import KVPool

    registry = CollectorRegistry()
    pool = KVPool(SHAPES, 64, block_size=4, device=CPU)
    batch = BatchKV(SHAPES, 4, 8, CPU, pool, max_columns=32)
    cache = PrefixCache(SHAPES, 0, 4, CPU, pool)

    def usage():
        held, cached = pool.batch_blocks * 4, len(cache) * 4
        return {"batch": held, "prefix_cache": cached, "free": pool.tokens - held - cached}

    metrics = EngineMetrics(registry, lambda: {"waiting": 0, "prefilling": 0, "running": batch.rows}, None, usage,
                            pool.resident_bytes)
    value = registry.get_sample_value
    assert value("jina_llm_stream_kv_pool_tokens", {"holder": "free"}) == 64
    assert value("jina_llm_stream_kv_pool_resident_bytes") == 0  # nothing written yet: no page in memory
    batch.add_row(tokens(5), 5)
    cache.insert(list(range(8)), 8, lambda a, b: [(k[:, a:b], v[:, a:b]) for k, v in tokens(8)])
    assert [value("jina_llm_stream_kv_pool_tokens", {"holder": h}) for h in ("batch", "prefix_cache", "free")] == \
        [8, 8, 48]
    assert value("jina_llm_stream_kv_pool_resident_bytes") > 0
    metrics.preempted("kv_pool")
    metrics.preempted("kv_pool")
    metrics.preempted("fairness")
    assert value("jina_llm_stream_preemptions_total", {"reason": "kv_pool"}) == 2
    assert value("jina_llm_stream_preemptions_total", {"reason": "fairness"}) == 1


def test_routing_metrics_count_routes_by_reason_and_migrations_by_outcome():
    from prometheus_client import CollectorRegistry, generate_latest

    from executor.metrics import RoutingMetrics
    from executor.router import Route

    registry = CollectorRegistry()
    metrics = RoutingMetrics(registry)
    before = generate_latest(registry).decode()
    assert 'jina_llm_stream_routed_requests_total{reason="prefix"} 0.0' in before  # there from the start
    assert 'jina_llm_stream_migrations_total{outcome="no_replica"} 0.0' in before
    for reason in ("prefix", "prefix", "least_loaded"):
        metrics.route(Route("a", reason, 0))
    metrics.migration("reissued")
    text = generate_latest(registry).decode()
    assert 'jina_llm_stream_routed_requests_total{reason="prefix"} 2.0' in text
    assert 'jina_llm_stream_routed_requests_total{reason="least_loaded"} 1.0' in text
    assert 'jina_llm_stream_migrations_total{outcome="reissued"} 1.0' in text


def test_a_replica_that_could_not_be_reached_is_not_a_cut_answer():
    import grpc

    from executor.jina_compat import _died_under

    class Error:
        def __init__(self, code, details):
            self.code, self.details = (lambda: code), (lambda: details)

    assert _died_under(Error(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert not _died_under(Error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: "
                                                              "UNKNOWN: ipv4:127.0.0.1:1: Connection refused"))
    assert not _died_under(Error(grpc.StatusCode.INVALID_ARGUMENT, "bad"))
