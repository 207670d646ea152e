"""benchmarks/compare_runs.py: two run directories match byte for byte except the fields that say when or where."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save

from personaxis.store import atomic_save_tensors, atomic_write_json

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_runs.py"
spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
assert spec is not None and spec.loader is not None
compare_runs_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs_module)
compare_runs = compare_runs_module.compare_runs


def _run(root: Path, *, created: str = "2026-01-01T00:00:00", score: int = 3, vector: float = 1.0) -> Path:
    atomic_write_json(root / "manifest.json", {"format": "personaxis.run/1", "settings": {}, "created": created})
    atomic_write_json(root / "judgments" / "ghost" / "p0.json", {"judge": "offline", "scores": {"a": score}})
    atomic_save_tensors(root / "vectors" / "default.safetensors", {"vector": torch.full((2, 3), vector)}, {"n": "1"})
    return root


def test_runs_that_differ_only_in_when_match(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b", created="2026-12-31T23:59:59")
    assert compare_runs(a, b) == []


def test_any_other_difference_is_reported(tmp_path: Path) -> None:
    a = _run(tmp_path / "a")
    assert compare_runs(a, _run(tmp_path / "b", score=2)) == ["differs: judgments/ghost/p0.json"]
    assert compare_runs(a, _run(tmp_path / "c", vector=1.0 + 1e-7)) == ["differs: vectors/default.safetensors"]
    (tmp_path / "c" / "extra.json").write_text("{}")
    assert f"only in {tmp_path / 'c'}: extra.json" in compare_runs(a, tmp_path / "c")
    # the same JSON object written another way is a difference too: the bytes are what is compared
    manifest = json.loads((a / "manifest.json").read_text())
    d = _run(tmp_path / "d")
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert compare_runs(a, d) == ["differs: manifest.json"]


def test_header_order_alone_is_reported_apart(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    tensors = {"axis": torch.ones(2, 3)}
    data = save(tensors, metadata={"x": "1", "y": "2"})  # in whichever order the library's hash map gives
    (a / "axis.safetensors").write_bytes(data)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    (b / "axis.safetensors").write_bytes(data[:8] + text + b" " * (n - len(text)) + data[8 + n :])
    reordered: list[str] = []
    assert compare_runs(a, b, reordered) == [] and reordered == ["axis.safetensors"]
