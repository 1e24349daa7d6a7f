"""Tiny models built offline for the tests and the benchmark: a byte-level BPE tokenizer trained here on a
small multilingual corpus, and randomly initialised GPT-2-architecture models. Deterministic and fast; no
model hub. (The server's default model is a real one: executor/gguf_model.py.)"""

from pathlib import Path

import torch

# A chat template in the common ChatML shape (the tiny models' own).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """\
Jina serves machine learning models as microservices over gRPC, HTTP and WebSocket.
A language model predicts the next token from the tokens before it; streaming sends each piece of
text to the client as soon as it is decoded. The quick brown fox jumps over the lazy dog.
Hello, how are you? I am fine, thank you. What can I help you with today?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: . , ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & *
Français: déjà vu, café, naïve, façade, élève. Deutsch: Grüße, Straße, schön. Español: año, niño, señor.
中文：你好，世界。我们正在测试流式输出。日本語：こんにちは、世界。한국어: 안녕하세요 세계.
Emoji: 😀 😃 🚀 🎉 👍 ❤️ 🤖 🌍 👩‍💻 🇩🇪. Math: ∑ ∫ √ π ≈ ≠ ≤ ≥ ∞. Currency: € £ ¥ ₹.
"""


def build_tokenizer(vocab_size: int = 1024, chat_template: str | None = CHATML_TEMPLATE, texts=None):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts`` (default: the small multilingual corpus
    above); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts or [CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_gpt2(path: Path, tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=None,
               seed=0, initializer_range=0.02) -> Path:
    """Save a randomly initialised GPT-2-architecture model and ``tokenizer`` to ``path``."""
    model = new_gpt2(tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                     vocab_size=vocab_size, seed=seed, initializer_range=initializer_range)
    return save(model, tokenizer, path)


def new_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=None, seed=0,
             initializer_range=0.02):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, initializer_range=initializer_range,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def save(model, tokenizer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def new_llama(vocab_size: int = 97, seed: int = 0):
    """A 2-layer Llama with grouped-query attention (2 key/value heads for 4), random weights, in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()
