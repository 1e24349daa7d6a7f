"""``bench.py --only memory`` (and a part of the full run): the KV pool (executor/kv_pool.py) with the default
model, SmolLM2-135M-Instruct (46,080 bytes of keys and values per token).

- 32 concurrent short chats (one-line question, 64-token greedy answers) through the OpenAI API, under
  ``--kv-cache-memory 1GiB`` and under the default budget, same run; the start-up line's pool of each.
- The prefix cache's capacity under the default budget: distinct long prompts served one after another, then
  the tokens the cache holds (``jina_llm_stream_kv_pool_tokens{holder="prefix_cache"}``); before the pool, the
  cache got what the full-length rows left (0.88 GiB = 20,500 tokens in the issue's measurement).
- Decode speed at 16 rows x ~900 tokens of context, in-process: rows as long as their tokens need (the pool)
  against rows laid out at full length from the start (the storage before the pool: ``INITIAL_COLUMNS`` set to
  the longest row), the same 16 prompts, one engine at a time.
- Hits by reference (executor/attention.py), in-process: 16 RAG-shaped prompts behind the same cached
  passages, each reading them in place against each copying them into its row (``KVManager.sharing`` off),
  alternated, the same engine settings: the batch's peak token slots, the KV bytes copied by cause, the
  median 16-row decode step, the aggregate rate and the TTFT p50.
- A long row spilled to the prefix cache (``KVManager.spill_long_row``), in-process: SPILL_CHATS short chats
  arriving beside a ~3,000-token request under 1 GiB, spilling against the long row laid out in full (rows as
  long as it), alternated: the chats' aggregate rate and TTFT p50, the long request's time.
"""

import asyncio
import gc
import os
import re
import statistics
import time
from pathlib import Path

from server_process import free_port, stop_server

SHORT_CHATS = 32
SHORT_TOKENS = 64
LONG_PROMPTS = 70  # distinct prompts of about LONG_WORDS words: more than the largest cache holds
LONG_WORDS = 1500
DECODE_ROWS, DECODE_CONTEXT, DECODE_TOKENS = 16, 900, 112  # the first rows decode while the last prefill
SHARED_TOKENS = 128  # new tokens per prompt of the shared-prefix burst
SPILL_CHATS, SPILL_LONG_TOKENS = 16, 256  # short chats beside one long request (~3,000 tokens) in 1 GiB


def pool_line(log_path: Path) -> str:
    match = re.search(r"KV cache pool .*", log_path.read_text())
    return match.group(0) if match else "(no start-up line)"


def pool_tokens(line: str) -> int:
    match = re.search(r"(\d+) tokens in blocks", line)
    return int(match.group(1)) if match else 0


def cache_before_the_pool(line: str, rows: int = 16) -> int:
    """What the plan before the pool left the prefix cache of the same budget: the pool less ``rows`` rows
    (fewer when they did not fit) reserved at full length (the longest request + its margin, kv_cache.margin_for)."""
    tokens, longest = pool_tokens(line), re.search(r"up to (\d+) tokens each", line)
    columns = int(longest.group(1)) + max(32, int(longest.group(1)) // 8) if longest else tokens
    return tokens - min(rows, tokens // columns) * columns


async def short_chats(openai_port: int, model: str, openai_stream, length) -> float:
    """Aggregate tok/s of SHORT_CHATS concurrent streams, best of two."""
    import httpx

    url = f"http://127.0.0.1:{openai_port}/v1/chat/completions"
    questions = [[{"role": "user", "content": f"What is {i} plus {i + 1}? Answer in one line."}]
                 for i in range(SHORT_CHATS)]
    best = 0.0
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=SHORT_CHATS + 4)) as http:
        await openai_stream(http, url, model, questions[0], 8, length)  # warm-up
        for _ in range(2):
            started = time.perf_counter()
            done = await asyncio.gather(*(openai_stream(http, url, model, q, SHORT_TOKENS, length) for q in questions))
            best = max(best, sum(r["tokens"] for r in done) / (time.perf_counter() - started))
    return best


