"""Run by test_prefix_caching.py in a fresh process: a burst of long requests against a small KV budget,
with the process's resident memory sampled throughout, the KV pool's part (its pages arrive as they are
written: kv_pool.lazy_zeros) apart from the rest. Prints one JSON line."""

import asyncio
import ctypes
import gc
import json
import sys
import threading
import time

import psutil
import torch

from executor.engine import Engine, EngineConfig
from executor.model import load
from executor.validation import Limits, fit_to_context, parse_gen_conf


def main(model_path: str, budget: int) -> None:
    lm = load(model_path)
    process = psutil.Process()
    with torch.inference_mode():  # grow the allocator to a prefill chunk's working size before the baseline
        lm.model(torch.ones((1, 1024), dtype=torch.long), use_cache=True, logits_to_keep=1)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = process.memory_info().rss
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids,
                    EngineConfig(max_batch_size=16, max_context=1024, kv_cache_memory=budget)).start()
    peak, pool_peak, rows, running = [baseline], [0], [0], [True]

    def rest() -> int:
        """The process's resident bytes but the pool's."""
        pool = engine.kv_resident_bytes()
        pool_peak[0] = max(pool_peak[0], pool)
        return process.memory_info().rss - pool

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rest())
            rows[0] = max(rows[0], engine.load()["running"] + engine.load()["prefilling"])
            time.sleep(0.002)

    limits = Limits(context_length=1024)
    prompts = [[100 + (7 * i + j) % 500 for j in range(700)] for i in range(7)]

    async def ask(prompt_ids):
        settings = fit_to_context(parse_gen_conf({"max_new_tokens": 150, "min_new_tokens": 150}, limits),
                                  len(prompt_ids), limits)
        return [event async for event in engine.stream(prompt_ids, settings)][-1]

    async def burst():
        return await asyncio.gather(*(ask(p) for p in prompts[1:]))

    asyncio.run(ask(prompts[0]))  # one request alone: the budget plus one request's working memory
    after_one = rest()
    sampler = threading.Thread(target=sample)
    sampler.start()
    finals = asyncio.run(burst())
    running[0] = False
    sampler.join()
    engine.shutdown()
    print(json.dumps({"baseline": baseline, "after_one": after_one, "peak": peak[0], "pool_peak": pool_peak[0], "budget": budget, "rows": engine.max_rows,
                      "busiest": rows[0], "plan_bytes": engine.plan.pool_bytes, "pool_tokens": engine.plan.pool_tokens,
                      "preemptions": engine.preemptions,
                      "finishes": [f.finish_reason for f in finals], "tokens": [f.completion_tokens for f in finals]}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
