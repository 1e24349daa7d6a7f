"""Every architecture batches: tiny random models of 14 families, sliding-window and hybrid ones included.

For each: a /chat-style call of four prompts of different lengths (one batch, rows joining and leaving)
equals each prompt streamed alone, which equals ``model.generate`` with the model's own cache (for
sliding-window layers, transformers' sliding cache: the window is smaller than the prompts here). And a
prefix-cache hit far longer than the window changes no answer of a sliding-window or a hybrid model.
"""

import asyncio
import time

import pytest
import torch
import transformers as T

from executor import speculation
from executor.detok import decode
from executor.engine import Engine, EngineConfig
from executor.kv_manager import MIN_REUSED_TOKENS
from executor.validation import Limits, fit_to_context, parse_gen_conf

NEW_TOKENS = 20
WINDOW = 8  # sliding window of the sliding layers: far shorter than the prompts and answers
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


def configs(vocab_size):
    common = dict(COMMON, vocab_size=vocab_size, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    plain = dict(vocab_size=vocab_size, eos_token_id=2, bos_token_id=1, pad_token_id=0, initializer_range=0.2)
    return {
        "llama": (T.LlamaConfig(**common), T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(**common), T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config(**common, head_dim=16), T.Qwen3ForCausalLM),
        "phi3": (T.Phi3Config(**common), T.Phi3ForCausalLM),
        "gpt_neox": (T.GPTNeoXConfig(**plain, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=256), T.GPTNeoXForCausalLM),
        "opt": (T.OPTConfig(vocab_size=vocab_size, eos_token_id=2, bos_token_id=1, pad_token_id=0, init_std=0.2,
                            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64), T.OPTForCausalLM),
        "bloom": (T.BloomConfig(**plain, hidden_size=64, n_layer=2, n_head=4), T.BloomForCausalLM),  # ALiBi
        "falcon": (T.FalconConfig(**plain, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256), T.FalconForCausalLM),
        "olmo2": (T.Olmo2Config(**common), T.Olmo2ForCausalLM),
        "starcoder2": (T.Starcoder2Config(**common, sliding_window=None), T.Starcoder2ForCausalLM),
        "granite": (T.GraniteConfig(**common), T.GraniteForCausalLM),
        "mistral_sliding_window": (T.MistralConfig(**common, sliding_window=WINDOW), T.MistralForCausalLM),
        # Gemma's input embeddings are scaled up by sqrt(hidden_size): with the output head tied to them, a tiny
        # random Gemma repeats the prompt's last token whatever came before (an answer no cache bug could change).
        "gemma2_hybrid": (T.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False),
                          T.Gemma2ForCausalLM),
        # Gemma 3's default pattern (one global layer in six) would make both of two layers sliding.
        "gemma3_hybrid": (T.Gemma3TextConfig(**common, head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False,
                                             layer_types=["sliding_attention", "full_attention"]),
                          T.Gemma3ForCausalLM),
    }


TEXTS = ["The quick brown fox jumps over the lazy dog and runs away", "Hello",
         "Numbers 1 2 3 4 5 6 7 8 9 10 11 12 13 and more words to make this the longest prompt", "café 🦄"]