def long_prompt(number: int) -> list:
    """A prompt of about LONG_WORDS words that differs from every other from its first words on."""
    words = ["river", "stone", "light", "market", "engine", "garden", "paper", "signal", "winter", "harbor",
             "copper", "forest", "window", "thunder", "ladder", "velvet"]
    text = " ".join(words[(number * 7 + i * (number % 5 + 1)) % len(words)] for i in range(LONG_WORDS))
    return [{"role": "user", "content": f"Document {number}. {text}"}]


async def cached_after_long_prompts(openai_port: int, metrics_port: int, model: str) -> dict:
    """Serve LONG_PROMPTS distinct long prompts (one token each), then read the pool's holders."""
    import httpx

    url = f"http://127.0.0.1:{openai_port}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=900) as http:
        started = time.perf_counter()
        prompt_tokens = 0
        for number in range(LONG_PROMPTS):
            reply = await http.post(url, json={"model": model, "messages": long_prompt(number), "max_tokens": 1})
            reply.raise_for_status()
            prompt_tokens += reply.json()["usage"]["prompt_tokens"]
        seconds = time.perf_counter() - started
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/")).text
    holders = dict(re.findall(r'jina_llm_stream_kv_pool_tokens\{holder="(\w+)"\} ([0-9.e+]+)', text))
    return {"prompt_tokens": prompt_tokens, "seconds": seconds,
            **{holder: int(float(value)) for holder, value in holders.items()}}


def server_measures(real_model_server, openai_stream, length, model: str) -> dict:
    found = {}
    for name, flags in (("default", []), ("1gib", ["--kv-cache-memory", "1GiB"])):
        port, openai_port, metrics_port = free_port(), free_port(), free_port()
        log_name = f"jina-llm-stream-bench-memory-{name}.log"
        server = real_model_server(port, openai_port, log_name,
                                   [*flags, "--monitoring", "--port-monitoring", str(metrics_port)])
        try:
            found[f"{name}_line"] = pool_line(Path(os.environ.get("TMPDIR", "/tmp")) / log_name)
            found[f"{name}_tps"] = asyncio.run(short_chats(openai_port, model, openai_stream, length))
            if name == "default":
                found["cache"] = asyncio.run(cached_after_long_prompts(openai_port, metrics_port, model))
        finally:
            stop_server(server)
    return found


def decode_rate(path: Path, full_length_rows: bool) -> float:
    """Aggregate decode tok/s of DECODE_ROWS rows of ~DECODE_CONTEXT tokens each (prefix caching off: every
    prompt computed): the median decode step while all of them run and none is being prefilled."""
    import torch

    from executor import kv_manager
    from executor.validation import Limits

    lm = load_model(path)
    saved = kv_manager.INITIAL_COLUMNS
    kv_manager.INITIAL_COLUMNS = 10**9 if full_length_rows else saved
    try:
        engine = started_engine(lm, max_batch_size=DECODE_ROWS, max_context=2048, kv_cache_memory=2**31,
                                prefix_caching=False)
    finally:
        kv_manager.INITIAL_COLUMNS = saved
    limits = Limits(context_length=2048)
    prompts = [[100 + (13 * row + 7 * i) % 20000 for i in range(DECODE_CONTEXT)] for row in range(DECODE_ROWS)]
    steps, decode_step = [], engine._decode_step

    def timed_step():
        started = time.perf_counter()
        decode_step()
        if len(engine.runner.running) == DECODE_ROWS and not engine.scheduler.prefilling:
            steps.append(time.perf_counter() - started)

    engine._decode_step = timed_step

    async def burst():
        await asyncio.gather(*(timed_stream(engine, limits, p, DECODE_TOKENS) for p in prompts))

    try:
        with torch.inference_mode():
            asyncio.run(burst())
    finally:
        engine.shutdown()
    rate = DECODE_ROWS / statistics.median(steps)
    del engine, lm
    gc.collect()
    return rate


