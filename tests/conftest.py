import os
import sys
from pathlib import Path

import hypothesis  # noqa: F401 - imported first: loading it late (in the summary hook) crashed CPython 3.11.7
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from helpers import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory):
    from helpers import build_slow_model

    return build_slow_model(tmp_path_factory.mktemp("slow"))
