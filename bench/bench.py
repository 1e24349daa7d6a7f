"""Benchmark: the real server against in-process references, in one run, on this machine.

    make bench                  # or: .venv/bin/python bench/bench.py --new-tokens 128 --clients 16

Builds a GPT-2-small-shaped model (124M parameters, random weights, a 50257-token BPE tokenizer trained
offline on synthetic text) once, then measures, in one run:
  references  raw decode loop with KV cache (batch 1), model.generate static batch of N
  the server  /stream with 1 client, N concurrent /stream clients, /chat with N prompts in one call,
              a 1000-prompt batch job through one Client.post (and the TTFT of /stream clients meanwhile),
              executor RSS over many requests; the OpenAI API (--openai-port) streaming, 1 and N clients;
              long prompts (bench/workloads.py): N concurrent RAG-shaped prompts sharing their passages, a
              warm-prefix request, the 6th turn of a chat, the decode rate of N rows at ~900 tokens of context
  the peer    `transformers serve --continuous-batching` (bench/peer.py, a venv of its own): the same
              RAG-shaped and short requests through its OpenAI API
  real model  the default model, SmolLM2-135M-Instruct (its shape differs: 30 layers, 3 key/value heads):
              /stream with --speculate 0: raw loop, 1 client, N concurrent, N RAG-shaped, each against its
              in-process reference (int4, as the server loads it); through the OpenAI API, the server with no
              flags (int4, speculation on), the same with --speculate 0, --quantize none (the fp32 copy) and
              --quantize int8: 1 client free text, 1 client an answer copying
              its passage, N short, N RAG-shaped, RSS; and the same requests
              to llama.cpp's llama-server on the same GGUF file (bench/llama_cpp.py builds it once, ~9 min),
              the quoting answer also under each of its n-gram speculation kinds
and prints one table with each measure as a ratio to its reference. Loopback only; stops by itself.
The server runs with --monitoring: the KV cache's copy counters (bytes copied per join, per leave, moves of
the live columns) during the RAG-shaped burst are read from its Prometheus endpoint.

    bench/bench.py --only rag   # the RAG-shaped burst and its KV copies only (no references, no peer): ~2 min
    bench/bench.py --only real  # the real model's rows only: ~15 min (and the llama.cpp build, once)
    bench/bench.py --only routing  # 2 replicas, prefix-aware routing vs round robin vs 1 replica: ~3 min
    bench/bench.py --only memory  # the KV pool: short chats under 1 GiB vs the default, prefix cache capacity, decode
    bench/bench.py --only speculation  # no flags vs --speculate 0, servers alternating, best of 2 each: ~10 min
"""

import argparse
import asyncio
import copy
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the offline tokenizer and GPT-2 builders

import llama_cpp  # noqa: E402
import memory  # noqa: E402
import peer  # noqa: E402
import torch  # noqa: E402
import workloads  # noqa: E402
from server_process import busiest, executor_process, free_port, start_server, stop_server  # noqa: E402

CHUNK = 256  # the server's default prefill_chunk
JOB_TOKENS = 32  # new tokens per prompt of the batch job
JOB_REFERENCE_BATCHES = 4  # model.generate static batches measured for the job's reference (the job's first prompts)
LONG_CONTEXT = 840  # prompt tokens of the long-context decode rows (+ up to ~100 new: ~900 tokens of context)
LONG_NEW_TOKENS = 100
CHAT_TURNS = 6
CHAT_ANSWER_TOKENS = 64
RAG_SEED, RAG_OPENAI_SEED = 1, 2  # two sets of passages: the OpenAI API and the peer start cold, like /stream
CACHE = Path(os.environ.get("JINA_LLM_STREAM_CACHE", Path.home() / ".cache" / "jina-llm-stream"))
BENCH_MODEL = CACHE / "bench-gpt2-small-v1"


def build_bench_model() -> Path:
    if (BENCH_MODEL / "model.safetensors").exists():
        return BENCH_MODEL
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny_models import CHATML_TEMPLATE, build_gpt2

    print("building the benchmark model (first run only) ...", flush=True)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(80_000)]
    text = [" ".join(rng.choices(words, k=200)) for _ in range(6_000)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=50257, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(text, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    partial = BENCH_MODEL.with_name(BENCH_MODEL.name + ".partial")
    build_gpt2(partial, tokenizer, n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    partial.rename(BENCH_MODEL)
    return BENCH_MODEL


def prompts(count: int) -> list:
    topics = ["the weather", "a short story", "jina executors", "streaming tokens", "batching", "a poem",
              "the sea", "mountains", "databases", "music", "cooking", "trains", "the moon", "gardens", "chess",
              "rivers"]
    return [[{"role": "user", "content": f"Please write a few sentences about {topics[i % len(topics)]}, "
                                         f"number {i}."}] for i in range(count)]


def gen_conf(new_tokens: int) -> dict:
    # min_new_tokens suppresses EOS, so every request generates exactly new_tokens tokens.
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}


# ---- in-process references ----------------------------------------------------------------------------
def references(path: Path, new_tokens: int, batch: int) -> dict:
    from executor.model import encode_prompt, load

    loaded = load(str(path))
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = encode_prompt(tokenizer, prompts(1)[0])
    with torch.inference_mode():
        model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        prefill_s = time.perf_counter() - started
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        raw_tps = max(raw_decode_rate(model, cache, token, new_tokens) for _ in range(2))

        tokenizer.padding_side = "left"
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts(batch)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        static_s = float("inf")
        for _ in range(2):  # best of two, as the concurrent rows it is compared with (best_of)
            started = time.perf_counter()
            model.generate(**encoded, do_sample=False, pad_token_id=tokenizer.pad_token_id, **gen_conf(new_tokens))
            static_s = min(static_s, time.perf_counter() - started)
        static_tps = batch * new_tokens / static_s
        job_static_tps = static_batches_rate(model, tokenizer, batch, JOB_TOKENS, JOB_REFERENCE_BATCHES)
        long_ids = torch.tensor([list(range(1000, 1000 + CHUNK))])
        started = time.perf_counter()
        model(long_ids, use_cache=True, logits_to_keep=1)
        chunk_s = time.perf_counter() - started
        rag, _ = workloads.rag_prompts(tokenizer, batch, RAG_SEED)
        rag_lengths = [len(encode_prompt(tokenizer, m)) for m in rag]
        rag_static_tps = static_batches_rate(model, tokenizer, batch, new_tokens, 1, rag)
        long_static_tps = static_cache_decode_rate(model, tokenizer, workloads.long_prompts(tokenizer, batch, LONG_CONTEXT, 3))
    del model
    return {"raw_tps": raw_tps, "prefill_s": prefill_s, "static_tps": static_tps, "prompt_tokens": len(ids),
            "chunk_s": chunk_s, "job_static_tps": job_static_tps, "rag_static_tps": rag_static_tps,
            "rag_lengths": rag_lengths, "long_static_tps": long_static_tps}


def static_cache_decode_rate(model, tokenizer, chats: list) -> float:
    """Decode rate of model.generate with transformers' in-place (static) cache, prefill excluded: a streamer
    stamps each step."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    stamps = Stamps()
    model.generate(**encoded, do_sample=False, pad_token_id=tokenizer.pad_token_id, cache_implementation="static",
                   streamer=stamps, **gen_conf(LONG_NEW_TOKENS))
    # times[0]: the prompt; times[1]: the first new token (after the prefill); then one per decode step.
    return len(chats) * (len(stamps.times) - 2) / (stamps.times[-1] - stamps.times[1])


def prefill_seconds(path: Path, prompts_ids: list) -> list:
    """In-process full prefill of each prompt (best of two): what a TTFT without any cache would cost."""
    from executor.model import load

    model = load(str(path)).model
    times = []
    with torch.inference_mode():
        for ids in prompts_ids:
            best = float("inf")
            for _ in range(2):
                started = time.perf_counter()
                model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                best = min(best, time.perf_counter() - started)
            times.append(best)
    del model
    return times


def static_batches_rate(model, tokenizer, batch: int, new_tokens: int, batches: int, job=None) -> float:
    """model.generate on ``job`` (default: the job's first ``batches`` x ``batch`` prompts), ``batch`` at a time
    (left padded)."""
    job = job or prompts(batch * batches)
    started = time.perf_counter()
    for first in range(0, len(job), batch):
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in job[first:first + batch]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        model.generate(**encoded, do_sample=False, pad_token_id=tokenizer.pad_token_id, **gen_conf(new_tokens))
    return len(job) * new_tokens / (time.perf_counter() - started)


def raw_decode_rate(model, cache, token, new_tokens: int) -> float:
    cache = copy.deepcopy(cache)
    started = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return new_tokens / (time.perf_counter() - started)


def transformers_continuous_batching(path: Path, tokenizer, batch: int, new_tokens: int):
    """transformers' own continuous batching (generate_batch), the alternative we weighed."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from executor.model import encode_prompt

    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        inputs = [encode_prompt(tokenizer, m) for m in prompts(batch)]
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        model.generate_batch(inputs[:2], generation_config=config)  # warm-up
        started = time.perf_counter()
        outputs = model.generate_batch(inputs, generation_config=config)
        elapsed = time.perf_counter() - started
        return sum(len(o.generated_tokens) for o in outputs.values()) / elapsed
    except Exception as error:  # noqa: BLE001 - a reference row only; the table says it failed
        print(f"transformers continuous batching failed: {error}", file=sys.stderr)
        return None


# ---- the server ---------------------------------------------------------------------------------------
async def one_stream(client, message, new_tokens, extra=None):
    from schemas import Generation, Prompt

    started = time.perf_counter()
    times, counts, text = [], [], []
    conf = {**gen_conf(new_tokens), **(extra or {})}
    async for piece in client.stream_doc(on="/stream", inputs=Prompt(message=message, gen_conf=conf),
                                         return_type=Generation):
        times.append(time.perf_counter())
        counts.append(piece.completion_tokens)
        text.append(piece.text)
        final = piece
    return {"ttft": times[0] - started, "total": times[-1] - started, "decode": times[-1] - times[0],
            "tokens": final.completion_tokens, "times": times, "counts": counts, "text": "".join(text),
            "cached": final.cached_tokens, "prompt": final.prompt_tokens}


# A typical schema whose one string is long enough that every answer runs to the requested length: the rows
# then compare the same number of decode steps, with and without the grammar's mask.
LONG_JSON = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                              "text": {"type": "string", "minLength": 2000, "maxLength": 2000},
                                              "score": {"type": "integer"}},
             "required": ["title", "text", "score"], "additionalProperties": False}


async def constrained_measures(client, new_tokens: int, batch: int) -> dict:
    """``batch`` concurrent /stream answers constrained by a JSON schema, against the same unconstrained,
    alternately (best of two each)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "doc", "schema": LONG_JSON}}

    async def streams(extra):
        return await asyncio.gather(*(one_stream(client, m, new_tokens, extra) for m in prompts(batch)))

    await streams({"response_format": fmt})  # compiles the schema once (then cached)
    free, constrained = [], []
    for _ in range(2):
        free.append(await best_of(1, lambda: streams({})))
        constrained.append(await best_of(1, lambda: streams({"response_format": fmt})))
    rate = lambda runs: max(sum(r["tokens"] for r in results) / wall for results, wall in runs)  # noqa: E731
    return {"free_tps": rate(free), "constrained_tps": rate(constrained)}


def grammar_compile_seconds(path: Path) -> dict:
    """In-process: wrapping the tokenizer for llguidance (once per server), compiling LONG_JSON cold, then
    a request's copy of the cached grammar."""
    from executor.grammar import Grammars, parse_response_format
    from executor.model import load

    loaded = load(str(path))
    grammars = Grammars(loaded.tokenizer, loaded.vocab_size,
                        loaded.eos_token_ids)
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "doc", "schema": LONG_JSON}})
    started = time.perf_counter()
    grammars._llg_tokenizer()
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    grammars.row_grammar(fmt)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(100):
        grammars.row_grammar(fmt)
    return {"grammar_tokenizer_s": tokenizer_s, "grammar_cold_s": cold_s,
            "grammar_cached_s": (time.perf_counter() - started) / 100}


