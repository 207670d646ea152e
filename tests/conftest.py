from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import tiny_model  # noqa: E402

TINY_KINDS = ("llama", "qwen2", "gemma2")


@pytest.fixture(scope="session", params=TINY_KINDS)
def tiny_lm(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def embedded_lm():
    from personaxis.models import load_model

    return load_model(device="cpu")  # float32 on the CPU, as the tests' expectations were measured, on any machine
