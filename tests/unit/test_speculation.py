"""Speculative decoding (executor/speculation.py): drafts from the request's own n-grams, verified inside the
continuous batch. Greedy answers equal plain decoding for every row of a batch, rejected drafts leave the
KV storage and the prefix cache as if never drafted, sampled tokens follow the target distribution, and a
batch whose drafts are rejected stops drafting."""

import asyncio
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from executor import speculation
from executor.engine import Engine, EngineConfig
from executor.kv_cache import BatchKV, LayerShape
from executor.model import encode_prompt, load
from executor.sampling import choose_against_draft
from executor.speculation import NgramDrafter, Speculator, StepCost, expected_kept, verify_row
from executor.validation import Limits, fit_to_context, parse_gen_conf


# ---- drafts ------------------------------------------------------------------------------------------
def sequence_of(prompt, generated=(), grammar=None, max_new_tokens=100, seed=None, do_sample=False):
    settings = SimpleNamespace(grammar=grammar, max_new_tokens=max_new_tokens, seed=seed)
    return SimpleNamespace(prompt_ids=list(prompt), generated=list(generated), settings=settings, drafter=None,
                           max_new_tokens=max_new_tokens, sampler=SimpleNamespace(do_sample=do_sample))


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_last_tokens():
    drafter = NgramDrafter()
    drafter.sync(sequence_of([5, 6, 7, 8, 9, 1, 6, 7, 4, 2, 3, 6, 7]))
    assert drafter.propose(3) == [4, 2, 3]  # "6 7" last continued with 4 (the latest occurrence wins)
    drafter.sync(sequence_of([5, 6, 7, 8, 9, 1, 6, 7, 4, 2, 3, 6, 7], generated=[4, 2]))
    assert drafter.propose(2) == [3, 6]  # "7 4 2" (the 3-gram) continued with 3, 6, ...
    drafter.sync(sequence_of([5, 6, 7, 8, 9, 1, 6, 7, 4, 2, 3, 6, 7], generated=[4, 2, 0]))
    assert drafter.propose(4) == [] and drafter.propose(0) == []  # "2 0": never seen


def test_acceptance_follows_the_recent_record_and_expected_tokens_decay_geometrically():
    drafter = NgramDrafter()
    assert drafter.acceptance() == pytest.approx(0.5)
    for _ in range(10):
        drafter.forget_a_little()
        drafter.record(4, 4)
    high = drafter.acceptance()
    for _ in range(10):
        drafter.forget_a_little()
        drafter.record(4, 0)
    assert high > 0.9 and drafter.acceptance() < 0.2
    assert (drafter.drafted, drafter.accepted) == (80, 40)
    assert expected_kept(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)


def test_the_step_cost_is_a_line_fitted_to_the_measured_steps():
    def seconds(cost, tokens, padding=0):
        fixed, per_token, per_padding = cost.line()
        return fixed + per_token * tokens + per_padding * padding

    cost = StepCost()
    assert seconds(cost, 1) > 0 and cost.line()[2] == 0  # a prior before any step
    for tokens in (1, 2, 4, 8, 16) * 50:
        cost.observe(tokens, 0.05 + 0.01 * tokens)
    assert seconds(cost, 32) == pytest.approx(0.05 + 0.32, rel=0.01)  # the data outweigh the prior
    assert cost.line()[2] == 0  # plain steps say nothing of padding
    for tokens, padding in ((16, 0), (24, 40), (32, 48), (20, 124), (48, 0)) * 50:  # packed verify steps too
        cost.observe(tokens, 0.05 + 0.01 * tokens + 0.002 * padding, padding)
    assert cost.line() == pytest.approx((0.05, 0.01, 0.002), rel=0.05)


