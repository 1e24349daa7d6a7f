"""Tiny models and tokenizers built offline for the tests (random weights, trained tokenizers)."""

import json
from pathlib import Path

from tiny_models import CHATML_TEMPLATE, CORPUS, build_gpt2, build_tokenizer


def sentencepiece_tokenizer(vocab_size: int = 600):
    """A Llama-style tokenizer: "▁" for spaces, BPE, byte fallback (<0xNN>) for unseen characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    core.train_from_iterator([CORPUS.replace("😀", "").replace("🚀", "")] * 4, trainer=trainer)
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte fallback pieces are ordinary tokens, as in Llama's vocabulary
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    core = Tokenizer.from_str(json.dumps(spec))
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


def build_slow_model(root: Path) -> Path:
    """Big enough (about 25M parameters) that a long answer takes seconds: for cancellation and load tests."""
    return build_gpt2(root / "slow", build_tokenizer(), n_layer=8, n_embd=512, n_head=8, n_positions=2048,
                      initializer_range=0.2)


def build_tiny_models(root: Path) -> dict:
    """Paths of the tiny models the tests serve."""
    return {
        # Larger initial weights make the random model's next-token choice clear-cut (no near ties).
        "chat": build_gpt2(root / "chat", build_tokenizer(chat_template=CHATML_TEMPLATE), n_layer=2,
                           n_embd=64, n_head=4, n_positions=512, initializer_range=0.2),
        "plain": build_gpt2(root / "plain", build_tokenizer(chat_template=None), n_layer=2, n_embd=64, n_head=4,
                            n_positions=512, initializer_range=0.2, seed=1),
    }


TOOL_CALL_ANSWER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def build_tool_calling_model(root: Path, messages: list, tools: list) -> Path:
    """A tiny model trained until it answers ``messages`` (offered ``tools``, rendered as the server renders
    them) with TOOL_CALL_ANSWER: a model that calls a tool of its own accord (tool_choice auto)."""
    import torch

    from tiny_models import new_gpt2, save
    from executor.model import render_prompt
    from executor.tools import parse_tools

    tokenizer = build_tokenizer(chat_template=CHATML_TEMPLATE, texts=[CORPUS, TOOL_CALL_ANSWER])
    prompt = tokenizer(render_prompt(tokenizer, messages, parse_tools(tools, "auto")), add_special_tokens=False)
    answer = tokenizer(TOOL_CALL_ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt["input_ids"] + answer])
    labels = ids.clone()
    labels[0, :len(prompt["input_ids"])] = -100  # learn the answer only
    model = new_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=4, n_positions=512, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return save(model.eval(), tokenizer, root / "tool-caller")