async def best_of(times: int, measure) -> tuple:
    """(results, wall seconds) of the fastest of ``times`` runs of ``measure()``: this machine's speed drifts
    by +-10% between minutes, so the rows compared with each other (the two APIs, the peer) take their best."""
    best = None
    for _ in range(times):
        started = time.perf_counter()
        results = await measure()
        wall = time.perf_counter() - started
        if best is None or wall < best[1]:
            best = (results, wall)
    return best


def all_decoding_rate(results: list) -> float:
    """Tokens per second while every stream was decoding (after the last first token, before the first end)."""
    start, end = max(r["times"][0] for r in results), min(r["times"][-1] for r in results)
    tokens = 0
    for r in results:
        inside = [count for t, count in zip(r["times"], r["counts"]) if start <= t <= end]
        tokens += inside[-1] - inside[0] if inside else 0
    return tokens / (end - start) if end > start else float("nan")


def kv_copies(metrics_port: int, settle_s: float = 10.0) -> dict:
    """The KV cache's copy counters (executor/metrics.py) from the server's Prometheus endpoint, e.g.
    ``copied_bytes_join``, ``rows_leave``, ``moves_step``; read once every row that joined has left (a row
    leaves the batch just after its last piece is sent)."""
    import httpx

    deadline = time.monotonic() + settle_s
    while True:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/", timeout=10).text
        found = {f"{m[1]}_{m[2]}": float(m[3])
                 for m in re.finditer(r'^jina_llm_stream_kv_(\w+)_total\{\w+="(\w+)"\} (\S+)$', text, re.MULTILINE)}
        if not found:
            raise SystemExit(f"no jina_llm_stream_kv_* metrics on port {metrics_port}: is the server --monitoring?")
        if found["rows_join"] == found["rows_leave"] or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


async def rag_burst(client, tokenizer, new_tokens: int, batch: int, metrics_port=None) -> dict:
    """``batch`` concurrent RAG-shaped prompts through /stream, and what the KV cache copied meanwhile."""
    rag, warm = workloads.rag_prompts(tokenizer, batch, RAG_SEED)
    before = kv_copies(metrics_port) if metrics_port else None
    started = time.perf_counter()
    burst = await asyncio.gather(*(one_stream(client, m, new_tokens) for m in rag))
    wall = time.perf_counter() - started
    found = {"rag_tps": sum(r["tokens"] for r in burst) / wall,
             "rag_ttft_p50": statistics.median(r["ttft"] for r in burst),
             "rag_cached": statistics.median(r["cached"] for r in burst), "rag_warm": warm}
    if before is not None:
        after = kv_copies(metrics_port)
        found["rag_kv"] = {name: after[name] - before.get(name, 0.0) for name in after}
    return found


async def long_prompt_measures(client, tokenizer, new_tokens: int, batch: int, metrics_port=None) -> dict:
    """RAG-shaped burst, warm-prefix request, 6th chat turn, long-context decode: all through /stream."""
    from executor.model import encode_prompt

    rag = await rag_burst(client, tokenizer, new_tokens, batch, metrics_port)
    warm = rag.pop("rag_warm")
    warm_result = await one_stream(client, warm, 16)

    messages = [{"role": "system", "content": "You are a helpful assistant. Keep the conversation going."}]
    for turn, user in enumerate(workloads.chat_turn_messages(tokenizer, CHAT_TURNS, 5)):
        messages.append({"role": "user", "content": user})
        answer = await one_stream(client, messages, CHAT_ANSWER_TOKENS if turn < CHAT_TURNS - 1 else 16)
        messages.append({"role": "assistant", "content": answer["text"]})
    last_turn = messages[:-1]

    long = await asyncio.gather(*(one_stream(client, m, LONG_NEW_TOKENS)
                                  for m in workloads.long_prompts(tokenizer, batch, LONG_CONTEXT, 3)))
    return {**rag,
            "warm_ttft": warm_result["ttft"], "warm_cached": warm_result["cached"],
            "warm_ids": encode_prompt(tokenizer, warm),
            "turn_ttft": answer["ttft"], "turn_cached": answer["cached"], "turn_ids": encode_prompt(tokenizer, last_turn),
            "long_decode_tps": all_decoding_rate(long)}


