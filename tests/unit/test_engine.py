"""The engine on tiny real models: same tokens as model.generate, alone or in a batch; cancellation; limits."""

import asyncio
import time

import pytest
import torch

from executor.detok import decode
from executor.engine import Engine, EngineConfig
from executor.errors import EngineError, ServerBusyError
from executor.model import encode_prompt, load
from executor.validation import Limits, fit_to_context, parse_gen_conf

PROMPTS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "中文：你好 😀 café"}],
    [{"role": "user", "content": "Numbers: 1 2 3"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}],
]


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["chat"]))


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_batch_size=8, prefill_chunk=16))
    yield engine.start()
    engine.shutdown()


def settings_for(lm, prompt_ids, gen_conf):
    limits = Limits(context_length=lm.context_length)
    return fit_to_context(parse_gen_conf(gen_conf, limits), len(prompt_ids), limits)


async def collect(engine, lm, prompt_ids, gen_conf):
    events = [e async for e in engine.stream(prompt_ids, settings_for(lm, prompt_ids, gen_conf))]
    return "".join(e.text for e in events), events[-1]


def run(coro):
    return asyncio.run(coro)


def reference(lm, prompt_ids, **kwargs):
    output = lm.model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                               pad_token_id=lm.tokenizer.pad_token_id, **kwargs)
    new = output[0, len(prompt_ids):].tolist()
    if new and new[-1] in lm.eos_token_ids:
        new = new[:-1]
    return decode(lm.tokenizer, new), len(new)


GREEDY_SETTINGS = [
    {"max_new_tokens": 30},
    {"max_new_tokens": 30, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 30, "min_new_tokens": 20},
]


@pytest.mark.parametrize("gen_conf", GREEDY_SETTINGS)
def test_greedy_matches_model_generate(engine, lm, gen_conf):
    for messages in PROMPTS:
        prompt_ids = encode_prompt(lm.tokenizer, messages)
        text, last = run(collect(engine, lm, prompt_ids, gen_conf))
        expected, count = reference(lm, prompt_ids, do_sample=False, **gen_conf)
        assert text == expected
        assert last.completion_tokens == count


def test_seeded_sampling_is_model_generate_s_with_a_draw_keyed_by_seed_and_position(engine, lm):
    """model.generate draws from one generator in sequence; a seeded request reseeds at each position (so that
    its answer does not depend on how many draws came before). With a generate whose sampling step draws the
    same way, the answers are equal: the processors (temperature, top-k, top-p) are generate's own."""
    from executor.sampling import position_seed

    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
    gen_conf = {"max_new_tokens": 30, "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 11}
    text, _ = run(collect(engine, lm, prompt_ids, gen_conf))
    multinomial = torch.multinomial
    generator = torch.Generator()

    def keyed(probs, num_samples, **kwargs):
        position = len(prompt_ids) + keyed.calls
        keyed.calls += 1
        return multinomial(probs, num_samples, generator=generator.manual_seed(position_seed(11, position)))

    keyed.calls = 0
    try:
        torch.multinomial = keyed
        expected, _ = reference(lm, prompt_ids, max_new_tokens=30, do_sample=True, temperature=0.8, top_k=50,
                                top_p=0.9)
    finally:
        torch.multinomial = multinomial
    assert keyed.calls == 30 and text == expected


def test_batched_requests_equal_their_solo_answers(engine, lm):
    confs = [{"max_new_tokens": 12 + 7 * i} for i in range(len(PROMPTS))]
    confs.append({"max_new_tokens": 25, "do_sample": True, "temperature": 0.9, "seed": 5})
    prompts = [encode_prompt(lm.tokenizer, m) for m in PROMPTS] + [encode_prompt(lm.tokenizer, PROMPTS[1])]
    alone = [run(collect(engine, lm, p, c))[0] for p, c in zip(prompts, confs)]

    async def together():
        return await asyncio.gather(*(collect(engine, lm, p, c) for p, c in zip(prompts, confs)))

    steps_before = engine.steps
    batched = [text for text, _ in run(together())]
    assert batched == alone
    # Shared forward passes: far fewer steps than the sum of the answers' lengths.
    assert engine.steps - steps_before < sum(c["max_new_tokens"] for c in confs) * 0.6


def test_stop_string_ends_the_answer_before_it(engine, lm):
    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
    full, _ = run(collect(engine, lm, prompt_ids, {"max_new_tokens": 40}))
    stop = full[10:13]
    text, last = run(collect(engine, lm, prompt_ids, {"max_new_tokens": 40, "stop": [stop]}))
    assert text == full[:full.index(stop)]
    assert last.finish_reason == "stop"


def test_presence_and_frequency_penalties_change_the_answer(engine, lm):
    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[2])
    plain, _ = run(collect(engine, lm, prompt_ids, {"max_new_tokens": 30}))
    penalised, _ = run(collect(engine, lm, prompt_ids, {"max_new_tokens": 30, "frequency_penalty": 2.0,
                                                        "presence_penalty": 2.0}))
    assert penalised != plain