def test_the_width_follows_acceptance_against_cost():
    speculator = Speculator(8)
    for tokens in (1, 5, 9) * 10:
        speculator.cost.observe(tokens, 0.05 + 0.005 * tokens)  # one more token: a tenth of a step
    drafts = [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert speculator.best_width(1, drafts, [0.95], 8) == 9  # quotes: the whole draft
    assert speculator.best_width(1, drafts, [0.05], 8) == 1  # free text: plain steps
    # A dense step pays the width for every row: one row's good draft does not carry fifteen without one.
    assert speculator.best_width(16, drafts + [[]] * 15, [0.95] + [0.0] * 15, 8) < 9
    # Packed (the Linear layers skip the padding), the quoting row pays for its own draft only.
    packed = Speculator(8, packed=True)
    packed.cost = speculator.cost
    assert packed.best_width(16, drafts + [[]] * 15, [0.95] + [0.0] * 15, 8) == 9
    assert packed.best_width(16, drafts + [[]] * 15, [0.05] + [0.0] * 15, 8) == 1
    # Where attention over the padding costs (long rows), fifteen rows of padding outweigh one row's draft,
    # and rows that all draft still do (no padding).
    for tokens, padding in ((16, 0), (24, 40), (20, 60), (17, 31)) * 20:
        packed.cost.observe(tokens, 0.05 + 0.005 * tokens + 0.002 * padding, padding)
    assert packed.cost.line()[2] == pytest.approx(0.002, rel=0.05)
    assert packed.best_width(16, drafts + [[]] * 15, [0.95] + [0.0] * 15, 8) == 1
    assert packed.best_width(16, drafts * 16, [0.95] * 16, 8) > 1


def plain_seconds(tokens: int) -> float:
    return 0.04 + 0.0016 * tokens


def simulated_rate(speculator, rows: int, draft: int, true_acceptance: float, steps: int = 400,
                   hidden_overhead: float = 1.4) -> float:
    """Tokens per second of ``steps`` steps chosen by ``speculator`` on a simulated machine shaped like the default
    model in int8 on 2 cores (one row 42 ms, 16 rows 66 ms): a plain step of r rows takes plain_seconds(r), a
    verify step ``hidden_overhead`` times what that line says for its positions (a
    cost the speculator's line does not model: its plain steps never show it). Each row offers a ``draft``-token
    guess every step, kept position by position with ``true_acceptance`` (the rows' record starts at the
    optimistic prior). Plain steps alone: rows / plain_seconds(rows)."""
    import random

    chance, drafters = random.Random(7), [NgramDrafter() for _ in range(rows)]
    for batch in list(range(1, 17)) * 4:  # the batch filled up: plain steps of every size taught the line
        speculator.plain_step(batch, plain_seconds(batch))
    tokens = seconds = 0.0
    for _ in range(steps):
        for drafter in drafters:
            drafter.forget_a_little()
        width = speculator.best_width(rows, [[0] * draft] * rows, [d.acceptance() for d in drafters], draft)
        if width == 1:
            speculator.payoff.declined()
            took = plain_seconds(rows)
            speculator.plain_step(rows, took)
            tokens, seconds = tokens + rows, seconds + took
            continue
        kept = []
        for drafter in drafters:
            accepted = next((i for i in range(width - 1) if chance.random() >= true_acceptance), width - 1)
            drafter.record(width - 1, accepted)
            kept.append(accepted + 1)
        took = hidden_overhead * plain_seconds(rows * width)
        speculator.verify_step(rows, rows * width, 0, took, emitted=sum(kept))
        tokens, seconds = tokens + sum(kept), seconds + took
    return tokens / seconds


def test_drafting_is_never_slower_than_plain_steps_where_verify_steps_cost_more_than_the_line_says(monkeypatch):
    plain, alone = 16 / plain_seconds(16), 1 / plain_seconds(1)
    # Free text: drafts of 4 kept a third of the time, verify steps 40% dearer than modelled.
    assert simulated_rate(Speculator(16), 16, 4, 0.33) >= 0.97 * plain
    assert simulated_rate(Speculator(16), 1, 4, 0.33) >= 0.97 * alone
    # Quoting (one row, drafts kept 95% of the time) keeps most of its gain despite the overhead.
    assert simulated_rate(Speculator(16), 1, 16, 0.95) >= 4 * alone
    # A picker that drafts whatever it finds loses on free text (the simulation can tell).
    monkeypatch.setattr(speculation.Speculator, "best_width", lambda self, rows, drafts, acc, longest: longest + 1)
    assert simulated_rate(Speculator(16), 16, 4, 0.33) < 0.6 * plain


def test_verify_steps_that_deliver_less_than_promised_raise_the_bar_which_eases_back_after_a_bad_stretch():
    speculator = Speculator(8)
    for tokens in (1, 5, 9) * 10:
        speculator.cost.observe(tokens, 0.05 + 0.005 * tokens)
    drafts = [[1, 2, 3, 4]]
    assert speculator.best_width(1, drafts, [0.5], 4) > 1  # promises ~1.4x
    for _ in range(10):
        speculator.payoff.delivered(1.5, 0.75)  # verify steps delivered half their promise
    assert speculator.payoff.ratio < 0.6
    assert speculator.best_width(1, drafts, [0.5], 4) == 1
    assert speculator.best_width(1, [[1] * 8], [0.95], 8) == 9  # a quote still promises enough
    for _ in range(100):
        speculator.payoff.declined()
    assert speculator.payoff.ratio > 0.9 and speculator.best_width(1, drafts, [0.5], 4) > 1


def test_rows_with_a_grammar_or_no_room_left_do_not_draft_and_seeded_rows_do():
    speculator = Speculator(8)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    assert speculator.plan([sequence_of(prompt, grammar=object())]) is None
    assert speculator.plan([sequence_of(prompt, max_new_tokens=1)]) is None
    assert speculator.plan([sequence_of(prompt, seed=7, do_sample=True)])  # a draw keyed by seed and position
    plan = speculator.plan([sequence_of(prompt)])  # "3 1 2" continued with 3 1 2 (the end of the prompt)
    assert plan and plan[0] and plan[0] == [3, 1, 2][:len(plan[0])]


# ---- sampling against a draft ------------------------------------------------------------------------
def test_sampled_tokens_follow_the_target_distribution_whatever_was_drafted():
    scores = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    target = torch.softmax(scores, dim=-1)
    draws = 20000
    for draft in (0, 3, None):
        generator = torch.Generator().manual_seed(7)
        sampler = SimpleNamespace(do_sample=True, draw_generator=lambda: generator)
        counts = Counter(choose_against_draft(sampler, scores.clone(), draft) for _ in range(draws))
        for token, p in enumerate(target.tolist()):
            assert abs(counts[token] / draws - p) < 4 * (p * (1 - p) / draws) ** 0.5 + 1e-3, (draft, token, counts)


def test_greedy_keeps_a_draft_only_where_it_is_the_argmax():
    sampler = SimpleNamespace(do_sample=False)
    scores = torch.tensor([0.1, 3.0, 0.2])
    assert choose_against_draft(sampler, scores, 1) == 1 and choose_against_draft(sampler, scores, 2) == 1


def test_verify_row_stops_at_the_first_token_that_differs_and_keeps_the_model_s_choice():
    sampler = SimpleNamespace(do_sample=False, settings=SimpleNamespace(logprobs=False, grammar=None),
                              process=lambda scores: None)
    logits = torch.full((4, 10), -1.0)
    for position, token in enumerate([4, 5, 9, 7]):
        logits[position, token] = 1.0
    accepted = []
    inputs, next_token, kept_drafts = verify_row(sampler, logits, [4, 5, 6], lambda t, lp: accepted.append(t) or True)
    assert (inputs, next_token, kept_drafts, accepted) == (3, 9, 2, [4, 5, 9])
    accepted.clear()
    assert verify_row(sampler, logits, [4, 5, 9], lambda t, lp: accepted.append(t) or True) == (4, 7, 3)
    assert verify_row(sampler, logits, [4, 5, 9], lambda t, lp: t != 5) == (2, None, 1)  # finished at 5


# ---- the storage -------------------------------------------------------------------------------------
def test_rejected_columns_leave_the_row_as_if_they_were_never_written():
    shapes = [LayerShape(2, 4, 4, torch.float32)] * 2
    batch = BatchKV(shapes, 3, 64, torch.device("cpu"))
    held = [[(torch.randn(2, n, 4), torch.randn(2, n, 4)) for _ in shapes] for n in (5, 8, 3)]
    for kv in held:
        batch.add_row(kv, kv[0][0].shape[1])
    for kept in ([4, 1, 2], [1, 3, 3]):  # two steps: the first step's holes end up inside the rows
        new = [(torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)) for _ in shapes]  # [rows, heads, width, dim]
        batch.start_step(4)
        for layer, (keys, values) in zip(batch.layers, new):
            layer.update(keys, values)
        batch.commit_step(4, kept)
        held = [[(torch.cat([k, nk[row, :, :keep]], dim=1), torch.cat([v, nv[row, :, :keep]], dim=1))
                 for (k, v), (nk, nv) in zip(kv, new)] for row, (kv, keep) in enumerate(zip(held, kept))]
    assert batch.column == 8 + 4 + 3 and [batch.held(r) for r in range(3)] == [10, 12, 8]
    assert batch.holes[:3] == [0 + 2, 3 + 0, 2 + 0]

    def assert_rows_hold_exactly_what_was_kept():
        for row, kv in enumerate(held):
            assert batch.held(row) == kv[0][0].shape[1]
            stored = batch.row_kv(row, 0, batch.held(row))
            for (keys, values), (want_keys, want_values) in zip(stored, kv):
                assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
            middle = batch.row_kv(row, 2, 7)  # any range of its own positions
            assert torch.equal(middle[0][0], kv[0][0][:, 2:7])

    assert_rows_hold_exactly_what_was_kept()
    batch._move_live_columns_to_start()  # squeezes the holes out
    assert batch.holes[:3] == [0, 0, 0] and batch.column == 12
    assert_rows_hold_exactly_what_was_kept()
    for row in range(3):
        assert int(batch.mask[row, :batch.column].sum()) == batch.held(row)