def load_model(path: Path):
    """The model loaded the way the server loads it: in a passing thread (model.in_passing_thread), so that
    the engines built here decode as fast as the server's."""
    from executor.model import in_passing_thread, load

    return in_passing_thread(lambda: load(str(path)))


def started_engine(lm, **config):
    """An engine over ``lm`` with ``config`` (EngineConfig's fields), built in a passing thread and started."""
    from executor.engine import Engine, EngineConfig
    from executor.model import in_passing_thread

    return in_passing_thread(lambda: Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(**config))).start()


async def timed_stream(engine, limits, prompt_ids, tokens: int) -> tuple:
    """One request of exactly ``tokens`` new tokens through the engine: (seconds to its first token, in all)."""
    from executor.validation import fit_to_context, parse_gen_conf

    settings = fit_to_context(parse_gen_conf({"max_new_tokens": tokens, "min_new_tokens": tokens}, limits),
                              len(prompt_ids), limits)
    started, first = time.perf_counter(), None
    async for _ in engine.stream(prompt_ids, settings):
        first = first if first is not None else time.perf_counter() - started
    return first, time.perf_counter() - started


def shared_prefix_run(lm, prompts, warm, sharing: bool) -> dict:
    """One burst of ``prompts`` (128 new tokens each) after ``warm`` put their passages in the prefix cache."""
    import torch

    from executor.validation import Limits

    engine = started_engine(lm, max_batch_size=len(prompts), max_context=2048)
    engine.kv.sharing = sharing
    limits, steps, peak = Limits(context_length=4096), [], [0]
    decode_step = engine._decode_step

    def timed_step():
        started = time.perf_counter()
        decode_step()
        if len(engine.runner.running) == len(prompts) and not engine.scheduler.prefilling:
            steps.append(time.perf_counter() - started)
        peak[0] = max(peak[0], engine.kv.pool.batch_blocks * engine.kv.pool.block_size)

    engine._decode_step = timed_step

    async def burst():
        return await asyncio.gather(*(timed_stream(engine, limits, p, SHARED_TOKENS) for p in prompts))

    try:
        with torch.inference_mode():
            asyncio.run(timed_stream(engine, limits, warm, 4))
            before = dict(engine.kv.batch.copied_bytes)
            started = time.perf_counter()
            ttfts = asyncio.run(burst())
            seconds = time.perf_counter() - started
    finally:
        engine.shutdown()
    copied = {cause: value - before[cause] for cause, value in engine.kv.batch.copied_bytes.items()}
    return {"rate": len(prompts) * SHARED_TOKENS / seconds, "step": statistics.median(steps), "peak": peak[0],
            "copied": copied, "ttft": statistics.median(first for first, _ in ttfts)}


def shared_prefix_measures(path: Path) -> dict:
    """In place vs copied, alternated twice; the best rate and step of each, the rest from its first run."""
    from executor.model import encode_prompt
    from workloads import rag_prompts

    lm = load_model(path)
    chats, warm = rag_prompts(lm.tokenizer, 16, seed=3)
    prompts = [encode_prompt(lm.tokenizer, chat) for chat in chats]
    runs = {True: [], False: []}
    for sharing in (True, False, True, False):
        runs[sharing].append(shared_prefix_run(lm, prompts, encode_prompt(lm.tokenizer, warm), sharing))
    shared = len(os.path.commonprefix([tuple(p) for p in prompts]))
    result = {"lengths": (min(map(len, prompts)), max(map(len, prompts))), "shared": shared}
    for sharing, found in runs.items():
        result[sharing] = found[0] | {"rate": max(r["rate"] for r in found), "step": min(r["step"] for r in found)}
    del lm
    gc.collect()
    return result