def test_cancelled_stream_stops_the_work(engine, lm):
    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
    settings = settings_for(lm, prompt_ids, {"max_new_tokens": 400, "stop": ["\x00never"]})

    async def leave_after_first_piece():
        stream = engine.stream(prompt_ids, settings)
        async for event in stream:
            break
        await stream.aclose()

    run(leave_after_first_piece())
    deadline = time.monotonic() + 2
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load() == {"waiting": 0, "prefilling": 0, "running": 0}
    steps = engine.steps
    time.sleep(0.3)
    assert engine.steps == steps, "the engine kept decoding for a client that left"


def test_cancel_while_waiting_in_the_queue(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_queue=4))  # not started
    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
    events = []
    handle = engine.submit(prompt_ids, settings_for(lm, prompt_ids, {"max_new_tokens": 5}), events.append)
    handle.cancel()
    engine.start()
    time.sleep(0.2)
    engine.shutdown()
    assert events == [] and engine.steps == 0


def test_full_queue_answers_busy(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_queue=2))  # not started: nothing drains
    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
    settings = settings_for(lm, prompt_ids, {"max_new_tokens": 5})
    engine.submit(prompt_ids, settings, lambda e: None)
    engine.submit(prompt_ids, settings, lambda e: None)
    with pytest.raises(ServerBusyError, match="server busy.*max_queue=2.*retry later"):
        engine.submit(prompt_ids, settings, lambda e: None)


def test_failed_forward_pass_fails_its_requests_and_the_engine_keeps_serving(lm, monkeypatch):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig()).start()
    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
    real_forward = lm.model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", failing_forward)
    try:
        with pytest.raises(EngineError, match="simulated out of memory"):
            run(collect(engine, lm, prompt_ids, {"max_new_tokens": 10}))
        text, last = run(collect(engine, lm, prompt_ids, {"max_new_tokens": 10}))
        assert last.finish_reason == "length" and last.completion_tokens == 10
    finally:
        engine.shutdown()


def test_a_step_that_fails_after_some_rows_finished_ends_each_row_once(lm, monkeypatch, caplog):
    """The step chose every row's token and one row finished (released, its last event sent); then the step
    failed. The finished row keeps its ending; only the others fail, each with one log line."""
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(prefill_chunk=64)).start()
    short, long = (encode_prompt(lm.tokenizer, m) for m in PROMPTS[:2])
    real_remove = engine.runner.remove_rows

    def remove_then_fail(indices):
        if indices:  # rows that finished this step leave: the step fails right after
            raise RuntimeError("simulated failure after the rows finished")
        real_remove(indices)

    async def both():
        return await asyncio.gather(collect(engine, lm, short, {"max_new_tokens": 3, "min_new_tokens": 3}),
                                    collect(engine, lm, long, {"max_new_tokens": 20, "min_new_tokens": 20}),
                                    return_exceptions=True)

    monkeypatch.setattr(engine.runner, "remove_rows", remove_then_fail)
    try:
        with caplog.at_level("INFO", logger="jina_llm_stream.engine"):
            finished, failed = run(both())
        assert finished[1].finish_reason == "length" and finished[1].completion_tokens == 3
        assert isinstance(failed, EngineError) and "simulated failure" in str(failed)
        endings = [line for line in caplog.text.splitlines() if " finish=" in line]
        assert len(endings) == 2 and sum("finish=length" in line for line in endings) == 1, endings
        monkeypatch.setattr(engine.runner, "remove_rows", real_remove)
        assert run(collect(engine, lm, long, {"max_new_tokens": 5}))[1].finish_reason == "length"  # still serving
    finally:
        engine.shutdown()


def test_request_time_limit(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(request_timeout=0.2)).start()
    prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
    try:
        slow_forward = lm.model.forward

        def slow(*args, **kwargs):
            time.sleep(0.02)
            return slow_forward(*args, **kwargs)

        lm.model.forward = slow
        _, last = run(collect(engine, lm, prompt_ids, {"max_new_tokens": 400, "stop": ["\x00never"]}))
        assert last.finish_reason == "time_limit" and last.completion_tokens < 400
    finally:
        del lm.model.forward
        engine.shutdown()