# ---- the engine --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["chat"]))


PROMPTS = [
    [{"role": "user", "content": "one two three four five one two three four five one two three"}],
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4}],
    [{"role": "user", "content": "Numbers: 1 2 3 1 2 3 1 2"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "中文：你好 😀 café"}],
]


def answers(lm, speculate: int, gen_conf: dict, prompts=PROMPTS, prefix_caching=True):
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids,
                    EngineConfig(max_batch_size=8, prefill_chunk=16, speculate=speculate,
                                 prefix_caching=prefix_caching)).start()
    limits = Limits(context_length=lm.context_length)

    async def one(messages):
        ids = encode_prompt(lm.tokenizer, messages)
        events = [e async for e in engine.stream(ids, fit_to_context(parse_gen_conf(gen_conf, limits), len(ids), limits))]
        return "".join(e.text for e in events), events[-1]

    async def everyone():
        return await asyncio.gather(*(one(m) for m in prompts))

    try:
        return asyncio.run(everyone()), engine
    finally:
        engine.shutdown()


def reference_ids(lm, messages, max_new_tokens: int, **generate_kwargs) -> list:
    ids = encode_prompt(lm.tokenizer, messages)
    out = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                            **generate_kwargs)
    return out[0, len(ids):].tolist()


@pytest.fixture
def oracle_drafts(lm, monkeypatch, request):
    """Drafts made from the greedy answer itself, right, wrong or half right depending on the prompt (so
    the rows of one batch accept all, none or part of their drafts), and every step as wide as the longest
    draft: the verification's every path runs, whatever the tiny random model would repeat."""
    import executor.speculation as speculation

    answers_by_prompt = {}

    class OracleDrafter(speculation.NgramDrafter):
        def sync(self, sequence):
            self.sequence = sequence

        def propose(self, most):
            answer, kind = answers_by_prompt.get(tuple(self.sequence.prompt_ids), ([], "right"))
            draft = answer[len(self.sequence.generated):][:most]
            if kind == "wrong":
                return [(token + 1) % 600 for token in draft]
            if kind == "half" and len(draft) > 1:
                draft[len(draft) // 2] = (draft[len(draft) // 2] + 1) % 600
            return draft

    monkeypatch.setattr(speculation, "NgramDrafter", OracleDrafter)
    monkeypatch.setattr(speculation.Speculator, "best_width", lambda self, rows, drafts, acc, longest: longest + 1)
    gen_conf = request.node.callspec.params.get("gen_conf", {}) if hasattr(request.node, "callspec") else {}
    penalty = {"repetition_penalty": gen_conf["repetition_penalty"]} if "repetition_penalty" in gen_conf else {}
    for messages, kind in zip(PROMPTS, ["right", "wrong", "half", "right", "half"]):
        answers_by_prompt[tuple(encode_prompt(lm.tokenizer, messages))] = (reference_ids(lm, messages, 80, **penalty),
                                                                           kind)


@pytest.mark.parametrize("gen_conf", [{"max_new_tokens": 60},
                                      {"max_new_tokens": 60, "repetition_penalty": 1.3, "logprobs": True,
                                       "top_logprobs": 2, "stop": ["zzz"]}])
def test_greedy_answers_equal_plain_decoding_for_every_row_of_a_batch(lm, gen_conf, oracle_drafts, caplog):
    plain, plain_engine = answers(lm, 0, gen_conf)
    with caplog.at_level("INFO", logger="jina_llm_stream.engine"):
        speculated, engine = answers(lm, 8, gen_conf)
    assert [text for text, _ in speculated] == [text for text, _ in plain]
    if gen_conf.get("logprobs"):
        for (_, a), (_, b) in zip(speculated, plain):
            assert [lp.token_id for lp in a.logprobs] == [lp.token_id for lp in b.logprobs]
            assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-4)
    counts = [(int(d), int(a)) for d, a in re.findall(r"drafted=(\d+) accepted=(\d+)", caplog.text)]
    assert len(counts) == len(PROMPTS), caplog.text
    # Rows that accepted every draft, none, and part of them, in one batch.
    assert any(d == a > 0 for d, a in counts) and any(d > 0 == a for d, a in counts), counts
    assert any(d > a > 0 for d, a in counts), counts
    assert engine.steps < plain_engine.steps