def shared_prefix_rows(found: dict) -> list:
    low, high = found["lengths"]
    place, copy = found[True], found[False]
    mib = 2**20

    def copies(run):
        return ", ".join(f"{cause} {value / mib:.0f}" for cause, value in run["copied"].items() if value) or "none"

    what = f"16 RAG-shaped prompts ({low}-{high} tokens, {found['shared']} shared and cached), {SHARED_TOKENS} new"
    return [
        (f"{what}: hits copied into each row (before), aggregate", f"{copy['rate']:.1f} tok/s", "1.00x", ""),
        (f"{what}: hits read in place (attention.py), aggregate", f"{place['rate']:.1f} tok/s",
         f"{place['rate'] / copy['rate']:.2f}x copied", ""),
        ("the same: decode step with 16 rows (median), in place / copied",
         f"{place['step'] * 1e3:.0f} / {copy['step'] * 1e3:.0f} ms", f"{copy['step'] / place['step']:.2f}x",
         ">= 0.95x"),
        ("the same: the batch's peak token slots, in place / copied", f"{place['peak']} / {copy['peak']}",
         f"{copy['peak'] / max(1, place['peak']):.1f}x fewer", ""),
        ("the same: KV bytes copied (MiB by cause), in place / copied", f"{copies(place)} / {copies(copy)}",
         "", "hit: 0 in place"),
        ("the same: TTFT p50, in place / copied", f"{place['ttft'] * 1e3:.0f} / {copy['ttft'] * 1e3:.0f} ms", "", ""),
    ]


def spill_run(lm, long_ids, chats, spilling: bool) -> dict:
    """A long request decoding under ``--kv-cache-memory 1GiB``, then SPILL_CHATS short chats arriving beside it;
    ``spilling`` off: the long row is never read from the prefix cache (rows are laid out as long as it)."""
    import torch

    from executor.validation import Limits

    engine = started_engine(lm, max_batch_size=len(chats) + 1, max_context=4096, kv_cache_memory=2**30)
    if not spilling:
        engine.kv.spill_long_row = lambda *args, **kwargs: False
    limits = Limits(context_length=8192)

    async def scenario():
        long_task = asyncio.create_task(timed_stream(engine, limits, long_ids, SPILL_LONG_TOKENS))
        while not engine.runner.running:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        answered = await asyncio.gather(*(timed_stream(engine, limits, chat, SHORT_TOKENS) for chat in chats))
        chats_seconds = time.perf_counter() - started
        _, long_seconds = await long_task
        return answered, chats_seconds, long_seconds

    try:
        with torch.inference_mode():
            answered, chats_seconds, long_seconds = asyncio.run(scenario())
    finally:
        engine.shutdown()
    return {"rate": len(chats) * SHORT_TOKENS / chats_seconds, "ttft": statistics.median(t for t, _ in answered),
            "long": long_seconds, "spills": engine.kv.spills, "preemptions": engine.preemptions}


def spill_measures(path: Path) -> dict:
    """A long row spilled to the prefix cache vs laid out in full, alternated (best rate of two each)."""
    from executor.model import encode_prompt

    lm = load_model(path)
    long_ids = encode_prompt(lm.tokenizer, [{"role": "user", "content": long_prompt(1)[0]["content"] + " "
                                             + long_prompt(2)[0]["content"]}])
    chats = [encode_prompt(lm.tokenizer, [{"role": "user", "content": f"What is {i} plus {i + 1}? Answer in one line."}])
             for i in range(SPILL_CHATS)]
    runs = {True: [], False: []}
    for spilling in (True, False, True, False):
        runs[spilling].append(spill_run(lm, long_ids, chats, spilling))
    del lm
    gc.collect()
    return {"long_tokens": len(long_ids),
            **{spilling: found[0] | {"rate": max(r["rate"] for r in found)} for spilling, found in runs.items()}}


