"""Model loading, the chat template (with a fallback), and the offline demo model.

``load`` wraps ``from_pretrained`` on a hub name or a local folder. When no model is named, the server
builds a small demo model offline and deterministically on first use (GPT-2 architecture, random
weights, a byte-level BPE tokenizer trained with the ``tokenizers`` library on text kept in this file)
and caches it on disk: it answers with gibberish, but exercises the whole service without a model hub.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("jina_llm_stream.model")

DEMO_MODEL_VERSION = "v1"
DEFAULT_CACHE_DIR = Path(os.environ.get("JINA_LLM_STREAM_CACHE", Path.home() / ".cache" / "jina-llm-stream"))

# Used when a tokenizer has no chat template of its own (gpt2 has none). Rendered by transformers'
# sandboxed Jinja environment like any model's template. Documented in README.md.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

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


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    eos_token_ids: tuple
    context_length: int | None
    name: str
    is_demo: bool = False


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the server must not start."""


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype={dtype!r} is not supported: use auto, float32, float16 or bfloat16") from None


def resolve_device_map(device: str):
    """``auto`` lets accelerate place the model; an explicit device must exist (no silent CPU fallback)."""
    if device == "auto":
        if not torch.cuda.is_available():
            log.info("device=auto: no CUDA device found, serving on the CPU")
        return "auto"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def load(model_name: str | None, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
         allow_pickle: bool = False, cache_dir: Path = DEFAULT_CACHE_DIR) -> LoadedModel:
    """Load a model and its tokenizer by hub name or local path; the demo model when no name is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_demo = not model_name
    if is_demo:
        model_name = str(ensure_demo_model(cache_dir))
        log.warning("no --model_name given: serving the built-in DEMO model (random weights, gibberish "
                    "answers) from %s", model_name)
    if model_name.startswith(("/", "./", "../", "~")) and not Path(model_name).expanduser().is_dir():
        raise ModelLoadError(f"could not load model {model_name!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_name,
            device_map=resolve_device_map(device),
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - any loading failure ends start-up with one clear line
        pickle_only = not allow_pickle and "safetensors" in str(error).lower()
        hint = " (weights are loaded from safetensors only unless --allow-pickle)" if pickle_only else ""
        raise ModelLoadError(f"could not load model {model_name!r}: {error}{hint}") from error
    model.eval()
    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:
        log.warning("model %s defines no EOS token: answers end only at max_new_tokens or a stop string", model_name)
    log.info("loaded %s on %s as %s", model_name, next(model.parameters()).device, next(model.parameters()).dtype)
    return LoadedModel(model, tokenizer, eos_ids, context_length(model, tokenizer), model_name, is_demo)


def eos_token_ids(model, tokenizer) -> tuple:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))


def context_length(model, tokenizer) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def render_prompt(tokenizer, messages: list) -> str:
    """The chat template, or the fallback when the tokenizer has none."""
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)


class PromptTooLong(ValueError):
    """The chat template's output is larger than the server allows."""


def encode_prompt(tokenizer, messages: list, max_chars: int | None = None) -> list:
    """Token ids of the rendered chat; ``max_chars`` bounds what the template may produce."""
    text = render_prompt(tokenizer, messages)
    if max_chars is not None and len(text) > max_chars:
        raise PromptTooLong(f"the chat template produced {len(text)} characters; at most {max_chars} are allowed")
    # The template already holds any BOS it wants, as in apply_chat_template(tokenize=True).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_raw_prompt(tokenizer, text: str) -> list:
    """Token ids of a plain-text prompt (OpenAI's /v1/completions): no template, the tokenizer's own
    special tokens (e.g. BOS) added as ``tokenizer(text)`` does."""
    return tokenizer(text)["input_ids"]


# ---- the demo model -----------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int = 1024, chat_template: str | None = DEMO_CHAT_TEMPLATE):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the embedded corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([_DEMO_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_gpt2(path: Path, tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=None,
               seed=0, initializer_range=0.02) -> Path:
    """Save a randomly initialised GPT-2-architecture model and ``tokenizer`` to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, initializer_range=initializer_range,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ensure_demo_model(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Build the demo model once; later calls reuse the copy on disk."""
    path = Path(cache_dir) / f"demo-gpt2-{DEMO_MODEL_VERSION}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    log.info("building the demo model in %s (first use only)", path)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    build_gpt2(partial, build_tokenizer(), n_layer=2, n_embd=128, n_head=4, initializer_range=0.2)
    try:
        partial.rename(path)
    except OSError:  # another process finished first; its copy is identical
        pass
    return path