async def prefill_stall(client, new_tokens: int) -> dict:
    """Largest gap between two pieces of 4 running streams while a ~900-token prompt is prefilled."""
    from docarray import DocList

    from schemas import Generation, Prompt

    streams = [asyncio.create_task(one_stream(client, m, new_tokens)) for m in prompts(4)]
    await asyncio.sleep(1.0)
    long_prompt = Prompt(message=[{"role": "user", "content": " ".join(["word"] * 450)}],
                         gen_conf={"max_new_tokens": 1})
    started = time.perf_counter()
    async for _ in client.post("/chat", inputs=long_prompt, return_type=DocList[Generation]):
        pass
    ended = time.perf_counter()
    results = await asyncio.gather(*streams)
    gaps_during = [b - a for r in results for a, b in zip(r["times"], r["times"][1:]) if b > started and a < ended]
    gaps_before = [b - a for r in results for a, b in zip(r["times"], r["times"][1:]) if b < started]
    return {"stall_max": max(gaps_during, default=0.0), "gap_typical": statistics.median(gaps_before),
            "long_prefill_s": ended - started}


async def batch_job(client, prompt_count: int) -> dict:
    """A ``prompt_count``-prompt job through one ``Client.post`` with the client's defaults, while a /stream
    client asks a question every 2 s: the job's rate and those streams' TTFT."""
    from docarray import DocList

    from schemas import Generation, Prompt

    docs = DocList[Prompt]([Prompt(message=m, gen_conf=gen_conf(JOB_TOKENS)) for m in prompts(prompt_count)])
    answers, stream_ttfts = [], []

    async def job():
        async for result in client.post("/chat", inputs=docs, return_type=DocList[Generation]):
            answers.extend(result)

    async def interactive(running):
        await asyncio.sleep(3.0)  # the job fills the engine first
        while not running.done():
            stream_ttfts.append((await one_stream(client, prompts(1)[0], 16))["ttft"])
            await asyncio.sleep(2.0)

    started = time.perf_counter()
    running = asyncio.ensure_future(job())
    await asyncio.gather(running, interactive(running))
    wall = time.perf_counter() - started
    return {"job_tps": sum(a.completion_tokens for a in answers) / wall, "job_wall": wall, "job_prompts": len(answers),
            "job_stream_ttft_p50": statistics.median(stream_ttfts),
            "job_stream_ttft_max": max(stream_ttfts), "job_streams": len(stream_ttfts)}


def our_length(new_tokens: int) -> dict:
    return {"max_tokens": new_tokens, "min_tokens": new_tokens}


async def openai_stream(http, url: str, model: str, message, new_tokens: int, length=our_length) -> dict:
    """One streamed /v1/chat/completions: the same measures as one_stream. ``length`` gives the body's fields
    that make the answer exactly ``new_tokens`` long on that server."""
    body = {"model": model, "messages": message, **length(new_tokens), "stream": True,
            "stream_options": {"include_usage": True}}
    started, times, usage = time.perf_counter(), [], None
    async with http.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    return {"ttft": times[0] - started, "total": times[-1] - started, "decode": times[-1] - times[0],
            "tokens": usage["completion_tokens"]}


def fresh_connections(most: int):
    """httpx limits with a new connection per request: llama-server (cpp-httplib) closed a kept-alive connection
    after a streamed answer without saying so, and the next request on it failed ("Server disconnected without
    sending a response"); both servers get the same (a localhost connect is far below a request's time)."""
    import httpx

    return httpx.Limits(max_connections=most, max_keepalive_connections=0)


async def openai_measures(openai_port: int, model: str, new_tokens: int, batch: int, tokenizer,
                          length=our_length) -> dict:
    """1 client and ``batch`` concurrent short streams, then ``batch`` RAG-shaped streams, through an OpenAI API
    (this server's, or the peer's with its own ``length`` fields)."""
    import httpx

    url = f"http://127.0.0.1:{openai_port}/v1/chat/completions"
    rag, _ = workloads.rag_prompts(tokenizer, batch, RAG_OPENAI_SEED)

    async def ask(message, tokens):
        return await openai_stream(http, url, model, message, tokens, length)

    async with httpx.AsyncClient(timeout=900, limits=fresh_connections(batch + 4)) as http:
        for _ in range(2):  # warm-up
            await ask(prompts(1)[0], 8)
        single = [await ask(prompts(1)[0], new_tokens) for _ in range(3)]
        best = min(single, key=lambda r: r["total"])
        many, wall = await best_of(2, lambda: asyncio.gather(*(ask(m, new_tokens) for m in prompts(batch))))
        started = time.perf_counter()
        burst = await asyncio.gather(*(ask(m, new_tokens) for m in rag))
        rag_wall = time.perf_counter() - started
    return {"openai1_tps": (best["tokens"] - 1) / best["decode"], "openai1_ttft": best["ttft"],
            "openaiN_tps": sum(r["tokens"] for r in many) / wall,
            "openai_rag_tps": sum(r["tokens"] for r in burst) / rag_wall,
            "openai_rag_ttft_p50": statistics.median(r["ttft"] for r in burst)}


def peer_measures(path: Path, new_tokens: int, batch: int, tokenizer) -> dict:
    """The same OpenAI measures against ``transformers serve --continuous-batching`` (its own venv)."""
    python = peer.ensure_venv(CACHE)
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "jina-llm-stream-bench-peer.log"
    server = peer.start(python, path, port, log_path)
    try:
        found = asyncio.run(openai_measures(port, str(path), new_tokens, batch, tokenizer,
                                            length=peer.request_fields))
    finally:
        stop_server(server)
    return {f"peer_{name}": value for name, value in found.items()}


async def server_measures(port: int, new_tokens: int, batch: int, rss_requests: int, job_prompts: int, server) -> dict:
    from docarray import DocList
    from jina import Client

    from schemas import Generation, Prompt

    client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
    for _ in range(2):  # warm-up
        await one_stream(client, prompts(1)[0], 8)
    single = [await one_stream(client, prompts(1)[0], new_tokens) for _ in range(3)]
    best = min(single, key=lambda r: r["total"])

    many, concurrent_wall = await best_of(2, lambda: asyncio.gather(*(one_stream(client, m, new_tokens)
                                                                       for m in prompts(batch))))
    ttfts = sorted(r["ttft"] for r in many)
    constrained = await constrained_measures(client, new_tokens, batch)
    stall = await prefill_stall(client, new_tokens * 2)

    docs = DocList[Prompt]([Prompt(message=m, gen_conf=gen_conf(new_tokens)) for m in prompts(batch)])
    started = time.perf_counter()
    answers = []
    async for result in client.post("/chat", inputs=docs, return_type=DocList[Generation]):
        answers.extend(result)
    chat_wall = time.perf_counter() - started

    from transformers import AutoTokenizer

    long = await long_prompt_measures(client, AutoTokenizer.from_pretrained(server.model_path), new_tokens, batch,
                                      server.metrics_port)

    executor = executor_process(server)
    rss_before = executor.memory_info().rss
    short = {"max_new_tokens": 4}
    semaphore = asyncio.Semaphore(batch)

    async def small(i):
        async with semaphore:
            if i % 2:
                return await one_stream(client, prompts(1)[0], 4)
            async for _ in client.post("/chat", inputs=Prompt(message=prompts(1)[0], gen_conf=short),
                                       return_type=DocList[Generation]):
                pass

    started = time.perf_counter()
    await asyncio.gather(*(small(i) for i in range(rss_requests)))
    rss_wall = time.perf_counter() - started
    rss_after = executor.memory_info().rss
    job = await batch_job(client, job_prompts)  # after the RSS measure: a long job reshapes the heap
    return {
        "stream1_tps": (best["tokens"] - 1) / best["decode"], "stream1_ttft": best["ttft"],
        "streamN_tps": sum(r["tokens"] for r in many) / concurrent_wall,
        "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "chat_tps": sum(a.completion_tokens for a in answers) / chat_wall,
        **stall, **job, **long, **constrained, "rss_before": rss_before, "rss_after": rss_after, "rss_requests": rss_requests, "rss_wall": rss_wall,
    }