def test_the_drafts_of_a_real_model_quoting_its_prompt_are_accepted_and_change_nothing(caplog):
    """SmolLM2-135M-Instruct (the default model) quoting its passage: n-gram drafts, greedy, alone and
    beside free text in one batch."""
    from executor.gguf_model import default_model_file, dequantized

    real = load(str(dequantized(default_model_file())))
    passage = ("The Zorblat river rises in the Krell hills and flows north through the town of Quentaville, where "
               "it is crossed by the old Amber bridge, before it reaches the sea at Port Mallow.")
    quote = [{"role": "system", "content": "Use the following passage to answer the question.\n\nPassage: " + passage},
             {"role": "user", "content": "Where does the Zorblat river rise?"}]
    free = [{"role": "user", "content": "Write a short story about a cat."}]
    plain, _ = answers(real, 0, {"max_new_tokens": 40}, [quote, free])
    with caplog.at_level("INFO", logger="jina_llm_stream.engine"):
        speculated, _ = answers(real, 8, {"max_new_tokens": 40}, [quote, free])
    assert [t for t, _ in speculated] == [t for t, _ in plain]
    assert "Krell hills" in speculated[0][0]
    quoted = re.search(r"request=1 .* new_tokens=(\d+) .* drafted=(\d+) accepted=(\d+)", caplog.text)
    assert quoted and int(quoted[3]) >= int(quoted[1]) // 2, caplog.text  # most of the quote came from drafts


