"""Loading: safetensors only unless allow_pickle; missing folders and broken files are clear errors."""

import pytest

from tiny_models import build_tokenizer
from executor.model import FALLBACK_CHAT_TEMPLATE, ModelLoadError, encode_prompt, load


@pytest.fixture(scope="module")
def pickle_only_model(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("pickle-only")
    tokenizer = build_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # transformers 5 itself only writes safetensors
    tokenizer.save_pretrained(path)
    assert (path / "pytorch_model.bin").exists() and not (path / "model.safetensors").exists()
    return path


def test_pickle_weights_are_refused_unless_allowed(pickle_only_model):
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load(str(pickle_only_model))
    assert load(str(pickle_only_model), allow_pickle=True).model is not None


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load(str(tmp_path / "nothing-here"))


def test_corrupt_weights_are_a_clear_error(tiny_models, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["chat"], broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load(str(broken))


def test_fallback_chat_template_for_tokenizers_without_one(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["plain"])
    assert tokenizer.chat_template is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.decode(encode_prompt(tokenizer, messages))
    assert text == "system: Be brief.\nuser: Hi\nassistant:"
    assert "assistant:" in FALLBACK_CHAT_TEMPLATE


def test_quantize_auto_says_what_it_chose_and_why(tiny_models, caplog):
    """A float32 model that is not a Q4 GGUF stays float32 under auto, and the log line says why (the Q4 GGUF
    case is tests/unit/test_int4.py's)."""
    with caplog.at_level("INFO", logger="jina_llm_stream.model"):
        loaded = load(str(tiny_models["chat"]), quantize="auto")
    assert "quantize=auto chose none: not a GGUF file of Q4_0/Q4_1 blocks" in caplog.text
    assert next(loaded.model.parameters()).dtype.is_floating_point
