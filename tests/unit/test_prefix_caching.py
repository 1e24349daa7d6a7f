"""The engine with its prefix cache and memory budget, on a tiny real model: a hit changes no answer."""

import asyncio
import logging
import time

import pytest
import torch

from executor.engine import Engine, EngineConfig
from executor.kv_manager import MIN_REUSED_TOKENS
from executor.model import encode_prompt, load
from executor.validation import Limits, fit_to_context, parse_gen_conf

SYSTEM = ("You answer questions about the passages below. Passage one: the river runs north past the old mill. "
          "Passage two: the mill was built of stone in a dry summer. Passage three: the town grew around it. ")


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["chat"]))


def make_engine(lm, **config):
    return Engine(lm.model, lm.tokenizer, lm.eos_token_ids,
                  EngineConfig(**{"max_batch_size": 8, "prefill_chunk": 32, **config})).start()


@pytest.fixture(scope="module")
def plain(lm):
    """The reference: the same engine without a prefix cache."""
    engine = make_engine(lm, prefix_caching=False)
    yield engine
    engine.shutdown()


def settings(lm, prompt_ids, max_new_tokens=16):
    limits = Limits(context_length=lm.context_length)
    return fit_to_context(parse_gen_conf({"max_new_tokens": max_new_tokens}, limits), len(prompt_ids), limits)


async def ask(engine, lm, prompt_ids, max_new_tokens=16):
    events = [e async for e in engine.stream(prompt_ids, settings(lm, prompt_ids, max_new_tokens))]
    return "".join(e.text for e in events), events[-1]


