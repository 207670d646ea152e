"""The key/value cache adapter is the one module that touches transformers' cache internals.

Every module of ``src`` is read as a syntax tree (imports inside functions included): only
``personaxis/generation/cache.py`` may import transformers' cache classes or reach into a cache's layers and buffers,
and only it and ``personaxis/generation/decode.py`` (the shared decode step) name a model forward's cache keywords.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ADAPTER = "personaxis/generation/cache.py"
DECODE_STEP = "personaxis/generation/decode.py"
# Attributes of transformers' caches and of the adapter's buffered layers.
CACHE_ATTRIBUTES = {
    "batch_select_indices",
    "batch_repeat_interleave",
    "key_buffer",
    "value_buffer",
    "key_cache",
    "value_cache",
    "get_seq_length",
    "reorder_cache",
}
# Keywords of a model's forward that pass or shape the cache.
FORWARD_KEYWORDS = {"past_key_values", "logits_to_keep", "cache_position"}


def violations(source: str, path: str) -> list[str]:
    """What ``source`` (the module at ``path``, relative to ``src``) does that only the adapter may do."""
    found: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        line = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("transformers.cache_utils"):
                    found.append(f"{line}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module.startswith("transformers.cache_utils"):
                found.append(f"{line}: from {node.module} import ...")
            elif node.module.split(".")[0] == "transformers":
                found += [f"{line}: imports {a.name}" for a in node.names if "Cache" in a.name or "Layer" in a.name]
        elif isinstance(node, ast.Attribute):
            if node.attr in CACHE_ATTRIBUTES:
                found.append(f"{line}: .{node.attr}")
            elif node.attr == "cache_utils":
                found.append(f"{line}: .cache_utils")
            elif node.attr == "layers" and "cache" in ast.unparse(node.value).lower():
                found.append(f"{line}: {ast.unparse(node)}")  # a cache's layers
        if path == DECODE_STEP:
            continue
        if isinstance(node, ast.keyword) and node.arg in FORWARD_KEYWORDS:
            found.append(f"{line}: keyword {node.arg}=")
        elif isinstance(node, ast.Constant) and node.value in FORWARD_KEYWORDS:
            found.append(f"{line}: {node.value!r}")
    return found


def test_only_the_adapter_touches_cache_internals() -> None:
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 50
    found = []
    for module in modules:
        path = module.relative_to(SRC).as_posix()
        if path != ADAPTER:
            found += violations(module.read_text(encoding="utf-8"), path)
    assert not found, "cache internals outside personaxis/generation/cache.py:\n" + "\n".join(found)


def test_the_adapter_is_where_the_cache_classes_are() -> None:
    # The scan is only a check if the adapter itself is caught by it.
    assert violations((SRC / ADAPTER).read_text(encoding="utf-8"), ADAPTER)


@pytest.mark.parametrize(
    "source",
    [
        "from transformers import DynamicCache",
        "def f():\n    from transformers.cache_utils import DynamicLayer",
        "import transformers.cache_utils",
        "import transformers\ncache = transformers.cache_utils.DynamicCache()",
        "def f(cache, index):\n    cache.batch_select_indices(index)",
        "def f(layer):\n    return layer.key_buffer",
        "def f(cache):\n    return [layer.keys for layer in cache.layers]",
        "def f(self):\n    self._cache.layers = []",
        "def f(model, cache):\n    return model(past_key_values=cache)",
        "def f(model, cache):\n    return model(**{'logits_to_keep': 1})",
    ],
)
def test_the_scan_catches_a_wrong_way_use(source: str) -> None:
    assert violations(source, "personaxis/web/batcher.py")


def test_the_scan_passes_ordinary_transformers_imports() -> None:
    assert not violations("from transformers import AutoConfig, AutoModelForCausalLM", "personaxis/models.py")
