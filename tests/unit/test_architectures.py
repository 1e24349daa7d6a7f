"""Every architecture batches: tiny random models of 14 families, sliding-window and hybrid ones included.

For each: a /chat-style call of four prompts of different lengths (one batch, rows joining and leaving)
equals each prompt streamed alone, which equals ``model.generate`` with the model's own cache (for
sliding-window layers, transformers' sliding cache: the window is smaller than the prompts here).
"""

import asyncio

import pytest
import torch
import transformers as T

from executor.detok import decode
from executor.engine import Engine, EngineConfig
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
        "gemma2_hybrid": (T.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW), T.Gemma2ForCausalLM),
        "gemma3_hybrid": (T.Gemma3TextConfig(**common, head_dim=16, sliding_window=WINDOW), T.Gemma3ForCausalLM),
    }


TEXTS = ["The quick brown fox jumps over the lazy dog and runs away", "Hello",
         "Numbers 1 2 3 4 5 6 7 8 9 10 11 12 13 and more words to make this the longest prompt", "café 🦄"]


@pytest.fixture(scope="module")
def tokenizer():
    from helpers import sentencepiece_tokenizer

    return sentencepiece_tokenizer()


def generate_alone(model, prompt_ids, tokenizer) -> str:
    output = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    new = output[0, len(prompt_ids):].tolist()
    return decode(tokenizer, new[:new.index(2)] if 2 in new else new)


# 16: the longer prompts are prefilled chunk by chunk in their own rows; 64: whole prompts, longer than the
# sliding window, share one pass through a temporary cache.
@pytest.mark.parametrize("prefill_chunk", [16, 64])
@pytest.mark.parametrize("name", list(configs(1)))
def test_batched_answers_equal_streamed_singles_equal_generate(name, prefill_chunk, tokenizer):
    config, model_class = configs(len(tokenizer))[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
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