def test_request_time_limit_counts_from_a_prompts_first_row_not_from_its_calls_arrival(lm):
    """A job longer than request_timeout is not cut off: each prompt has the limit from its first row."""
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids,
                    EngineConfig(max_batch_size=2, request_timeout=0.5)).start()
    slow_forward = lm.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return slow_forward(*args, **kwargs)

    lm.model.forward = slow
    try:
        prompts = call_prompts(lm, 16)
        gen_conf = {"max_new_tokens": 5, "min_new_tokens": 5}
        started = time.monotonic()
        answers = run(engine.complete([(p, settings_for(lm, p, gen_conf)) for p in prompts]))
        assert time.monotonic() - started > 0.5, "the job should outlast request_timeout"
        assert [last.finish_reason for _, last in answers] == ["length"] * 16
    finally:
        del lm.model.forward
        engine.shutdown()


def test_sentencepiece_llama_streams_exactly_what_generate_decodes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).eval()
    engine = Engine(model, tokenizer, [tokenizer.eos_token_id], EngineConfig()).start()
    try:
        for text in ["The quick brown fox", "café 🦄 中文"]:
            prompt_ids = tokenizer(text)["input_ids"]
            settings = fit_to_context(parse_gen_conf({"max_new_tokens": 40}, Limits()), len(prompt_ids), Limits())

            async def go():
                return "".join([e.text async for e in engine.stream(prompt_ids, settings)])

            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=40, do_sample=False)
            new = [t for t in out[0, len(prompt_ids):].tolist() if t != tokenizer.eos_token_id]
            assert run(go()) == decode(tokenizer, new)
    finally:
        engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_with_device_map_auto_batched_answers_match_generate(tiny_models):
    lm = load(str(tiny_models["chat"]), device="auto")
    assert lm.model.device.type == "cuda"
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig()).start()
    try:
        prompts = [encode_prompt(lm.tokenizer, m) for m in PROMPTS]

        async def together():
            return await asyncio.gather(*(collect(engine, lm, p, {"max_new_tokens": 20}) for p in prompts))

        for (text, _), prompt_ids in zip(run(together()), prompts):
            out = lm.model.generate(torch.tensor([prompt_ids], device="cuda"), max_new_tokens=20, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
            new = [t for t in out[0, len(prompt_ids):].tolist() if t not in lm.eos_token_ids]
            assert text == decode(lm.tokenizer, new)
        seeded = {"max_new_tokens": 20, "do_sample": True, "seed": 3}
        assert run(collect(engine, lm, prompts[0], seeded))[0] == run(collect(engine, lm, prompts[0], seeded))[0]
    finally:
        engine.shutdown()


def test_a_model_without_eos_runs_to_max_new_tokens(lm):
    engine = Engine(lm.model, lm.tokenizer, [], EngineConfig()).start()  # a tokenizer without EOS
    try:
        prompt_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
        text, last = run(collect(engine, lm, prompt_ids, {"max_new_tokens": 25}))
        assert last.finish_reason == "length" and last.completion_tokens == 25
    finally:
        engine.shutdown()


def test_chat_template_output_is_bounded(lm):
    from executor.model import PromptTooLong

    class Tokenizer:  # the real tokenizer with a template that multiplies its input
        chat_template = "{% for m in messages %}{% for i in range(1000) %}{{ m['content'] }}{% endfor %}{% endfor %}"

        def __getattr__(self, name):
            return getattr(lm.tokenizer, name)

        def apply_chat_template(self, *args, **kwargs):
            return lm.tokenizer.apply_chat_template(*args, **kwargs)

        def __call__(self, *args, **kwargs):
            return lm.tokenizer(*args, **kwargs)

    messages = [{"role": "user", "content": "x" * 100}]
    with pytest.raises(PromptTooLong, match="produced 100000 characters; at most 50000"):
        encode_prompt(Tokenizer(), messages, max_chars=50_000)
    assert len(encode_prompt(Tokenizer(), messages, max_chars=200_000)) > 0


# ---- calls: many prompts queued as a unit, fed as rows free up -------------------------------------------
def call_prompts(lm, count):
    return [encode_prompt(lm.tokenizer, [{"role": "user", "content": f"Question {i}: tell me about item {i}."}])
            for i in range(count)]


def test_a_call_larger_than_the_free_queue_is_refused_whole_and_leaves_nothing_behind(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_queue=10))  # not started
    prompts = call_prompts(lm, 11)
    requests = [(p, settings_for(lm, p, {"max_new_tokens": 5}), lambda e: None) for p in prompts]
    with pytest.raises(ServerBusyError, match=r"0 prompts are already waiting and this call brings 11 \(max_queue=10\)"):
        engine.submit_call(requests)
    assert engine.load()["waiting"] == 0
    engine.submit_call(requests[:10])  # a call that fits on an idle server is never refused
    assert engine.load()["waiting"] == 10