def rag_prompt(lm, question):
    return encode_prompt(lm.tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def count_prefill_tokens(model):
    """Wrap ``model.forward``: the number of prompt tokens it computes (every forward pass but the decode
    steps, which run on the batch's own cache)."""
    from executor.kv_cache import BatchKV

    counted = {"tokens": 0}
    forward = model.forward

    def counting(*args, **kwargs):
        ids = kwargs["input_ids"]
        if not isinstance(kwargs.get("cache", kwargs.get("past_key_values")), BatchKV):
            counted["tokens"] += int(kwargs["attention_mask"][:, -ids.shape[1]:].sum())
        return forward(*args, **kwargs)

    model.forward = counting
    return counted


def test_a_prompt_behind_a_served_prefix_reuses_it_and_answers_the_same(lm, plain):
    engine = make_engine(lm)
    try:
        first, second = rag_prompt(lm, "Where does the river run?"), rag_prompt(lm, "What is the mill made of?")
        shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        assert shared % 16, "the test wants a shared prefix that ends inside a block"
        text, last = asyncio.run(ask(engine, lm, first))
        assert last.cached_tokens == 0
        assert text == asyncio.run(ask(plain, lm, first))[0]
        text, last = asyncio.run(ask(engine, lm, second))
        assert last.cached_tokens == shared - shared % 16, "every whole block of the shared prefix, no more"
        assert text == asyncio.run(ask(plain, lm, second))[0]
        text, last = asyncio.run(ask(engine, lm, first))
        assert last.cached_tokens == (len(first) - 1) // 16 * 16, "the same prompt again: all its whole blocks"
        assert text == asyncio.run(ask(plain, lm, first))[0]
    finally:
        engine.shutdown()


def test_a_prompt_made_of_whole_cached_blocks_still_computes_its_last_block(lm, plain):
    """The logits of the last prompt token choose the first new token: a prompt whose every block is cached
    recomputes its last block rather than reuse them all."""
    prompt_ids = rag_prompt(lm, "Where does the river run? " * 4)
    prompt_ids = prompt_ids[:len(prompt_ids) // 16 * 16]
    engine = make_engine(lm)
    try:
        first = asyncio.run(ask(engine, lm, prompt_ids))
        again = asyncio.run(ask(engine, lm, prompt_ids))
    finally:
        engine.shutdown()
    assert first[1].cached_tokens == 0 and again[1].cached_tokens == len(prompt_ids) - 16
    assert first[0] == again[0] == asyncio.run(ask(plain, lm, prompt_ids))[0]


def test_a_conversation_reuses_its_earlier_turns_including_the_answers(lm, plain):
    engine = make_engine(lm)
    try:
        messages = [{"role": "system", "content": SYSTEM}]
        reused_an_answer, previous_prompt_tokens = False, 0
        for turn, question in enumerate(["Hello there.", "Tell me more.", "And then?", "Why?", "Sure?"]):
            messages.append({"role": "user", "content": question})
            prompt_ids = encode_prompt(lm.tokenizer, messages)
            text, last = asyncio.run(ask(engine, lm, prompt_ids, max_new_tokens=24))
            assert text == asyncio.run(ask(plain, lm, prompt_ids, max_new_tokens=24))[0]
            if turn:
                assert last.cached_tokens >= previous_prompt_tokens // 16 * 16, "the whole earlier prompt is reused"
                # The answer's blocks are reused up to where its text tokenizes differently inside the new prompt.
                reused_an_answer |= last.cached_tokens > previous_prompt_tokens
            previous_prompt_tokens = len(prompt_ids)
            messages.append({"role": "assistant", "content": text})
        assert reused_an_answer, "blocks of an answer this server generated were reused in a later turn"
    finally:
        engine.shutdown()


def test_prompts_arriving_together_compute_their_shared_prefix_once(lm, plain):
    questions = [f"Question number {i}: what happened {'next ' * i}?" for i in range(8)]
    prompts = [rag_prompt(lm, q) for q in questions]
    expected = [asyncio.run(ask(plain, lm, p))[0] for p in prompts]
    # A round's prefill budget fits several whole prompts: without waiting they would share one pass and each
    # compute the prefix.
    engine = make_engine(lm, prefill_chunk=512)
    counted = count_prefill_tokens(lm.model)
    try:
        async def together():
            return await asyncio.gather(*(ask(engine, lm, p) for p in prompts))

        answers = asyncio.run(together())
    finally:
        del lm.model.forward
        engine.shutdown()
    assert [text for text, _ in answers] == expected
    shared = min(next(i for i, (a, b) in enumerate(zip(prompts[0], p)) if a != b) for p in prompts[1:])
    cached = [last.cached_tokens for _, last in answers]
    assert sorted(cached)[1:] == [shared - shared % 16] * 7 and sorted(cached)[0] == 0, cached
    assert counted["tokens"] == sum(len(p) for p in prompts) - sum(cached), "each prompt token computed once"


def test_a_cancelled_request_leaves_its_shared_blocks_intact(lm, plain):
    prompts = [rag_prompt(lm, f"Question {i} about the town?") for i in range(4)]
    expected = [asyncio.run(ask(plain, lm, p, 40))[0] for p in prompts]
    engine = make_engine(lm)
    try:
        async def scenario():
            async def leave_early(prompt_ids):
                async for _ in engine.stream(prompt_ids, settings(lm, prompt_ids, 40)):
                    return  # the client leaves after its first piece

            tasks = [asyncio.create_task(ask(engine, lm, p, 40)) for p in prompts[1:]]
            await leave_early(prompts[0])
            return await asyncio.gather(*tasks)

        answers = asyncio.run(scenario())
        assert [text for text, _ in answers] == expected[1:]
        text, last = asyncio.run(ask(engine, lm, prompts[0], 40))
        assert last.cached_tokens > 0 and text == expected[0]
    finally:
        engine.shutdown()


def test_a_full_prefix_cache_evicts_old_blocks_and_answers_stay_exact(lm, plain):
    engine = make_engine(lm)
    # Shrink the prefix cache to a few blocks: every new prompt has to evict.
    from executor.kv_cache import PrefixCache

    engine.kv.prefix = PrefixCache(engine.kv.shapes, blocks=6, block_size=16, device=engine.device)
    try:
        prompts = [encode_prompt(lm.tokenizer, [{"role": "user", "content": f"{i} " * 20 + "tell me"}])
                   for i in range(6)]
        for prompt_ids in prompts + prompts[:2]:
            assert asyncio.run(ask(engine, lm, prompt_ids))[0] == asyncio.run(ask(plain, lm, prompt_ids))[0]
        assert engine.kv.prefix.evictions > 0
        assert len(engine.kv.prefix) <= 6
    finally:
        engine.shutdown()


def test_a_burst_of_long_requests_against_a_small_pool_packs_rows_by_tokens_preempts_and_all_finish(lm, plain):
    row_bytes = (512 + 64) * engine_bytes_per_token(lm)
    engine = make_engine(lm, kv_cache_memory=2 * row_bytes + row_bytes // 2, max_context=512)
    pool = engine.kv.pool
    seen = {"rows": 0, "tokens": 0}
    decode = engine._decode_step

    def watching():
        batch = engine.kv.batch
        seen["rows"] = max(seen["rows"], batch.rows)
        seen["tokens"] = max(seen["tokens"], batch.owned_rows() * batch.columns, pool.batch_blocks * pool.block_size)
        decode()

    engine._decode_step = watching
    # ~250 prompt tokens + 150 answer tokens: four rows are admitted (prompt + 64 answer tokens each fit), and
    # outgrow the pool of 1440 tokens before they finish.
    prompts = [encode_prompt(lm.tokenizer, [{"role": "user", "content": f"{i} words " * 40}]) for i in range(6)]
    try:
        async def burst():
            return await asyncio.gather(*(ask(engine, lm, p, 150) for p in prompts))

        answers = asyncio.run(burst())
    finally:
        engine.shutdown()
    assert [last.finish_reason for _, last in answers] == ["length"] * 6
    assert seen["rows"] > 2, f"rows hold their tokens, not 576 each: {seen}"
    assert seen["tokens"] <= pool.tokens, f"never more than the pool: {seen}"
    assert engine.preemptions > 0, "the answers outgrew the pool: the newest rows waited again"
    assert [text for text, _ in answers] == [asyncio.run(ask(plain, lm, p, 150))[0] for p in prompts]


def test_a_request_longer_than_the_budget_allows_fails_alone_with_the_limit_named(lm):
    engine = make_engine(lm, kv_cache_memory=200 * engine_bytes_per_token(lm), max_context=512)
    try:
        assert engine.max_context < 200
        prompt_ids = encode_prompt(lm.tokenizer, [{"role": "user", "content": "words " * 80}])[:100]
        with pytest.raises(ValueError, match="max_new_tokens.*does not fit.*KV cache"):
            asyncio.run(ask(engine, lm, prompt_ids, 150))
        short = encode_prompt(lm.tokenizer, [{"role": "user", "content": "hi"}])
        assert asyncio.run(ask(engine, lm, short, 10))[1].finish_reason in ("length", "stop")
    finally:
        engine.shutdown()


def engine_bytes_per_token(lm) -> int:
    from executor.kv_cache import probe_layer_shapes

    return sum(s.bytes_per_token for s in probe_layer_shapes(lm.model, torch.device("cpu")))


def test_answers_do_not_depend_on_what_else_was_cached(lm, plain):
    """Batch invariance with a prefix cache: the same prompt answered cold, warm and among others."""
    engine = make_engine(lm)
    try:
        prompt_ids = rag_prompt(lm, "Who built the mill?")
        cold = asyncio.run(ask(engine, lm, prompt_ids, 30))[0]
        others = [rag_prompt(lm, f"other {i}") for i in range(5)]

        async def mixed():
            return await asyncio.gather(*(ask(engine, lm, p, 30) for p in others + [prompt_ids]))

        warm = asyncio.run(mixed())[-1][0]
        assert cold == warm == asyncio.run(ask(plain, lm, prompt_ids, 30))[0]
    finally:
        engine.shutdown()


def test_a_burst_against_a_small_budget_stays_within_the_model_plus_the_budget(slow_model):
    """Measured: the resident memory of a fresh process, after one request and sampled every few ms through a
    burst of six long requests (700 + 150 tokens) against a pool of two full-length rows. Prompts being prefilled live in rows of the
    same pool, so the burst adds nothing beyond the budget but the activations of a forward pass."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    budget = 100 * 2**20
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("kv_budget_burst.py")), str(slow_model),
                             str(budget)], cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["finishes"] == ["length"] * 6 and found["tokens"] == [150] * 6, found
    # Rows hold their tokens: as many 700-token prompts run at once as the pool holds (two rows of the longest
    # request were the old reservation), the answers' growth preempting the newest.
    assert found["busiest"] >= 2 and found["busiest"] * 701 <= found["pool_tokens"], found
    assert found["plan_bytes"] <= budget
    mib = 2**20
    # The pool's pages arrive as they are written (kv_pool.lazy_zeros): never more of them than the budget.
    assert 0 < found["pool_peak"] <= budget, found
    grown, burst = found["peak"] - found["baseline"], found["peak"] - found["after_one"]
    # The rest of the process (its RSS but the pool's): a forward pass's activations and the allocator's slack
    # (about 40 MiB measured here). What must not be there: memory per waiting request (each of these prompts'
    # caches is 27 MiB).
    assert grown <= 64 * mib, f"grew {grown / mib:.0f} MiB besides the pool's {found['pool_peak'] / mib:.0f} MiB"
    assert burst <= 48 * mib, f"the burst added {burst / mib:.0f} MiB to what one request needed"


def wait_idle(engine) -> None:
    """The last answers are sent from inside a step; their rows leave at its end, a moment later."""
    deadline = time.monotonic() + 5
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("speculate", [0, 4])
def test_rows_reading_a_cached_prefix_in_place_answer_as_without_a_cache_and_never_write_into_it(lm, plain,
                                                                                                  speculate):
    """Six questions behind the same passages run at once, each reading the passages' blocks where the prefix
    cache keeps them (no copy), in a pool small enough to preempt: answers are those of an engine without a
    cache, the shared blocks hold the same keys and values before and after, and nothing stays pinned."""
    prompts = [rag_prompt(lm, f"Question {i}: what does passage {i % 3 + 1} say?") for i in range(6)]
    expected = [asyncio.run(ask(plain, lm, p, 100))[0] for p in prompts]
    engine = make_engine(lm, speculate=speculate, kv_cache_memory=480 * engine_bytes_per_token(lm), max_context=320)
    kv = engine.kv
    try:
        assert kv.sharing
        warm = asyncio.run(ask(engine, lm, prompts[0], 100))[0]
        path = kv.prefix.match(prompts[1], len(prompts[1]) - 1)
        assert len(path) * 16 >= MIN_REUSED_TOKENS

        def blocks():
            keys, values = kv.prefix.block_views[0]
            return torch.stack([torch.stack([keys[node.index], values[node.index]]) for node in path])

        before = blocks().clone()

        async def together():
            return await asyncio.gather(*(ask(engine, lm, p, 100) for p in prompts[1:]))

        answers = asyncio.run(together())
        wait_idle(engine)
        assert [warm] + [text for text, _ in answers] == expected
        assert all(last.cached_tokens >= len(path) * 16 for _, last in answers)
        assert kv.batch.copied_bytes["hit"] == 0, "every hit read in place"
        assert torch.equal(blocks(), before), "no row wrote into a block it shares"
        assert kv.prefix.pinned_blocks == 0
        assert engine.preemptions > 0, "the pool was short: rows waited again, from the blocks they share"
    finally:
        engine.shutdown()


def long_prompt(lm, tokens: int) -> list:
    """A chat prompt of exactly ``tokens`` tokens (its user message cut to fit)."""
    words = " ".join(f"note {i} on the river mill and the stone town;" for i in range(tokens))
    ids = encode_prompt(lm.tokenizer, [{"role": "user", "content": words}])
    return ids[:tokens - 1] + ids[-1:]


@pytest.mark.parametrize("speculate", [0, 4])
def test_a_long_row_reads_its_head_from_the_prefix_cache_so_short_rows_fit_beside_it(lm, plain, speculate):
    """A long request decoding in a pool that cannot hold two rows as long as it: short chats arriving meanwhile
    do not wait for it to finish. It reads its prompt's blocks where the prefix cache keeps them (a spill), the
    rows are laid out short, the chats finish while it still decodes, and every answer is exact."""
    long_ids = long_prompt(lm, 420)
    shorts = [rag_prompt(lm, f"Question {i}?")[-24:] for i in range(3)]
    expected_long = asyncio.run(ask(plain, lm, long_ids, 80))[0]
    expected = [asyncio.run(ask(plain, lm, p, 16))[0] for p in shorts]
    engine = make_engine(lm, speculate=speculate, kv_cache_memory=800 * engine_bytes_per_token(lm), max_context=512)
    kv = engine.kv
    assert 2 * (len(long_ids) + 1) > kv.pool.tokens, "the test wants a pool that cannot hold two long rows"

    async def scenario():
        finished = []

        async def timed(name, prompt, tokens):
            answer = await ask(engine, lm, prompt, tokens)
            finished.append(name)
            return answer

        long_task = asyncio.create_task(timed("long", long_ids, 80))
        while not kv.batch.rows:
            await asyncio.sleep(0.005)
        answers = await asyncio.gather(*(timed(i, p, 16) for i, p in enumerate(shorts)))
        return (await long_task)[0], [text for text, _ in answers], finished

    try:
        assert kv.sharing
        long_text, texts, finished = asyncio.run(scenario())
        wait_idle(engine)
        assert long_text == expected_long and texts == expected
        assert finished[-1] == "long", f"the short chats waited for the long one: {finished}"
        assert kv.spills >= 1
        assert kv.prefix.pinned_blocks == 0 and kv.batch.rows == 0
    finally:
        engine.shutdown()


def test_a_long_row_spills_when_the_padding_of_the_rows_beside_it_costs_more_than_reading_its_head(lm, plain,
                                                                                                   caplog):
    """The pool is ample, but every short row beside a long one would attend over the long row's columns: once
    enough of them join, the long row reads its head from the prefix cache, and every answer stays exact."""
    long_ids = long_prompt(lm, 420)
    shorts = [rag_prompt(lm, f"Question {i}?")[-24:] for i in range(4)]
    expected_long = asyncio.run(ask(plain, lm, long_ids, 60))[0]
    expected = [asyncio.run(ask(plain, lm, p, 16))[0] for p in shorts]
    engine = make_engine(lm, kv_cache_memory=4000 * engine_bytes_per_token(lm), max_context=512)
    kv = engine.kv
    assert (len(shorts) + 1) * 512 < kv.pool.tokens, "the test wants a pool that holds every row at full length"

    async def scenario():
        long_task = asyncio.create_task(ask(engine, lm, long_ids, 60))
        while not kv.batch.rows:
            await asyncio.sleep(0.005)
        answers = await asyncio.gather(*(ask(engine, lm, p, 16) for p in shorts))
        return (await long_task)[0], [text for text, _ in answers]

    try:
        with caplog.at_level(logging.INFO, logger="jina_llm_stream.kv_manager"):
            long_text, texts = asyncio.run(scenario())
        wait_idle(engine)
        assert long_text == expected_long and texts == expected
        assert kv.spills == 1 and engine.preemptions == 0
        assert "rows beside it cost more than reading its blocks" in caplog.text
        assert kv.prefix.pinned_blocks == 0 and kv.batch.rows == 0
    finally:
        engine.shutdown()