def spill_rows(found: dict) -> list:
    spilled, full = found[True], found[False]
    what = (f"{SPILL_CHATS} short chats ({SHORT_TOKENS} tokens) beside a {found['long_tokens']}-token request, "
            "--kv-cache-memory 1GiB")
    return [
        (f"{what}: the long row laid out in full (rows as long as it), aggregate of the chats",
         f"{full['rate']:.1f} tok/s", "1.00x", ""),
        (f"{what}: the long row reading its head from the prefix cache (spilled), aggregate of the chats",
         f"{spilled['rate']:.1f} tok/s", f"{spilled['rate'] / full['rate']:.2f}x", ""),
        ("the same: chats' TTFT p50, spilled / in full", f"{spilled['ttft'] * 1e3:.0f} / {full['ttft'] * 1e3:.0f} ms",
         "", ""),
        (f"the same: the long request's {SPILL_LONG_TOKENS} tokens took, spilled / in full",
         f"{spilled['long']:.1f} / {full['long']:.1f} s", "",
         f"spills {spilled['spills']}, preemptions {spilled['preemptions']} / {full['preemptions']}"),
    ]


def rows(found: dict) -> list:
    default, small = found["default_tps"], found["1gib_tps"]
    cache = found["cache"]
    before = 0.88 * 2**30 / 46080
    result = [
        (f"{SHORT_CHATS} concurrent short chats ({SHORT_TOKENS} tokens), OpenAI API, default budget",
         f"{default:.1f} tok/s", "1.00x", ""),
        (f"{SHORT_CHATS} concurrent short chats, --kv-cache-memory 1GiB", f"{small:.1f} tok/s",
         f"{small / default:.2f}x default budget", ">= 0.9x (0.39x before the pool)"),
        ("start-up line, --kv-cache-memory 1GiB", f"{pool_tokens(found['1gib_line'])} tokens", "",
         ">= 20,000 tokens"),
        ("start-up line, default budget", f"{pool_tokens(found['default_line'])} tokens", "", ""),
        (f"prefix cache after {LONG_PROMPTS} distinct long prompts ({cache['prompt_tokens']} tokens, "
         f"{cache['seconds']:.0f} s), default budget", f"{cache.get('prefix_cache', 0)} tokens cached",
         f"{cache.get('prefix_cache', 0) / before:.1f}x the issue's 0.88 GiB (a larger budget); "
         f"{cache.get('prefix_cache', 0) / max(1, cache_before_the_pool(found['default_line'])):.1f}x what "
         f"full-length rows left of this budget ({cache_before_the_pool(found['default_line'])} tokens)",
         ">= 5x"),
    ]
    if "decode_pool" in found:
        pool, full = found["decode_pool"], found["decode_full"]
        result += [
            (f"decode, {DECODE_ROWS} rows x ~{DECODE_CONTEXT} tokens, rows at full length (the storage before "
             "the pool)", f"{full:.1f} tok/s", "1.00x", ""),
            (f"decode, {DECODE_ROWS} rows x ~{DECODE_CONTEXT} tokens, rows as long as their tokens (the pool)",
             f"{pool:.1f} tok/s", f"{pool / full:.2f}x", ">= 0.95x"),
        ]
    if "shared_prefix" in found:
        result += shared_prefix_rows(found["shared_prefix"])
    if "spill" in found:
        result += spill_rows(found["spill"])
    return result


def measures(path: Path, real_model_server, openai_stream, length, model: str) -> dict:
    found = {"shared_prefix": shared_prefix_measures(path), "spill": spill_measures(path)}
    found |= {"decode_full": decode_rate(path, True), "decode_pool": decode_rate(path, False)}
    found["decode_full"] = statistics.mean([found["decode_full"], decode_rate(path, True)])
    found["decode_pool"] = statistics.mean([found["decode_pool"], decode_rate(path, False)])
    return found | server_measures(real_model_server, openai_stream, length, model)