def test_a_cancelled_call_leaves_the_queue_at_once(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_queue=10))  # not started
    prompts = call_prompts(lm, 10)
    handle = engine.submit_call([(p, settings_for(lm, p, {"max_new_tokens": 5}), lambda e: None) for p in prompts])
    handle.cancel()
    assert engine.load()["waiting"] == 0  # no scheduler round needed: the next caller finds the room free
    engine.submit_call([(p, settings_for(lm, p, {"max_new_tokens": 5}), lambda e: None) for p in prompts])


def test_complete_returns_every_answer_in_order_equal_to_asking_alone(engine, lm):
    prompts = call_prompts(lm, 40)
    gen_conf = {"max_new_tokens": 10}
    alone = [run(collect(engine, lm, p, gen_conf))[0] for p in prompts[:6]]
    answers = run(engine.complete([(p, settings_for(lm, p, gen_conf)) for p in prompts], label="test"))
    assert len(answers) == 40 and [text for text, _ in answers[:6]] == alone
    assert all(last.finish_reason in ("stop", "length") for _, last in answers)
    # The last answers are delivered from inside the engine's step; their rows leave at the step's end, a
    # moment later (under load, after the call has returned).
    deadline = time.monotonic() + 5
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load() == {"waiting": 0, "prefilling": 0, "running": 0}
    assert run(asyncio.wait_for(engine.complete([]), 5)) == []  # an empty call is answered at once


def test_a_stream_preempts_a_batch_call_and_both_answers_stay_exact(lm):
    """A call fills every row; a stream that arrives takes one at once (a batch row is preempted and
    recomputed later) and ends long before the call; greedy answers are unchanged by the preemption."""
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_batch_size=4, prefill_chunk=64)).start()
    try:
        prompts = call_prompts(lm, 24)
        gen_conf = {"max_new_tokens": 40, "min_new_tokens": 40}
        alone = [run(collect(engine, lm, p, gen_conf))[0] for p in prompts]
        stream_ids = encode_prompt(lm.tokenizer, PROMPTS[0])
        stream_alone = run(collect(engine, lm, stream_ids, gen_conf))[0]

        async def scenario():
            job = asyncio.ensure_future(engine.complete([(p, settings_for(lm, p, gen_conf)) for p in prompts]))
            while engine.load()["running"] < 4:
                await asyncio.sleep(0.001)
            steps_at_arrival = engine.steps
            events = [e async for e in engine.stream(stream_ids, settings_for(lm, stream_ids, gen_conf))]
            stream_steps, job_done_then = engine.steps - steps_at_arrival, job.done()
            return await job, events, stream_steps, job_done_then

        answers, events, stream_steps, job_done_then = run(scenario())
        assert not job_done_then, "the stream should not have waited for the batch call"
        assert stream_steps <= 40 + 3, f"the stream took {stream_steps} decode steps for 40 tokens"
        assert engine.preemptions >= 1
        assert "".join(e.text for e in events) == stream_alone
        assert [text for text, _ in answers] == alone
    finally:
        engine.shutdown()


def test_preempted_sampling_row_keeps_its_seeded_answer(lm):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids, EngineConfig(max_batch_size=2)).start()
    try:
        prompts = call_prompts(lm, 2)
        sampled = {"max_new_tokens": 40, "min_new_tokens": 40, "do_sample": True, "temperature": 0.9, "seed": 7}
        alone = [run(collect(engine, lm, p, sampled))[0] for p in prompts]
        stream_ids = encode_prompt(lm.tokenizer, PROMPTS[2])

        async def scenario():
            job = asyncio.ensure_future(engine.complete([(p, settings_for(lm, p, sampled)) for p in prompts]))
            while engine.steps == 0 or engine.load()["running"] < 2:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)  # some tokens into the answers
            [e async for e in engine.stream(stream_ids, settings_for(lm, stream_ids, {"max_new_tokens": 5}))]
            return await job

        before = engine.preemptions
        answers = run(scenario())
        assert engine.preemptions > before
        assert [text for text, _ in answers] == alone
    finally:
        engine.shutdown()
