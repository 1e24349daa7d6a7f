"""jina-llm-stream: a Jina Executor that serves Hugging Face causal language models."""

import faulthandler
import logging
import os
import signal
import sys

# `jina executor --uses config.yml` imports this package by file path, with the repository root not on
# sys.path; the wire schemas live beside this package, in the root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_logger = logging.getLogger("jina_llm_stream")
if not _logger.handlers:  # the Executor runs in a process of its own, started by Jina
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(os.environ.get("JINA_LLM_STREAM_LOG_LEVEL", "INFO"))
    _logger.propagate = False

# jina_server.py sends SIGUSR1 to a process that has not stopped in time: the log shows where it hangs.
faulthandler.register(signal.SIGUSR1, all_threads=True)

from .executor import TokenStreamingExecutor  # noqa: E402

__all__ = ["TokenStreamingExecutor"]
