"""The peer a user could pick instead: ``transformers serve --continuous-batching``, same model, same machine.

It needs pydantic 2 and Jina needs pydantic 1, so it gets a venv of its own (built once, under the cache
folder) with the same torch and transformers pins as requirements.txt plus ``transformers[serving]``.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from server_process import ROOT, stop_server


def pins() -> dict:
    text = (ROOT / "requirements.txt").read_text()
    return {name: re.search(rf"^{name}==(\S+)", text, re.M).group(1) for name in ("torch", "transformers")}


def ensure_venv(cache: Path) -> Path:
    """The peer's python, in its own venv (about 40 s the first time)."""
    versions = pins()
    venv = cache / f"peer-transformers-serve-{versions['transformers']}"
    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python
    print(f"building the peer's venv in {venv} (first run only) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    quiet = ["-q", "--disable-pip-version-check"]
    subprocess.run([str(python), "-m", "pip", "install", *quiet, "--upgrade", "pip==26.3"], check=True)
    subprocess.run(["bash", str(ROOT / "tools" / "install_torch.sh")], env={**os.environ, "PY": str(python)},
                   check=True)
    subprocess.run([str(python), "-m", "pip", "install", *quiet, f"torch=={versions['torch']}",
                    f"transformers[serving]=={versions['transformers']}"], check=True)
    (venv / ".installed").touch()
    return python


def start(python: Path, model: Path, port: int, log_path: Path, timeout: float = 300) -> subprocess.Popen:
    server = subprocess.Popen([str(python), "-m", "transformers.cli.transformers", "serve", str(model), "--port",
                               str(port), "--device", "cpu", "--continuous-batching"], cwd=ROOT,
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while "Application startup complete" not in log_path.read_text(errors="replace"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise SystemExit(f"transformers serve did not start; see {log_path}")
        time.sleep(0.25)
    return server


def request_fields(new_tokens: int) -> dict:
    """transformers serve takes the answer's length as a GenerationConfig in ``generation_config``."""
    import json

    return {"generation_config": json.dumps({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                                             "do_sample": False})}