def run_ids(lm, speculate: int, prompts_ids: list, gen_conf, prefix_caching=True, engine=None):
    """Each prompt's (text, final event), all at once; ``gen_conf``: one for all, or a list, one per prompt."""
    own = engine is None
    engine = engine or Engine(lm.model, lm.tokenizer, lm.eos_token_ids,
                              EngineConfig(max_batch_size=8, prefill_chunk=16, speculate=speculate,
                                           prefix_caching=prefix_caching)).start()
    limits = Limits(context_length=lm.context_length)

    confs = gen_conf if isinstance(gen_conf, list) else [gen_conf] * len(prompts_ids)

    async def one(ids, conf):
        events = [e async for e in engine.stream(ids, fit_to_context(parse_gen_conf(conf, limits), len(ids), limits))]
        return "".join(e.text for e in events), events[-1]

    async def everyone():
        return await asyncio.gather(*(one(ids, conf) for ids, conf in zip(prompts_ids, confs)))

    try:
        return asyncio.run(everyone())
    finally:
        if own:
            engine.shutdown()


def test_what_a_speculating_row_leaves_in_the_prefix_cache_is_what_plain_decoding_computes(lm, oracle_drafts):
    """Rows that accepted all, none and part of their drafts leave the batch; their blocks (prompt and answer)
    are remembered. Follow-up prompts that resend prompt + answer are served from those blocks, and their
    greedy answers equal those computed with no cache at all."""
    prompts_ids = [encode_prompt(lm.tokenizer, m) for m in PROMPTS]
    engine = Engine(lm.model, lm.tokenizer, lm.eos_token_ids,
                    EngineConfig(max_batch_size=8, prefill_chunk=16, speculate=8)).start()
    try:
        run_ids(lm, 8, prompts_ids, {"max_new_tokens": 60}, engine=engine)
        follow_ups = [ids + reference_ids(lm, m, 60)[:60] + [5, 6, 7] for ids, m in zip(prompts_ids, PROMPTS)]
        cached = run_ids(lm, 8, follow_ups, {"max_new_tokens": 20}, engine=engine)
    finally:
        engine.shutdown()
    uncached = run_ids(lm, 0, follow_ups, {"max_new_tokens": 20}, prefix_caching=False)
    assert [text for text, _ in cached] == [text for text, _ in uncached]
    for ids, (_, final) in zip(follow_ups, cached):
        assert final.cached_tokens >= (len(ids) - 3) // 16 * 16 - 16, (len(ids), final.cached_tokens)