def build_model(name, tokenizer):
    config, model_class = configs(len(tokenizer))[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
    if name.endswith("_hybrid"):  # the point of these cases: sliding and global layers in one model
        assert sorted(set(model.config.layer_types)) == ["full_attention", "sliding_attention"], \
            model.config.layer_types
    if name.endswith(("_hybrid", "_sliding_window")):
        assert model.config.sliding_window == WINDOW
    return model


@pytest.fixture(scope="module")
def tokenizer():
    from helpers import sentencepiece_tokenizer

    return sentencepiece_tokenizer()


def generated_ids(model, prompt_ids) -> list:
    output = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return output[0, len(prompt_ids):].tolist()


def generate_alone(model, prompt_ids, tokenizer) -> str:
    new = generated_ids(model, prompt_ids)
    return decode(tokenizer, new[:new.index(2)] if 2 in new else new)


# 16: the longer prompts are prefilled chunk by chunk in their own rows; 64: whole prompts, longer than the
# sliding window, share one pass through a temporary cache.
@pytest.mark.parametrize("prefill_chunk", [16, 64])
@pytest.mark.parametrize("name", list(configs(1)))
def test_batched_answers_equal_streamed_singles_equal_generate(name, prefill_chunk, tokenizer):
    model = build_model(name, tokenizer)
    engine = Engine(model, tokenizer, [2], EngineConfig(max_batch_size=4, prefill_chunk=prefill_chunk)).start()
    limits = Limits(context_length=256)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    settings = [fit_to_context(parse_gen_conf({"max_new_tokens": NEW_TOKENS}, limits), len(p), limits) for p in prompts]

    async def stream_alone(prompt_ids, setting):
        return "".join([event.text async for event in engine.stream(prompt_ids, setting)])

    try:
        batched = [text for text, _ in asyncio.run(engine.complete(list(zip(prompts, settings))))]
        batched_steps = engine.steps
        alone = [asyncio.run(stream_alone(p, s)) for p, s in zip(prompts, settings)]
    finally:
        engine.shutdown()
    assert batched == alone
    assert alone == [generate_alone(model, p, tokenizer) for p in prompts]
    assert batched_steps < 2 * NEW_TOKENS, "the call's four prompts shared decode steps (alone: 4 x 20 steps)"


PASSAGE = ("Jina serves machine learning models as microservices over gRPC, HTTP and WebSocket. A language model "
           "predicts the next token from the tokens before it; streaming sends each piece of text to the client as "
           "soon as it is decoded. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. The river runs north past the old mill, "
           "built of stone. ")
QUESTION, SHORT_QUESTION = "The quick brown fox jumps over the lazy dog?", "Where?"


# 16: the first prompt is prefilled (and its blocks cached) chunk by chunk; 256: in one pass.
@pytest.mark.parametrize("prefill_chunk", [16, 256])
@pytest.mark.parametrize("name", ["mistral_sliding_window", "gemma3_hybrid"])
def test_a_prefix_cache_hit_longer_than_the_sliding_window_changes_no_answer(name, prefill_chunk, tokenizer):
    """The last prompt shares a ~100-token passage with the first: it takes the passage's whole blocks, many
    windows long, from the prefix cache and computes only its last few tokens, and answers as ``model.generate``
    does. The hybrid model's global layer attends to every cached token; the sliding layers to the last ones."""
    model = build_model(name, tokenizer)
    engine = Engine(model, tokenizer, [2], EngineConfig(max_batch_size=4, prefill_chunk=prefill_chunk)).start()
    limits = Limits(context_length=256)
    first, last = (tokenizer(PASSAGE + question)["input_ids"] for question in (QUESTION, SHORT_QUESTION))
    # In between, a prompt without the passage in front: a row that held the first prompt then holds other keys
    # and values at the passage's positions, so what the last prompt reuses must come from the prefix cache.
    between = tokenizer(QUESTION + " " + PASSAGE)["input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(first, last)) if a != b)

    async def ask(prompt_ids):
        setting = fit_to_context(parse_gen_conf({"max_new_tokens": NEW_TOKENS}, limits), len(prompt_ids), limits)
        events = [event async for event in engine.stream(prompt_ids, setting)]
        return "".join(event.text for event in events), events[-1].cached_tokens

    try:
        answers = [asyncio.run(ask(p)) for p in (first, between, last)]
    finally:
        engine.shutdown()
    size, hit = engine.config.block_size, answers[-1][1]
    assert [cached for _, cached in answers] == [0, 0, shared // size * size], "the shared prefix's whole blocks"
    assert hit >= max(MIN_REUSED_TOKENS, 4 * WINDOW), "a hit of several windows"
    # The last prompt ends a few tokens after the passage's last whole block: the tokens it computes attend, in
    # every layer, to keys and values from the prefix cache (after a longer tail, a model whose every layer
    # slides would hardly look back that far).
    assert len(last) - hit < WINDOW, "the computed tokens' windows reach into the cached blocks"
    texts = [text for text, _ in answers]
    assert texts[0] != texts[2], "both questions end in '?': the answers depend on more than the last token"
    assert texts == [generate_alone(model, p, tokenizer) for p in (first, between, last)]


# Architectures whose cached prefix is read in place (attention.py); the others copy it into each row: their
# attention does not come through transformers' interface (bloom's ALiBi, falcon) or needs more than plain
# attention over the prefix (sliding windows, Gemma 2's soft-capping through eager).
COPY_HITS = {"bloom", "falcon", "mistral_sliding_window", "gemma2_hybrid", "gemma3_hybrid"}


@pytest.mark.parametrize("name", list(configs(1)))
def test_a_prefix_hit_is_read_in_place_where_the_attention_allows_and_changes_no_answer(name, tokenizer):
    """Two prompts share the passage's whole blocks, then both run at once: every answer is
    ``model.generate``'s, and a model that reads the hit in place copied no cached block into a row."""
    model = build_model(name, tokenizer)
    engine = Engine(model, tokenizer, [2], EngineConfig(max_batch_size=4, prefill_chunk=32)).start()
    limits = Limits(context_length=256)
    prompts = [tokenizer(PASSAGE + question)["input_ids"] for question in (QUESTION, SHORT_QUESTION, "Why not?")]

    async def ask(prompt_ids):
        setting = fit_to_context(parse_gen_conf({"max_new_tokens": NEW_TOKENS}, limits), len(prompt_ids), limits)
        events = [event async for event in engine.stream(prompt_ids, setting)]
        return "".join(event.text for event in events), events[-1].cached_tokens

    async def together(prompt_ids):
        return await asyncio.gather(*(ask(p) for p in prompt_ids))

    try:
        first = asyncio.run(ask(prompts[0]))
        rest = asyncio.run(together(prompts[1:]))
        deadline = time.monotonic() + 5  # the last answers are sent inside a step; their rows leave at its end
        while engine.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        sharing, hit_bytes = engine.kv.sharing, engine.kv.batch.copied_bytes["hit"]
        pinned = engine.kv.prefix.pinned_blocks
    finally:
        engine.shutdown()
    assert sharing == (name not in COPY_HITS)
    assert rest[0][1] == rest[1][1] >= MIN_REUSED_TOKENS, "both took the passage's whole blocks"
    assert (hit_bytes == 0) == sharing, "read in place: no copy; otherwise the hit is copied"
    assert pinned == 0, "rows that left unpinned their shared blocks"
    assert [first[0]] + [text for text, _ in rest] == [generate_alone(model, p, tokenizer) for p in prompts]


@pytest.mark.parametrize("name", [name for name in configs(1) if not name.endswith(("_hybrid", "_sliding_window"))])
def test_speculating_rows_with_drafts_of_every_length_answer_what_generate_does(name, tokenizer, monkeypatch):
    """Drafts right, wrong, half right and none in one batch, verified at the longest draft's width: the rows
    with shorter drafts are padding in the Linear layers' eyes (token_packing.py), whatever the architecture's
    layers (gpt_neox, opt, bloom, falcon: their own attention and MLP modules)."""
    model = build_model(name, tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    answers = {tuple(p): generated_ids(model, p) for p in prompts}
    kinds = dict(zip(map(tuple, prompts), ["right", "wrong", "half", "none"]))

    class OracleDrafter(speculation.NgramDrafter):
        def sync(self, sequence):
            self.sequence = sequence

        def propose(self, most):
            prompt = tuple(self.sequence.prompt_ids)
            draft = answers[prompt][len(self.sequence.generated):][:most]
            if kinds[prompt] == "none":
                return []
            if draft and (kinds[prompt] == "wrong" or (kinds[prompt] == "half" and len(draft) > 1)):
                draft[len(draft) // 2] = (draft[len(draft) // 2] + 1) % len(tokenizer)
            return draft

    monkeypatch.setattr(speculation, "NgramDrafter", OracleDrafter)
    monkeypatch.setattr(speculation.Speculator, "best_width", lambda self, rows, drafts, acc, longest: longest + 1)
    engine = Engine(model, tokenizer, [2], EngineConfig(max_batch_size=4, speculate=4)).start()
    packed_steps = []
    verify = engine.runner.verify
    engine.runner.verify = lambda drafts: (verify(drafts), packed_steps.append(
        engine.runner.verify_tokens < len(drafts) * (1 + max(map(len, drafts)))))[0]
    limits = Limits(context_length=256)
    settings = [fit_to_context(parse_gen_conf({"max_new_tokens": NEW_TOKENS}, limits), len(p), limits) for p in prompts]
    try:
        batched = [text for text, _ in asyncio.run(engine.complete(list(zip(prompts, settings))))]
    finally:
        engine.shutdown()
    assert batched == [generate_alone(model, p, tokenizer) for p in prompts]
    assert engine.runner.packs_tokens and any(packed_steps), packed_steps


@pytest.mark.parametrize("name", [name for name in configs(1) if not name.endswith(("_hybrid", "_sliding_window"))])
def test_a_row_at_the_end_of_its_context_beside_a_drafting_row_finishes(name, tokenizer, monkeypatch):
    """A verify step as wide as the drafting row's draft gives every row that many positions: the row whose
    answer ends at the model's last position (256 here) gets padding past it, which must stay inside a learned
    position table (opt, gpt-style) and change nothing for rotary ones. Both rows finish; the long row answers
    what ``model.generate`` does."""
    model = build_model(name, tokenizer)
    long_prompt = (tokenizer(" ".join([TEXTS[0]] * 20))["input_ids"])[:200]
    short_prompt = tokenizer(TEXTS[1])["input_ids"]
    room = 256 - len(long_prompt)

    class WrongDrafter(speculation.NgramDrafter):  # drafts as long as allowed, every token rejected
        def propose(self, most):
            return [5] * most

    monkeypatch.setattr(speculation, "NgramDrafter", WrongDrafter)
    monkeypatch.setattr(speculation.Speculator, "best_width", lambda self, rows, drafts, acc, longest: longest + 1)
    engine = Engine(model, tokenizer, [2], EngineConfig(max_batch_size=4, speculate=4)).start()
    limits = Limits(context_length=256)
    requests = [(long_prompt, {"max_new_tokens": room, "min_new_tokens": room}),
                (short_prompt, {"max_new_tokens": 60, "min_new_tokens": 60})]
    settings = [fit_to_context(parse_gen_conf(conf, limits), len(p), limits) for p, conf in requests]
    try:
        done = asyncio.run(engine.complete([(p, s) for (p, _), s in zip(requests, settings)]))
    finally:
        engine.shutdown()
    assert [final.finish_reason for _, final in done] == ["length", "length"], done
    expected = model.generate(torch.tensor([long_prompt]), attention_mask=torch.ones(1, 200, dtype=torch.long),
                              max_new_tokens=room, min_new_tokens=room, do_sample=False, pad_token_id=0)
    assert done[0][0] == decode(tokenizer, expected[0, 200:].tolist())