def long_prompt_rows(ref: dict, srv: dict, batch: int, new_tokens: int) -> list:
    lengths = ref["rag_lengths"]
    rag = (f"{batch} concurrent RAG-shaped prompts ({min(lengths)}-{max(lengths)} tokens, about "
           f"{srv['rag_cached'] / statistics.median(lengths):.0%} shared), {new_tokens} new tokens")
    peer_rag = srv.get("peer_openai_rag_tps")
    rows = [
        (f"model.generate, static batch of the {batch} RAG-shaped prompts (reference)", f"{ref['rag_static_tps']:.1f} tok/s",
         "1.00x", ""),
        (f"/stream, {rag}", f"{srv['rag_tps']:.1f} tok/s", f"{srv['rag_tps'] / ref['rag_static_tps']:.2f}x static batch",
         ">= 1.5x"),
        (f"/stream, {batch} RAG-shaped prompts, TTFT p50", f"{srv['rag_ttft_p50'] * 1000:.0f} ms", "", "<= 2 s"),
        (f"OpenAI API, {rag} (other passages: cold cache)", f"{srv['openai_rag_tps']:.1f} tok/s",
         f"{srv['openai_rag_tps'] / peer_rag:.2f}x transformers serve" if peer_rag else "", ">= 1.5x the peer"),
        ("OpenAI API, RAG-shaped, TTFT p50", f"{srv['openai_rag_ttft_p50'] * 1000:.0f} ms", "", ""),
    ]
    if peer_rag:
        rows += [
            ("transformers serve --continuous-batching (peer), OpenAI API, the same RAG-shaped requests",
             f"{peer_rag:.1f} tok/s", f"TTFT p50 {srv['peer_openai_rag_ttft_p50'] * 1000:.0f} ms", ""),
            (f"transformers serve (peer), {batch} concurrent short streams", f"{srv['peer_openaiN_tps']:.1f} tok/s",
             f"this server: /stream {srv['streamN_tps'] / srv['peer_openaiN_tps']:.2f}x, OpenAI "
             f"{srv['openaiN_tps'] / srv['peer_openaiN_tps']:.2f}x", ">= 1.0x"),
            ("transformers serve (peer), 1 client, decode rate", f"{srv['peer_openai1_tps']:.1f} tok/s",
             f"this server's OpenAI API: {srv['openai1_tps'] / srv['peer_openai1_tps']:.2f}x", ""),
        ]
    rows += kv_copy_rows(f"the /stream RAG burst ({batch} prompts)", srv.get("rag_kv"), srv.get("kv_token_bytes"), ref)
    warm_share = srv["warm_cached"] / len(srv["warm_ids"])
    turn_share = srv["turn_cached"] / len(srv["turn_ids"])
    rows += [
        (f"warm prefix: a new question behind the same passages ({len(srv['warm_ids'])} tokens, {warm_share:.0%} "
         "cached), TTFT", f"{srv['warm_ttft'] * 1000:.0f} ms",
         f"{srv['warm_ttft'] / ref['warm_prefill_s']:.2f}x its full prefill ({ref['warm_prefill_s'] * 1000:.0f} ms)",
         "<= 0.2x"),
        (f"turn {CHAT_TURNS} of a chat that resends its history ({len(srv['turn_ids'])} tokens, {turn_share:.0%} "
         "cached), TTFT", f"{srv['turn_ttft'] * 1000:.0f} ms",
         f"{srv['turn_ttft'] / ref['turn_prefill_s']:.2f}x its full prefill ({ref['turn_prefill_s'] * 1000:.0f} ms)",
         "<= 0.3x"),
        (f"long context: {batch} rows at {LONG_CONTEXT}-{LONG_CONTEXT + LONG_NEW_TOKENS} tokens, decode rate "
         "while all decode", f"{srv['long_decode_tps']:.1f} tok/s",
         f"{srv['long_decode_tps'] / ref['long_static_tps']:.2f}x model.generate with the static cache "
         f"({ref['long_static_tps']:.1f} tok/s)", ">= 0.9x"),
    ]
    return rows


MOVE_ROWS, ROW_TOKENS, LEAVE_COLUMNS = 8, 870, 900  # about the RAG burst's forced moves and leaves


def kv_copy_seconds(path: Path) -> dict:
    """In-process, on the bench model's KV rows: a row of ``ROW_TOKENS`` joining ``MOVE_ROWS`` running rows
    without a move, one a token longer (the running rows move first), and a leave that copies the last row's
    ``LEAVE_COLUMNS`` columns. Seconds and bytes (BatchKV's own counts) of each, best of five (a copy that
    shares the CPU with other work can take 10x longer)."""
    from transformers import AutoConfig

    from executor.kv_cache import BatchKV, LayerShape

    config = AutoConfig.from_pretrained(path)
    head_dim = config.n_embd // config.n_head
    batch = BatchKV([LayerShape(config.n_head, head_dim, head_dim, torch.float32)] * config.n_layer,
                    MOVE_ROWS + 2, LEAVE_COLUMNS + 64, torch.device("cpu"))  # 10 rows, 0.7 GB
    tokens = [(torch.randn(config.n_head, LEAVE_COLUMNS, head_dim),) * 2 for _ in range(config.n_layer)]
    found = {}

    def timed(name, cause, operation):
        before = batch.copied_bytes[cause]
        started = time.perf_counter()
        operation()
        seconds = time.perf_counter() - started
        if seconds < found.get(f"kv_{name}_s", float("inf")):
            found[f"kv_{name}_s"], found[f"kv_{name}_bytes"] = seconds, batch.copied_bytes[cause] - before

    def join(length):
        return lambda: batch.add_row([(keys[:, :length], values[:, :length]) for keys, values in tokens], length)

    with torch.inference_mode():
        for _ in range(MOVE_ROWS):
            join(ROW_TOKENS)()
        for attempt in range(5):
            timed("join", "join", join(ROW_TOKENS))
            batch.remove_rows([batch.rows - 1])  # the last row: nothing to copy
            timed("join_move", "join", join(ROW_TOKENS + 1 + attempt))  # the write column is one shorter
            batch.remove_rows([batch.rows - 1])
        join(LEAVE_COLUMNS)()
        for _ in range(5):
            join(ROW_TOKENS)()
            timed("leave", "leave", lambda: batch.remove_rows([0]))
    return found


def kv_copy_rows(what: str, kv, token_bytes, timings=None) -> list:
    """What the KV cache copied during ``what`` (``kv_copies`` deltas): per join, per leave, the moves; and
    what such copies take in-process (``kv_copy_seconds``)."""
    if not kv:
        return []
    mib = 1 << 20

    def size(value: float, per: float = 1) -> str:
        value = value / per if per else 0.0
        tokens = f" ({value / token_bytes:.0f} tokens)" if token_bytes else ""
        return f"{value / mib:.1f} MiB{tokens}"

    joins, leaves, moves = kv["rows_join"], kv["rows_leave"], kv["moves_join"]
    own = kv["copied_bytes_join"] - kv["moved_bytes_join"]
    total = sum(value for name, value in kv.items() if name.startswith("copied_bytes_"))
    rows = [
        (f"KV cache copies in {what}: per join (its own tokens + the moves of every running row it forced)",
         size(kv["copied_bytes_join"], joins),
         f"{joins:.0f} joins: own tokens {size(own, joins)} per join; {moves:.0f} forced a move, "
         f"{size(kv['moved_bytes_join'], moves)} each; prompts being prefilled moved out of the row a join took: "
         f"{kv['copied_bytes_staged'] / mib:.1f} MiB", ""),
        (f"KV cache copies in {what}: per leave (the last row, up to the write column, into the leaving row's "
         "place)", size(kv["copied_bytes_leave"], leaves), f"{leaves:.0f} leaves", ""),
        (f"KV cache copies in {what}: moves of the live columns at a step (end of storage, compaction)",
         f"{kv['moves_step']:.0f}, {kv['copied_bytes_move'] / mib:.1f} MiB",
         f"all copies: {total / mib:.0f} MiB{f' ({total / token_bytes:.0f} tokens)' if token_bytes else ''}", ""),
    ]
    if timings:
        rows.append((f"KV cache copies in-process, this machine: a {ROW_TOKENS}-token row joining {MOVE_ROWS} rows / "
                     f"one token longer (the {MOVE_ROWS} rows move first) / a leave copying {LEAVE_COLUMNS} columns",
                     " / ".join(f"{timings[f'kv_{name}_s'] * 1000:.0f} ms" for name in ("join", "join_move", "leave")),
                     " / ".join(f"{timings[f'kv_{name}_bytes'] / mib:.0f} MiB" for name in ("join", "join_move", "leave")),
                     ""))
    return rows