def test_seeded_sampled_answers_are_those_of_plain_decoding(lm, oracle_drafts, caplog):
    """Seeded sampled rows draft (the oracle's drafts of the greedy answer: some kept, most not), and their
    answers are the ones --speculate 0 gives: the draw at each position depends on the seed and the position
    only, and a verify step keeps a draft only where it is the token drawn there."""
    conf = {"max_new_tokens": 40, "do_sample": True, "temperature": 0.8, "seed": 11}
    plain, _ = answers(lm, 0, conf)
    with caplog.at_level("INFO", logger="jina_llm_stream.engine"):
        speculated, engine = answers(lm, 8, conf)
    assert [t for t, _ in speculated] == [t for t, _ in plain]
    counts = [(int(d), int(a)) for d, a in re.findall(r"drafted=(\d+) accepted=(\d+)", caplog.text)]
    assert sum(d for d, _ in counts) > 0 and sum(a for _, a in counts) > 0, counts
    assert [t for t, _ in answers(lm, 8, conf)[0]] == [t for t, _ in plain]


def test_a_sliding_window_model_does_not_speculate(caplog):
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8)).eval()
    with caplog.at_level("INFO", logger="jina_llm_stream.engine"):
        engine = Engine(model, None, [0], EngineConfig(max_batch_size=2, speculate=4, max_context=64))
    assert engine.speculator is None and "sliding-window" in caplog.text


def test_no_row_gets_a_position_past_a_learned_position_table(tmp_path, monkeypatch):
    """GPT-2 has a table of n_positions learned positions: a row at the end of its context beside a drafting
    row gets the step's width of padding, whose positions must stay inside the table. Both rows finish, with
    the answers of plain decoding."""
    import executor.speculation as speculation
    from tiny_models import build_gpt2, build_tokenizer

    path = build_gpt2(tmp_path / "gpt2-160", build_tokenizer(), n_positions=160)
    lm = load(str(path))

    class WrongDrafter(speculation.NgramDrafter):  # every draft as long as allowed, every token rejected
        def propose(self, most):
            return [7] * most

    monkeypatch.setattr(speculation, "NgramDrafter", WrongDrafter)
    monkeypatch.setattr(speculation.Speculator, "best_width", lambda self, rows, drafts, acc, longest: longest + 1)
    long_prompt = encode_prompt(lm.tokenizer, [{"role": "user", "content": "one two three four " * 8}])
    short_prompt = encode_prompt(lm.tokenizer, [{"role": "user", "content": "Hi"}])
    assert 100 < len(long_prompt) < 140, len(long_prompt)
    room = 160 - len(long_prompt)
    requests = [(long_prompt, {"max_new_tokens": room, "min_new_tokens": room}),
                (short_prompt, {"max_new_tokens": 100, "min_new_tokens": 100})]  # drafts after the long row ends
    plain = [run_ids(lm, 0, [ids], conf)[0] for ids, conf in requests]
    speculated = run_ids(lm, 8, [ids for ids, _ in requests], [conf for _, conf in requests])
    assert [final.finish_reason for _, final in speculated] == ["length", "length"]
    assert [text for text, _ in speculated] == [text for text, _ in plain]
