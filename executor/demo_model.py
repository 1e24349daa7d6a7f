"""The built-in demo model: served when no ``--model_name`` is given, built offline on first use.

A GPT-2-architecture model of about a million parameters with a byte-level BPE tokenizer, both trained
here, deterministically, in about a minute on two CPU cores, on a Shakespeare excerpt shipped beside this
file (``demo_text.txt``: the first 250 KB of the "tiny Shakespeare" corpus; the plays are in the public
domain). The speeches become chat turns in the model's ChatML template, so it answers after
``<|im_start|>assistant`` and ends its answers with ``<|im_end|>``. Its answers are English-like word
salad: it exists so that the whole service runs, and reads as text, without a model hub. The result is
cached on disk (``JINA_LLM_STREAM_CACHE``, default ``~/.cache/jina-llm-stream``).

The tests and the benchmark build their own models with the helpers below (random weights: fast).
"""

import logging
import os
import re
import time
from pathlib import Path

import torch

log = logging.getLogger("jina_llm_stream.model")

DEMO_MODEL_VERSION = "v4"
DEFAULT_CACHE_DIR = Path(os.environ.get("JINA_LLM_STREAM_CACHE", Path.home() / ".cache" / "jina-llm-stream"))
DEMO_TEXT = Path(__file__).with_name("demo_text.txt")
# Sized for about a minute of training on two CPU cores (measured: see README, "the demo model").
DEMO_SHAPE = dict(n_layer=2, n_embd=128, n_head=4, n_positions=1024)
DEMO_VOCAB = 2048
DEMO_TRAINING = dict(steps=500, batch=16, length=128, learning_rate=3e-3, seed=0)

# The demo model's own chat template, in the common ChatML shape.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEMO_CORPUS = """\
Jina serves machine learning models as microservices over gRPC, HTTP and WebSocket.
A language model predicts the next token from the tokens before it; streaming sends each piece of
text to the client as soon as it is decoded. The quick brown fox jumps over the lazy dog.
Hello, how are you? I am fine, thank you. What can I help you with today?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: . , ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & *
Français: déjà vu, café, naïve, façade, élève. Deutsch: Grüße, Straße, schön. Español: año, niño, señor.
中文：你好，世界。我们正在测试流式输出。日本語：こんにちは、世界。한국어: 안녕하세요 세계.
Emoji: 😀 😃 🚀 🎉 👍 ❤️ 🤖 🌍 👩‍💻 🇩🇪. Math: ∑ ∫ √ π ≈ ≠ ≤ ≥ ∞. Currency: € £ ¥ ₹.
"""


def build_tokenizer(vocab_size: int = 1024, chat_template: str | None = DEMO_CHAT_TEMPLATE, texts=None):
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
    core.train_from_iterator(texts or [_DEMO_CORPUS] * 4, trainer=trainer)
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


def ensure_demo_model(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Build the demo model once; later calls reuse the copy on disk."""
    path = Path(cache_dir) / f"demo-gpt2-{DEMO_MODEL_VERSION}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    log.info("building the demo model in %s (first use only): training a small GPT-2 on a Shakespeare excerpt, "
             "about a minute", path)
    started = time.monotonic()
    chats = chat_transcripts(DEMO_TEXT.read_text(encoding="utf-8"))
    tokenizer = build_tokenizer(vocab_size=DEMO_VOCAB, texts=chats + [_DEMO_CORPUS])
    model = new_gpt2(tokenizer, **DEMO_SHAPE)
    loss = train(model, tokenizer("".join(chats), add_special_tokens=False)["input_ids"], **DEMO_TRAINING)
    # An answer is one turn: the model may end it (<|im_end|>) but not open another (generate() honours this).
    model.generation_config.suppress_tokens = [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    save(model.eval(), tokenizer, partial)
    try:
        partial.rename(path)
    except OSError:  # another process finished first; its copy is as good
        pass
    log.info("demo model built in %.0f s (final training loss %.2f)", time.monotonic() - started, loss)
    return path


def chat_transcripts(play: str, turns: int = 4) -> list:
    """The play's speeches as ChatML conversations of ``turns`` speeches, user and assistant in turn."""
    speeches = [re.sub(r"^[^\n]*:\n", "", block.strip()) for block in play.split("\n\n") if block.strip()]
    chats = []
    for first in range(0, len(speeches) - turns + 1, turns):
        chat = "".join(f"<|im_start|>{'user' if i % 2 == 0 else 'assistant'}\n{speech}<|im_end|>\n"
                       for i, speech in enumerate(speeches[first:first + turns]))
        chats.append(chat)
    return chats


def train(model, token_ids: list, steps: int, batch: int, length: int, learning_rate: float, seed: int) -> float:
    """Next-token training on random windows of ``token_ids``; deterministic for a given machine. Each window
    sits at a random position offset, so that every position of the context is trained, not only the
    first ``length`` (answers stay words however long they get)."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.tensor(token_ids, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warm_up = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warm_up) * max(0.05, 1 - step / steps))
    context = model.config.max_position_embeddings
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
        windows = torch.stack([data[start:start + length] for start in starts.tolist()])
        offsets = torch.randint(0, context - length + 1, (batch, 1), generator=generator)
        positions = offsets + torch.arange(length)
        # The model shifts the labels itself.
        loss = model(input_ids=windows, position_ids=positions, labels=windows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return loss.item()