def table(ref: dict, srv: dict, batch: int, new_tokens: int) -> str:
    mb = 1 << 20
    rss_growth = srv["rss_after"] / srv["rss_before"] - 1
    rows = [
        ("raw decode loop with KV cache, batch 1 (reference)", f"{ref['raw_tps']:.1f} tok/s", "1.00x", ""),
        (f"model.generate, static batch {batch} (reference)", f"{ref['static_tps']:.1f} tok/s", "1.00x", ""),
        (f"transformers continuous batching (generate_batch), {batch} requests (alternative)",
         f"{ref['hf_cb_tps']:.1f} tok/s" if ref["hf_cb_tps"] else "failed",
         f"{ref['hf_cb_tps'] / ref['static_tps']:.2f}x static batch" if ref["hf_cb_tps"] else "", ""),
        ("/stream, 1 client, decode rate", f"{srv['stream1_tps']:.1f} tok/s",
         f"{srv['stream1_tps'] / ref['raw_tps']:.2f}x raw loop", ">= 0.9x"),
        ("/stream, 1 client, TTFT", f"{srv['stream1_ttft'] * 1000:.0f} ms",
         f"raw prefill {ref['prefill_s'] * 1000:.0f} ms + {(srv['stream1_ttft'] - ref['prefill_s']) * 1000:.0f} ms",
         "<= prefill + 50 ms"),
        (f"/stream, {batch} concurrent clients, aggregate", f"{srv['streamN_tps']:.1f} tok/s",
         f"{srv['streamN_tps'] / ref['static_tps']:.2f}x static batch", ">= 0.6x"),
        (f"/stream, {batch} concurrent clients, TTFT p50 / p95",
         f"{srv['ttft_p50'] * 1000:.0f} / {srv['ttft_p95'] * 1000:.0f} ms", "", "p50 <= 1.5 s"),
        (f"/chat, {batch} prompts in one call", f"{srv['chat_tps']:.1f} tok/s",
         f"{srv['chat_tps'] / ref['static_tps']:.2f}x static batch", ">= 0.8x"),
        (f"batch job: {srv['job_prompts']} prompts x {JOB_TOKENS} tokens in one Client.post (defaults: requests of "
         f"100), {srv['job_wall']:.0f} s", f"{srv['job_tps']:.1f} tok/s",
         f"{srv['job_tps'] / ref['job_static_tps']:.2f}x static batch {batch} ({ref['job_static_tps']:.1f} tok/s on "
         f"the job's first {batch * JOB_REFERENCE_BATCHES} prompts)", ">= 0.8x"),
        (f"/stream TTFT while the batch job runs, p50 / max of {srv['job_streams']}",
         f"{srv['job_stream_ttft_p50'] * 1000:.0f} / {srv['job_stream_ttft_max'] * 1000:.0f} ms",
         f"idle: {srv['stream1_ttft'] * 1000:.0f} ms", "p50 <= 1 s"),
        ("4 streams while a 900-token prompt is prefilled: extra delay of their next piece",
         f"{(srv['stall_max'] - srv['gap_typical']) * 1000:.0f} ms",
         f"{(srv['stall_max'] - srv['gap_typical']) / ref['chunk_s']:.2f}x one {CHUNK}-token chunk "
         f"({ref['chunk_s'] * 1000:.0f} ms)", "about one chunk, not the whole prompt (~3.5 chunks)"),
        ("OpenAI API, streamed chat completion, 1 client, decode rate", f"{srv['openai1_tps']:.1f} tok/s",
         f"{srv['openai1_tps'] / ref['raw_tps']:.2f}x raw loop, {srv['openai1_tps'] / srv['stream1_tps']:.2f}x /stream",
         ">= 0.95x /stream"),
        ("OpenAI API, 1 client, TTFT", f"{srv['openai1_ttft'] * 1000:.0f} ms",
         f"raw prefill {ref['prefill_s'] * 1000:.0f} ms + {(srv['openai1_ttft'] - ref['prefill_s']) * 1000:.0f} ms", ""),
        (f"OpenAI API, {batch} concurrent streams, aggregate", f"{srv['openaiN_tps']:.1f} tok/s",
         f"{srv['openaiN_tps'] / ref['static_tps']:.2f}x static batch, {srv['openaiN_tps'] / srv['streamN_tps']:.2f}x "
         "/stream", ">= 0.95x /stream"),
        (f"/stream, {batch} concurrent answers constrained by a JSON schema (response_format), aggregate",
         f"{srv['constrained_tps']:.1f} tok/s", f"{srv['constrained_tps'] / srv['free_tps']:.2f}x the same unconstrained "
         f"({srv['free_tps']:.1f} tok/s)", ">= 0.85x"),
        ("JSON schema compile: tokenizer wrap (once per server) / schema cold / cached copy",
         f"{ref['grammar_tokenizer_s'] * 1000:.0f} / {ref['grammar_cold_s'] * 1000:.1f} / "
         f"{ref['grammar_cached_s'] * 1000:.2f} ms", "", ""),
        *long_prompt_rows(ref, srv, batch, new_tokens),
        (f"executor RSS over {srv['rss_requests']} requests",
         f"{srv['rss_before'] / mb:.0f} -> {srv['rss_after'] / mb:.0f} MiB", f"{rss_growth * 100:+.1f}%", "< 10%"),
    ]
    lines = [f"GPT-2-small shape (124M, random weights, fp32), {new_tokens} new tokens per request, "
             f"prompt {ref['prompt_tokens']} tokens; {os.cpu_count()} CPUs, torch {torch.__version__}",
             "", "| measure | value | ratio | target |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def start_bench_server(path: Path, port: int, clients: int, log_path: Path, flags=()):
    """The server under test, with --monitoring (the KV cache's copy counters); ``model_path``,
    ``metrics_port`` and ``kv_token_bytes`` (from its KV plan's log line) set on the returned process."""
    metrics_port = free_port()
    server = start_server(["--model_name", str(path), "--port", str(port), "--max_batch_size", str(clients),
                           "--monitoring", "--port-monitoring", str(metrics_port), *flags], log_path)
    server.model_path, server.metrics_port = path, metrics_port
    plan = re.search(r"(\d+) bytes per token", log_path.read_text(errors="replace"))
    server.kv_token_bytes = int(plan[1]) if plan else None
    return server


# ---- replicas: prefix-aware routing against round robin -----------------------------------------------------
ROUTING_CONVERSATIONS, ROUTING_TURNS = 8, 4


async def multi_turn_rag(port: int, tokenizer, new_tokens: int) -> dict:
    """Conversations behind passages of their own, all at once, turn after turn (each turn resends the whole
    history): the cached share of turns 2-4's prompt tokens and their TTFT p50."""
    from jina import Client

    client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
    for _ in range(4):  # every replica answers once (the gateway reaches them as they come up)
        await asyncio.gather(*(one_stream(client, prompts(1)[0], 4) for _ in range(2)))
    histories = workloads.rag_conversations(tokenizer, ROUTING_CONVERSATIONS, RAG_SEED)
    questions = [workloads.chat_turn_messages(tokenizer, ROUTING_TURNS, RAG_SEED + n)
                 for n in range(ROUTING_CONVERSATIONS)]
    later = []
    for turn in range(ROUTING_TURNS):
        for history, asked in zip(histories, questions):
            history.append({"role": "user", "content": asked[turn]})
        results = await asyncio.gather(*(one_stream(client, history, new_tokens) for history in histories))
        for history, result in zip(histories, results):
            history.append({"role": "assistant", "content": result["text"]})
        later += results if turn else []
    return {"cached_share": sum(r["cached"] for r in later) / sum(r["prompt"] for r in later),
            "ttft_p50": statistics.median(r["ttft"] for r in later)}


MIGRATION_AFTER_PIECES = 5


async def migration_gap(port: int, log_path: Path, tokenizer, new_tokens: int = 96) -> dict:
    """A RAG-shaped stream whose replica is SIGKILLed once the client has its 5th piece (request migration):
    the longest wait for a piece after the kill, against a cold prefill of a prompt of the same shape (what the
    other replica recomputes: it was never sent these passages) and the stream's own gap between pieces."""
    from jina import Client

    from schemas import Generation, Prompt

    client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
    chats = workloads.rag_conversations(tokenizer, 2, RAG_SEED + 100)
    for chat, question in zip(chats, workloads.chat_turn_messages(tokenizer, 2, RAG_SEED + 100)):
        chat.append({"role": "user", "content": question})
    cold = await one_stream(client, chats[0], 4)
    replicas = sorted(int(pid) for pid in set(re.findall(r"pid=(\d+) request=\d+ endpoint=warm-up",
                                                          log_path.read_text(errors="replace"))))
    times, killed = [], []

    async def kill_the_serving_replica():
        victim = await asyncio.get_running_loop().run_in_executor(None, busiest, replicas)
        os.kill(victim, signal.SIGKILL)
        killed.append(time.perf_counter())

    killing = None
    async for piece in client.stream_doc(on="/stream", inputs=Prompt(message=chats[1], gen_conf=gen_conf(new_tokens)),
                                         return_type=Generation):
        times.append(time.perf_counter())
        if len(times) == MIGRATION_AFTER_PIECES:  # the pieces keep being read while the replica is found
            killing = asyncio.create_task(kill_the_serving_replica())
    await killing
    after = [t for t in times if t > killed[0]]
    waits = [t - max(killed[0], earlier) for earlier, t in zip(times, times[1:]) if t > killed[0]]
    before = [t - earlier for earlier, t in zip(times, times[1:]) if t <= killed[0]]
    return {"gap": max(waits) if waits else float("nan"), "pieces_after": len(after), "tokens": piece.completion_tokens,
            "prefill": cold["ttft"], "prompt": cold["prompt"], "piece_gap": statistics.median(before)}


def routing_measures(path: Path, new_tokens: int) -> dict:
    """The multi-turn RAG workload on one replica, and through two with --routing prefix and round_robin; with
    prefix routing, last, one migration (its replica killed: the server has one replica left after it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    found = {}
    for name, flags in (("one", ["--replicas", "1"]), ("prefix", ["--replicas", "2", "--routing", "prefix"]),
                        ("round_robin", ["--replicas", "2", "--routing", "round_robin"])):
        port = free_port()
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"jina-llm-stream-bench-routing-{name}.log"
        server = start_server(["--model_name", str(path), "--port", str(port), "--max_batch_size", "16", *flags],
                              log_path)
        try:
            found[name] = asyncio.run(multi_turn_rag(port, tokenizer, new_tokens))
            if name == "prefix":
                found["migration"] = asyncio.run(migration_gap(port, log_path, tokenizer))
        finally:
            stop_server(server)
    return found


def routing_rows(found: dict) -> list:
    one, routed, rr = found["one"], found["prefix"], found["round_robin"]
    what = f"{ROUTING_CONVERSATIONS} RAG conversations x {ROUTING_TURNS} turns (own passages, ~450 tokens)"
    return [
        (f"replicas: {what}, 1 replica: cached share of turns 2-{ROUTING_TURNS} (reference)",
         f"{one['cached_share']:.1%}", "1.00x", ""),
        ("replicas: the same through 2 replicas, --routing prefix: cached share", f"{routed['cached_share']:.1%}",
         f"{routed['cached_share'] / one['cached_share']:.2f}x 1 replica", ">= 0.9x"),
        ("replicas: the same through 2 replicas, --routing round_robin: cached share", f"{rr['cached_share']:.1%}",
         f"{rr['cached_share'] / one['cached_share']:.2f}x 1 replica", ""),
        (f"replicas: TTFT p50 of turns 2-{ROUTING_TURNS}, prefix vs round robin",
         f"{routed['ttft_p50'] * 1000:.0f} ms", f"round robin {rr['ttft_p50'] * 1000:.0f} ms "
         f"(1 replica {one['ttft_p50'] * 1000:.0f} ms)", "lower than round robin"),
        *migration_rows(found["migration"]),
    ]


def migration_rows(moved: dict) -> list:
    return [
        (f"replicas: one migration (serving replica SIGKILLed after piece {MIGRATION_AFTER_PIECES}), longest wait "
         f"for a piece after the kill", f"{moved['gap'] * 1000:.0f} ms",
         f"{moved['gap'] / moved['prefill']:.2f}x a cold prefill of {moved['prompt']} tokens "
         f"({moved['prefill'] * 1000:.0f} ms); piece gap before it {moved['piece_gap'] * 1000:.0f} ms; "
         f"{moved['pieces_after']} pieces after it, {moved['tokens']} tokens in all", "<= 2x the prefill"),
    ]


# ---- the real model: SmolLM2-135M-Instruct, the default model ----------------------------------------------
# The real model's speculation rows: 16 drafted tokens at most (8 measured the same on free text, short and
# RAG streams, and 0.66-0.78x of 16 on an answer copying its passage: long accepted drafts need room).
REAL_MODEL = ("SmolLM2-135M-Instruct (its GGUF Q4_1 file as the server loads it by default: int4 body, int8 head; "
              "30 layers, 3 key/value heads, 49k vocabulary)")


def real_model_folder() -> Path:
    """The default model's dequantized folder (made once, as the server makes it at its first start)."""
    from executor.gguf_model import default_model_file, dequantized

    return dequantized(default_model_file())


def real_model_references(new_tokens: int, batch: int) -> dict:
    """In-process, on the real model as the server loads it by default (its GGUF file, int4): the raw loop
    (batch 1), model.generate on the short prompts and on the RAG-shaped prompts (static batches of ``batch``)."""
    from executor.model import encode_prompt, load

    loaded = load(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = encode_prompt(tokenizer, prompts(1)[0])
    rag, _ = workloads.rag_prompts(tokenizer, batch, RAG_SEED)
    with torch.inference_mode():
        model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)  # warm-up
        out = model(torch.tensor([ids]), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        raw_tps = max(raw_decode_rate(model, cache, token, new_tokens) for _ in range(2))
        tokenizer.padding_side = "left"
        static_tps = max(static_batches_rate(model, tokenizer, batch, new_tokens, 1) for _ in range(2))
        rag_static_tps = static_batches_rate(model, tokenizer, batch, new_tokens, 1, rag)
    return {"raw_tps": raw_tps, "static_tps": static_tps, "rag_static_tps": rag_static_tps,
            "rag_lengths": [len(encode_prompt(tokenizer, m)) for m in rag]}


async def real_model_server_measures(port: int, tokenizer, new_tokens: int, batch: int) -> dict:
    """/stream on the real model: 1 client (best of three), ``batch`` concurrent short streams (best of two),
    the ``batch`` RAG-shaped prompts."""
    from jina import Client

    client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
    for _ in range(2):  # warm-up
        await one_stream(client, prompts(1)[0], 8)
    single = [await one_stream(client, prompts(1)[0], new_tokens) for _ in range(3)]
    best = min(single, key=lambda r: r["total"])
    many, wall = await best_of(2, lambda: asyncio.gather(*(one_stream(client, m, new_tokens) for m in prompts(batch))))
    rag = await rag_burst(client, tokenizer, new_tokens, batch)
    return {"stream1_tps": (best["tokens"] - 1) / best["decode"],
            "streamN_tps": sum(r["tokens"] for r in many) / wall, **rag}


def greedy_length(new_tokens: int) -> dict:
    """Our OpenAI API, greedy (absent, its temperature is OpenAI's 1), exactly ``new_tokens`` long: what the
    real model's rows ask of both servers (llama_cpp.request_fields is greedy too)."""
    return {**our_length(new_tokens), "temperature": 0}


async def openai_quote(port: int, model: str, new_tokens: int, length=greedy_length) -> dict:
    """1 client, the answer that copies its passage (best of two): decode rate and tokens."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=900, limits=fresh_connections(2)) as http:
        runs = [await openai_stream(http, url, model, workloads.quote_prompt(), new_tokens, length) for _ in range(2)]
    best = min(runs, key=lambda r: r["decode"])
    return {"quote_tps": (best["tokens"] - 1) / best["decode"]}


def real_model_server(port: int, openai_port: int, log_name: str, flags=()):
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / log_name
    return start_server(["--port", str(port), "--openai-port", str(openai_port), "--max_batch_size", "16", *flags],
                        log_path)


# The real model's servers: what a user gets with no flags (int4 from the Q4_1 file, speculation on), the same
# with speculation off (also the engine's overhead against the references, int4 too), the fp32 copy, int8.
REAL_SERVERS = (("defaults", []), ("speculate0", ["--speculate", "0"]), ("fp32", ["--quantize", "none"]),
                ("int8", ["--quantize", "int8"]))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Jina's gateway and worker processes)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def real_model_measures(new_tokens: int, batch: int, peer_llama: bool = True) -> dict:
    """References first (alone on the CPU); then the server serving its default model (no --model_name) as
    REAL_SERVERS says: its OpenAI API (1 client free text and quoting, ``batch`` short and RAG-shaped streams),
    /stream on the float32 one; then llama.cpp's llama-server on the same GGUF file, the same requests, and
    the quoting answer again under each of its n-gram speculation kinds."""
    from transformers import AutoTokenizer

    from executor.gguf_model import DEFAULT_MODEL_ID, default_model_file

    path = real_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    found = {"ref": real_model_references(new_tokens, batch)}
    for name, flags in REAL_SERVERS:
        port, openai_port = free_port(), free_port()
        server = real_model_server(port, openai_port, f"jina-llm-stream-bench-real-{name}.log", flags)
        try:
            if name == "speculate0":
                found["srv"] = asyncio.run(real_model_server_measures(port, tokenizer, new_tokens, batch))
            found[name] = real_openai_measures(openai_port, tokenizer, new_tokens, batch)
            found[name]["rss"] = tree_rss(server.pid)
        finally:
            stop_server(server)
    if peer_llama:
        found |= llama_measures(default_model_file(), DEFAULT_MODEL_ID, tokenizer, new_tokens, batch)
    return found


def llama_measures(gguf_file: Path, model: str, tokenizer, new_tokens: int, batch: int) -> dict:
    binary = llama_cpp.ensure_binary(CACHE)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "jina-llm-stream-bench-llama.log"
    found = {"llama_spec": {}}
    for kind in ("none", *llama_cpp.NGRAM_SPEC_TYPES):
        port = free_port()
        server = llama_cpp.start(binary, gguf_file, port, log_path, threads=os.cpu_count(), spec_type=kind)
        try:
            if kind == "none":
                found["llama"] = asyncio.run(openai_measures(port, model, new_tokens, batch, tokenizer,
                                                             length=llama_cpp.request_fields))
                found["llama"]["rss"] = tree_rss(server.pid)
            found["llama_spec"][kind] = asyncio.run(openai_quote(port, model, new_tokens,
                                                                 llama_cpp.request_fields))["quote_tps"]
        finally:
            stop_server(server)
    found["llama"]["quote_tps"] = found["llama_spec"]["none"]
    return found


def real_openai_measures(openai_port: int, tokenizer, new_tokens: int, batch: int) -> dict:
    """The default model's OpenAI rows against this server: 1 client, ``batch`` short and RAG-shaped, quoting."""
    from executor.gguf_model import DEFAULT_MODEL_ID

    found = asyncio.run(openai_measures(openai_port, DEFAULT_MODEL_ID, new_tokens, batch, tokenizer,
                                        length=greedy_length))
    return found | asyncio.run(openai_quote(openai_port, DEFAULT_MODEL_ID, new_tokens))


def speculation_ab(new_tokens: int, batch: int, rounds: int = 2) -> dict:
    """``--only speculation``: the server with no flags and with --speculate 0, started in turn ``rounds`` times
    each (two servers started minutes apart measured 0.88x of each other here): the best of each measure."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_folder())
    found = {}
    for _ in range(rounds):
        for name, flags in REAL_SERVERS[:2]:
            port, openai_port = free_port(), free_port()
            server = real_model_server(port, openai_port, f"jina-llm-stream-bench-ab-{name}.log", flags)
            try:
                measured = real_openai_measures(openai_port, tokenizer, new_tokens, batch)
            finally:
                stop_server(server)
            best = found.setdefault(name, {})
            for key, value in measured.items():
                best[key] = max(best.get(key, value), value) if key.endswith("_tps") else value
    return found


def speculation_rows(found: dict, batch: int) -> list:
    defaults, off = found["defaults"], found["speculate0"]
    rows = []
    for (what, key), target in zip(real_measures(batch), (">= 0.97x", ">= 4x", ">= 0.97x", ">= 1.2x")):
        rows.append((f"no flags (int4, speculation on) vs --speculate 0: OpenAI API, {what}",
                     f"{defaults[key]:.1f} tok/s", f"{defaults[key] / off[key]:.2f}x ({off[key]:.1f} tok/s)", target))
    return rows


def real_measures(batch: int) -> tuple:
    return (("1 client, free text (decode rate)", "openai1_tps"),
            ("1 client, an answer copying its passage (decode rate)", "quote_tps"),
            (f"{batch} concurrent short streams, aggregate", "openaiN_tps"),
            (f"{batch} concurrent RAG-shaped streams, aggregate", "openai_rag_tps"))


def real_model_rows(found: dict, batch: int, new_tokens: int) -> list:
    ref, srv = found["ref"], found["srv"]
    lengths = ref["rag_lengths"]
    rag = (f"{batch} concurrent RAG-shaped prompts ({min(lengths)}-{max(lengths)} tokens, about "
           f"{srv['rag_cached'] / statistics.median(lengths):.0%} shared), {new_tokens} new tokens")
    rows = [
        ("real model: raw decode loop with KV cache, batch 1 (reference)", f"{ref['raw_tps']:.1f} tok/s", "1.00x", ""),
        ("real model (--speculate 0): /stream, 1 client, decode rate",
         f"{srv['stream1_tps']:.1f} tok/s", f"{srv['stream1_tps'] / ref['raw_tps']:.2f}x raw loop", ">= 0.95x"),
        (f"real model: model.generate, static batch {batch} (reference)", f"{ref['static_tps']:.1f} tok/s", "1.00x", ""),
        (f"real model (--speculate 0): /stream, {batch} concurrent clients, aggregate", f"{srv['streamN_tps']:.1f} tok/s",
         f"{srv['streamN_tps'] / ref['static_tps']:.2f}x static batch", ">= 0.6x"),
        (f"real model: model.generate, static batch of the {batch} RAG-shaped prompts (reference)",
         f"{ref['rag_static_tps']:.1f} tok/s", "1.00x", ""),
        (f"real model (--speculate 0): /stream, {rag}", f"{srv['rag_tps']:.1f} tok/s",
         f"{srv['rag_tps'] / ref['rag_static_tps']:.2f}x static batch", ">= 1.5x"),
        (f"real model (--speculate 0): /stream, {batch} RAG-shaped prompts, TTFT p50", f"{srv['rag_ttft_p50'] * 1000:.0f} ms",
         "", ""),
    ]
    measures = real_measures(batch)
    defaults, fp32, int8 = found["defaults"], found["fp32"], found["int8"]
    rows += speculation_rows(found, batch)
    for what, key in measures:
        for name, other in (("none (fp32)", fp32), ("int8", int8)):
            rows.append((f"--quantize {name} (speculation on) vs no flags (int4): OpenAI API, {what}",
                         f"{other[key]:.1f} tok/s", f"{other[key] / defaults[key]:.2f}x ({defaults[key]:.1f} tok/s)", ""))
    llama = found.get("llama")
    if llama:
        threads = f"-t {os.cpu_count()} -np {llama_cpp.PARALLEL}"
        for (what, key), target in zip(measures, (">= 1.0x", ">= 2.0x", ">= 1.5x", ">= 3.0x")):
            rows.append((f"llama.cpp llama-server (peer, same GGUF Q4_1, {threads}): {what}", f"{llama[key]:.1f} tok/s",
                         f"this server, no flags: {defaults[key] / llama[key]:.2f}x (--quantize none: "
                         f"{fp32[key] / llama[key]:.2f}x, int8: {int8[key] / llama[key]:.2f}x)", target))
        kinds = found["llama_spec"]
        best = max((kind for kind in kinds if kind != "none"), key=kinds.get)
        rows.append((f"llama.cpp with its n-gram speculation, quoting: "
                     + ", ".join(f"{kind} {kinds[kind]:.1f}" for kind in kinds if kind != "none"),
                     f"{kinds[best]:.1f} tok/s ({best})",
                     f"this server, no flags: {defaults['quote_tps'] / kinds[best]:.2f}x (none: "
                     f"{fp32['quote_tps'] / kinds[best]:.2f}x, int8: {int8['quote_tps'] / kinds[best]:.2f}x)", ">= 1.2x"))
        rows.append((f"llama.cpp: {batch} RAG-shaped streams, TTFT p50", f"{llama['openai_rag_ttft_p50'] * 1000:.0f} ms",
                     f"this server, no flags: {defaults['openai_rag_ttft_p50'] * 1000:.0f} ms (none: "
                     f"{fp32['openai_rag_ttft_p50'] * 1000:.0f} ms, int8: {int8['openai_rag_ttft_p50'] * 1000:.0f} ms)", ""))
        mib = 1 << 20
        rows.append(("RSS after the measures: llama-server", f"{llama['rss'] / mib:.0f} MiB",
                     f"this server, no flags (gateway + worker): {defaults['rss'] / mib:.0f} MiB, "
                     f"{defaults['rss'] / llama['rss']:.2f}x (none: {fp32['rss'] / mib:.0f} MiB, int8: "
                     f"{int8['rss'] / mib:.0f} MiB)", "<= 1.5x"))
    return rows


def memory_rows() -> list:
    """The KV pool's rows (bench/memory.py) with the default model."""
    from executor.gguf_model import DEFAULT_MODEL_ID

    return memory.rows(memory.measures(real_model_folder(), real_model_server, openai_stream, greedy_length,
                                       DEFAULT_MODEL_ID))


def print_table(title: str, rows: list) -> None:
    print(title + "\n\n| measure | value | ratio | target |\n| --- | --- | --- | --- |")
    print("\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows))


def real_only(new_tokens: int, batch: int) -> int:
    """``--only real``: the real model's rows."""
    print_table(f"{REAL_MODEL}; {os.cpu_count()} CPUs, torch {torch.__version__}",
                real_model_rows(real_model_measures(new_tokens, batch), batch, new_tokens))
    return 0


def rag_only(path: Path, new_tokens: int, batch: int) -> int:
    """``--only rag``: the RAG-shaped burst through /stream and what the KV cache copied during it."""
    from jina import Client
    from transformers import AutoTokenizer

    from executor.model import encode_prompt

    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "jina-llm-stream-bench.log"
    port = free_port()
    server = start_bench_server(path, port, batch, log_path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    async def measure():
        client = Client(host=f"grpc://127.0.0.1:{port}", asyncio=True)
        for _ in range(2):  # warm-up, as server_measures
            await one_stream(client, prompts(1)[0], 8)
        return await rag_burst(client, tokenizer, new_tokens, batch, server.metrics_port)

    try:
        rag = asyncio.run(measure())
    finally:
        stop_server(server)
    lengths = [len(encode_prompt(tokenizer, m)) for m in workloads.rag_prompts(tokenizer, batch, RAG_SEED)[0]]
    what = (f"{batch} concurrent RAG-shaped prompts ({min(lengths)}-{max(lengths)} tokens, about "
            f"{rag['rag_cached'] / statistics.median(lengths):.0%} shared), {new_tokens} new tokens")
    rows = [(f"/stream, {what}", f"{rag['rag_tps']:.1f} tok/s", "", ""),
            (f"/stream, {batch} RAG-shaped prompts, TTFT p50", f"{rag['rag_ttft_p50'] * 1000:.0f} ms", "", ""),
            *kv_copy_rows(f"the /stream RAG burst ({batch} prompts)", rag["rag_kv"], server.kv_token_bytes,
                          kv_copy_seconds(path))]
    print(f"--only rag: GPT-2-small shape (124M, random weights, fp32); {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; {server.kv_token_bytes} bytes of keys and values per token\n")
    print("| measure | value | detail | target |\n| --- | --- | --- | --- |")
    print("\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rss-requests", type=int, default=1000)
    parser.add_argument("--job-prompts", type=int, default=1000)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers serve (no venv is built)")
    parser.add_argument("--only", choices=["rag", "real", "routing", "memory", "speculation"],
                        help="rag: only the /stream RAG-shaped burst and the KV cache's copies during it (no "
                        "references, no peer, no other rows); real: only the real model's rows; routing: only the "
                        "replicas' rows (prefix-aware routing vs round robin); memory: only the KV pool's rows (bench/memory.py); "
                        "speculation: no flags vs --speculate 0, the servers alternating")
    args = parser.parse_args()
    if args.only == "real":
        return real_only(args.new_tokens, args.clients)
    if args.only == "speculation":
        print_table(f"--only speculation: {REAL_MODEL}, alternating servers, best of 2 each; {os.cpu_count()} CPUs",
                    speculation_rows(speculation_ab(args.new_tokens, args.clients), args.clients))
        return 0
    if args.only == "memory":
        print_table(f"--only memory: the KV pool, {REAL_MODEL}, {os.cpu_count()} CPUs", memory_rows())
        return 0
    path = build_bench_model()
    if args.only == "rag":
        return rag_only(path, args.new_tokens, args.clients)
    if args.only == "routing":
        print_table("--only routing: GPT-2-small shape (124M, random weights, fp32), --replicas 2 on "
                    f"{os.cpu_count()} CPUs", routing_rows(routing_measures(path, 32)))
        return 0
    ref = references(path, args.new_tokens, args.clients)
    port, openai_port = free_port(), free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "jina-llm-stream-bench.log"
    server = start_bench_server(path, port, args.clients, log_path, ["--openai-port", str(openai_port)])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        srv = asyncio.run(server_measures(port, args.new_tokens, args.clients, args.rss_requests, args.job_prompts,
                                          server))
        srv |= asyncio.run(openai_measures(openai_port, str(path), args.new_tokens, args.clients, tokenizer))
    finally:
        stop_server(server)
    srv["kv_token_bytes"] = server.kv_token_bytes
    srv |= peer_measures(path, args.new_tokens, args.clients, tokenizer) if not args.no_peer else {}
    ref["warm_prefill_s"], ref["turn_prefill_s"] = prefill_seconds(path, [srv["warm_ids"], srv["turn_ids"]])
    ref |= grammar_compile_seconds(path)
    ref |= kv_copy_seconds(path)
    # Last, in this process: its manager thread must not share the CPU with the server's measures.
    ref["hf_cb_tps"] = transformers_continuous_batching(path, tokenizer, args.clients, args.new_tokens)
    routing = routing_measures(path, 32)
    print(table(ref, srv, args.clients, args.new_tokens))
    print()
    print_table("Replicas, same run:", routing_rows(routing))
    print()
    print_table(f"The default model, {REAL_MODEL}, same run:",
                real_model_rows(real_model_measures(args.new_tokens, args.clients), args.clients, args.new_tokens))
    print()
    print_table("The KV pool, the default model, same run:", memory_rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())
