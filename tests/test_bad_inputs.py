"""A catalogue of bad inputs — CLI, Python API, data files, transcripts, axis and config files, the web API — each
refused with a clear error that names the problem, and with nothing written or changed by the failed call.

Every case snapshots the folders it could touch (content, size and modification time of every file) before the call
and compares after it. CLI cases run ``personaxis.cli.app`` in-process with typer's ``CliRunner``: exit code 2, one
``error: …`` line, no traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_model
from typer.testing import CliRunner

from personaxis.axis import Axis
from personaxis.cli import app
from personaxis.io.tensor_files import load_axis, load_capping
from personaxis.models import LoadedModel
from personaxis.pipeline import Pipeline
from personaxis.settings import RunSettings

N_LAYERS, HIDDEN = 4, 32  # the tiny model of tests/tiny.py


# ------------------------------------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, lm: LoadedModel) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, lm: LoadedModel, model_dir: Path) -> Path:
    """A finished tiny run (the axis fits the tiny model)."""
    out = tmp_path_factory.mktemp("run") / "run"
    settings = RunSettings.from_preset(
        "tiny", model=str(model_dir), judge="none", n_roles=3, n_questions=2, n_traits=0, max_new_tokens=6
    )
    Pipeline(out, settings, lm=lm, show_progress=False).run()
    return out


def snapshot(*roots: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``roots``: content hash, size and modification time (and every folder, by name)."""
    state: dict[str, tuple[str, int, int]] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_dir():
                state[str(path)] = ("dir", 0, 0)
            else:
                stat = path.stat()
                state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
    return state


@contextmanager
def nothing_written(*roots: Path) -> Iterator[None]:
    before = snapshot(*roots)
    yield
    after = snapshot(*roots)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the failed call wrote or changed: {changed}"


class Payload:
    """Unpickling this creates the marker file (what a malicious published file would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


@dataclass
class Ctx:
    """A workspace for one case: bad files are made in ``ws``; ``run`` is a finished run (shared, read-only)."""

    ws: Path
    model: Path
    run: Path

    @property
    def marker(self) -> Path:
        return self.ws / "MARKER-payload-ran"

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    def pt(self, name: str, obj: Any) -> Path:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return self.file(name, buffer.getvalue())

    def st(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        path = self.ws / name
        save_file(tensors, str(path), metadata=metadata)
        return path

    def axis_file(self, name: str, vectors: torch.Tensor, **metadata: str) -> Path:
        return self.st(name, {"axis": vectors}, {"format": "personaxis.axis/1", **metadata})

    def malicious(self, name: str, obj: Any | None = None) -> Path:
        return self.pt(name, obj if obj is not None else {"axis": Payload(self.marker)})

    def run_copy(self, name: str = "run-copy") -> Path:
        return Path(shutil.copytree(self.run, self.ws / name))

    def folder(self, name: str, files: dict[str, bytes | str]) -> Path:
        (self.ws / name).mkdir(parents=True, exist_ok=True)
        for file, data in files.items():
            self.file(f"{name}/{file}", data)
        return self.ws / name


@pytest.fixture
def ctx(tmp_path: Path, model_dir: Path, run_dir: Path) -> Ctx:
    ws = tmp_path / "ws"
    ws.mkdir()
    return Ctx(ws, model_dir, run_dir)


def good_axis(layers: int = N_LAYERS, hidden: int = HIDDEN) -> torch.Tensor:
    return torch.randn(layers, hidden, generator=torch.Generator().manual_seed(0))


def with_value(value: float, layer: int = 1) -> torch.Tensor:
    vectors = good_axis()
    vectors[layer, 3] = value
    return vectors


def zero_layer(layer: int = 2) -> torch.Tensor:
    vectors = good_axis()
    vectors[layer] = 0
    return vectors


ROLE = {
    "name": "smith",
    "category": "human_roles",
    "system_prompts": ["You are a blacksmith at a forge."],
    "rubric": "Score 3 if it plays the smith.",
}
ROLE2 = {**ROLE, "name": "baker", "system_prompts": ["You are a baker at dawn."]}


def reference_capping(vector: Any, cap: Any, *, name: str = "axis_layer_1", ref: str | None = None) -> dict[str, Any]:
    return {
        "vectors": {name: {"vector": vector, "layer": 1}},
        "experiments": [{"id": "layers_1:2-p0.25", "interventions": [{"vector": ref or name, "cap": cap}]}],
    }


# ------------------------------------------------------------------------------------------------ CLI
@dataclass(frozen=True)
class CliCase:
    id: str
    args: Callable[[Ctx], list[str]]  # makes the bad input in the workspace, returns the command line
    match: str  # regex the error line must match (it names the problem)


RUN = ["run", "--preset", "tiny", "--judge", "none", "-q"]


def _run(c: Ctx, *extra: str, out: str | Path | None = None) -> list[str]:
    return [*RUN, "--out", str(out or c.ws / "out"), "--model", str(c.model), *extra]


CLI_CASES: list[CliCase] = [
    CliCase("run-unknown-preset", lambda c: _run(c, "--preset", "huge"), r"unknown preset 'huge'; choose one of"),
    CliCase(
        "run-unknown-extract",
        lambda c: _run(c, "--extract", "twice"),
        r"unknown extraction mode 'twice'; choose one of",
    ),
    CliCase("run-one-role", lambda c: _run(c, "--roles", "1"), r"at least 2 roles, got 1"),
    CliCase("run-six-prompts", lambda c: _run(c, "--prompts", "6"), r"5 system prompts per role"),
    CliCase(
        "run-unknown-role",
        lambda c: _run(c, "--role", "no-such-role", "--role", "pirate"),
        r"unknown role\(s\): no-such-role",
    ),
    CliCase(
        "run-negative-temperature",
        lambda c: _run(c, "--temperature", "-1"),
        r"--temperature must be a finite number in \[0, 100\], got -1",
    ),
    CliCase(
        "run-zero-new-tokens", lambda c: _run(c, "--max-new-tokens", "0"), r"max-new-tokens must be at least 1, got 0"
    ),
    CliCase(
        "questions-empty-file",
        lambda c: _run(c, "--questions-file", str(c.file("q.jsonl", "\n\n"))),
        r"q\.jsonl: file is empty",
    ),
    CliCase(
        "questions-invalid-json-line",
        lambda c: _run(c, "--questions-file", str(c.file("q.jsonl", '{"question": "Who?", "id": 1}\n{"question": \n'))),
        r"q\.jsonl: line 2: invalid JSON",
    ),
    CliCase(
        "questions-latin1",
        lambda c: _run(
            c,
            "--questions-file",
            str(c.file("q.jsonl", '{"question": "Qui êtes-vous ?", "id": 1}\n'.encode("latin-1"))),
        ),
        r"q\.jsonl: not UTF-8 text",
    ),
    CliCase(
        "questions-duplicate-id",
        lambda c: _run(
            c, "--questions-file", str(c.file("q.jsonl", '{"question": "A?", "id": 7}\n{"question": "B?", "id": 7}\n'))
        ),
        r"duplicate question id 7",
    ),
    CliCase(
        "questions-missing-field",
        lambda c: _run(c, "--questions-file", str(c.file("q.jsonl", '{"id": 1}\n'))),
        r"q\.jsonl: line 1: question: Field required",
    ),
    CliCase(
        "roles-dir-empty",
        lambda c: _run(c, "--roles-dir", str(c.folder("roles", {}))),
        r"no role files \(\*\.json\) found",
    ),
    CliCase(
        "roles-dir-missing-prompts",
        lambda c: _run(
            c,
            "--roles-dir",
            str(c.folder("roles", {"smith.json": json.dumps({"name": "smith"}), "baker.json": json.dumps(ROLE2)})),
        ),
        r"smith\.json: system_prompts: Field required",
    ),
    CliCase(
        "roles-dir-reference-bad-instruction",
        lambda c: _run(
            c,
            "--roles-dir",
            str(
                c.folder(
                    "roles",
                    {
                        "ghost.json": json.dumps({"instruction": "boo", "questions": []}),
                        "baker.json": json.dumps(ROLE2),
                    },
                )
            ),
        ),
        r"ghost\.json: 'instruction' must be a non-empty list",
    ),
    CliCase(
        "roles-dir-duplicate-names",
        lambda c: _run(
            c, "--roles-dir", str(c.folder("roles", {"a.json": json.dumps(ROLE), "b.json": json.dumps(ROLE)}))
        ),
        r"duplicate role name 'smith'",
    ),
    CliCase(
        "roles-dir-utf16",
        lambda c: _run(
            c, "--roles-dir", str(c.folder("roles", {"smith.json": json.dumps([ROLE, ROLE2]).encode("utf-16")}))
        ),
        r"smith\.json: not UTF-8 text",
    ),
    CliCase(
        "roles-dir-short-prompt",
        lambda c: _run(
            c,
            "--roles-dir",
            str(c.folder("roles", {"r.json": json.dumps([{**ROLE, "system_prompts": ["Smith."]}, ROLE2])})),
        ),
        r"system prompt 0 is empty or too short: 'Smith\.'",
    ),
    CliCase(
        "run-out-is-a-file",
        lambda c: _run(c, out=c.file("out.txt", "not a folder")),
        r"out\.txt exists and is not a directory",
    ),
    CliCase(
        "run-out-other-settings",
        lambda c: _run(c, "--max-new-tokens", "3", out=c.run_copy()),
        r"was started with other settings \(.*max_new_tokens",
    ),
    CliCase(
        "run-out-corrupt-manifest",
        lambda c: _run(c, out=c.folder("broken", {"manifest.json": '{"format": "personaxis.run/1",'})),
        r"broken/manifest\.json: unreadable manifest",
    ),
    CliCase(
        "stage-out-not-a-run",
        lambda c: ["vectors", "--out", str(c.folder("empty", {}))],
        r"is not a personaxis run directory \(no manifest\.json\)",
    ),
    CliCase(
        "stage-out-of-order",
        lambda c: ["vectors", "--out", str(_without(c.run_copy(), "activations"))],
        r"unit\(s\) of the 'extract' stage are not done yet",
    ),
    CliCase(
        "export-nan-axis",
        lambda c: [
            "export",
            "--axis",
            str(c.axis_file("nan.safetensors", with_value(float("nan")))),
            "--format",
            "reference",
            "--out",
            str(c.ws / "x.pt"),
        ],
        r"nan\.safetensors: axis holds NaN or inf",
    ),
    CliCase(
        "export-zero-axis",
        lambda c: [
            "export",
            "--axis",
            str(c.axis_file("zero.safetensors", zero_layer(2))),
            "--format",
            "reference",
            "--out",
            str(c.ws / "x.pt"),
        ],
        r"zero vector at layer\(s\) \[2\]",
    ),
    CliCase(
        "export-unknown-format",
        lambda c: ["export", "--axis", str(c.run / "axis.safetensors"), "--format", "onnx", "--out", str(c.ws / "x")],
        r"unknown format 'onnx'; choose reference or gguf",
    ),
    CliCase(
        "export-layer-out-of-range",
        lambda c: [
            "export",
            "--axis",
            str(c.run / "axis.safetensors"),
            "--format",
            "gguf",
            "--layer",
            "99",
            "--out",
            str(c.ws / "x.gguf"),
        ],
        r"layer 99 is out of range for an axis of 4 layers",
    ),
    CliCase(
        "export-layer-0-gguf",
        lambda c: [
            "export",
            "--axis",
            str(c.run / "axis.safetensors"),
            "--format",
            "gguf",
            "--layer",
            "0",
            "--out",
            str(c.ws / "x.gguf"),
        ],
        r"cannot address layer 0",
    ),
    CliCase(
        "export-missing-axis",
        lambda c: [
            "export",
            "--axis",
            str(c.ws / "nope.safetensors"),
            "--format",
            "reference",
            "--out",
            str(c.ws / "x.pt"),
        ],
        r"nope\.safetensors: axis file not found",
    ),
    CliCase(
        "export-huge-header",
        lambda c: [
            "export",
            "--axis",
            str(c.file("huge.safetensors", struct.pack("<Q", 2**40) + b"{}")),
            "--format",
            "reference",
            "--out",
            str(c.ws / "x.pt"),
        ],
        r"not a valid safetensors file: .*header too large",
    ),
    CliCase(
        "import-unknown-kind",
        lambda c: [
            "import",
            "--from",
            str(c.pt("a.pt", good_axis())),
            "--kind",
            "weights",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"unknown kind 'weights'",
    ),
    CliCase(
        "import-malicious-axis",
        lambda c: [
            "import",
            "--from",
            str(c.malicious("evil.pt")),
            "--kind",
            "axis",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"evil\.pt: refused: the file holds non-tensor objects",
    ),
    CliCase(
        "import-malicious-vectors",
        lambda c: [
            "import",
            "--from",
            str(c.malicious("evil.pt", {"vector": Payload(c.marker)})),
            "--kind",
            "vectors",
            "--out",
            str(c.ws / "v.safetensors"),
        ],
        r"evil\.pt: refused",
    ),
    CliCase(
        "import-malicious-capping",
        lambda c: [
            "import",
            "--from",
            str(c.malicious("evil.pt", {"vectors": Payload(c.marker), "experiments": []})),
            "--kind",
            "capping",
            "--out",
            str(c.ws / "c.safetensors"),
        ],
        r"evil\.pt: refused",
    ),
    CliCase(
        "import-raw-pickle-stream",
        lambda c: [
            "import",
            "--from",
            str(c.file("raw.pt", pickle.dumps(Payload(c.marker)))),
            "--kind",
            "axis",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"raw\.pt: (refused|not a readable torch file)",
    ),
    CliCase(
        "import-empty-file",
        lambda c: [
            "import",
            "--from",
            str(c.file("empty.pt", b"")),
            "--kind",
            "axis",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"empty\.pt: the file is empty",
    ),
    CliCase(
        "import-truncated",
        lambda c: [
            "import",
            "--from",
            str(c.file("cut.pt", c.pt("whole.pt", good_axis()).read_bytes()[:300])),
            "--kind",
            "axis",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"cut\.pt: not a readable torch file",
    ),
    CliCase(
        "import-3d-axis",
        lambda c: [
            "import",
            "--from",
            str(c.pt("3d.pt", torch.randn(2, 4, 32))),
            "--kind",
            "axis",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"must have shape \[n_layers, hidden\], got \(2, 4, 32\)",
    ),
    CliCase(
        "import-integer-axis",
        lambda c: [
            "import",
            "--from",
            str(c.pt("int.pt", torch.ones(4, 32, dtype=torch.int64))),
            "--kind",
            "axis",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"floating-point values, got torch\.int64",
    ),
    CliCase(
        "import-axis-wrong-container",
        lambda c: [
            "import",
            "--from",
            str(c.pt("list.pt", [good_axis()])),
            "--kind",
            "axis",
            "--out",
            str(c.ws / "a.safetensors"),
        ],
        r"expected a tensor \[n_layers, hidden\] or a dict with key 'axis'; found a list",
    ),
    CliCase(
        "import-inf-vectors",
        lambda c: [
            "import",
            "--from",
            str(c.pt("inf.pt", {"vector": with_value(float("inf"))})),
            "--kind",
            "vectors",
            "--out",
            str(c.ws / "v.safetensors"),
        ],
        r"inf\.pt: vector holds NaN or inf",
    ),
    CliCase(
        "import-vectors-empty-folder",
        lambda c: [
            "import",
            "--from",
            str(c.folder("vecs", {"notes.txt": "x"})),
            "--kind",
            "vectors",
            "--out",
            str(c.ws / "out"),
        ],
        r"vecs: no \.pt files",
    ),
    CliCase(
        "import-capping-json-out",
        lambda c: [
            "import",
            "--from",
            str(c.pt("c.pt", reference_capping(torch.randn(32), -1.0))),
            "--kind",
            "capping",
            "--out",
            str(c.ws / "c.json"),
        ],
        r"our files are \.safetensors files",
    ),
    CliCase(
        "import-capping-nan-cap",
        lambda c: [
            "import",
            "--from",
            str(c.pt("c.pt", reference_capping(torch.randn(32), float("nan")))),
            "--kind",
            "capping",
            "--out",
            str(c.ws / "c.safetensors"),
        ],
        r"cap on 'axis_layer_1' must be a finite number",
    ),
    CliCase(
        "import-capping-unknown-vector",
        lambda c: [
            "import",
            "--from",
            str(c.pt("c.pt", reference_capping(torch.randn(32), -1.0, ref="ghost"))),
            "--kind",
            "capping",
            "--out",
            str(c.ws / "c.safetensors"),
        ],
        r"refers to unknown vector 'ghost'",
    ),
    CliCase(
        "import-capping-zero-vector",
        lambda c: [
            "import",
            "--from",
            str(c.pt("c.pt", reference_capping(torch.zeros(32), -1.0))),
            "--kind",
            "capping",
            "--out",
            str(c.ws / "c.safetensors"),
        ],
        r"is all zeros: it has no direction",
    ),
    CliCase(
        "import-capping-not-a-config",
        lambda c: [
            "import",
            "--from",
            str(c.pt("c.pt", {"axis": good_axis()})),
            "--kind",
            "capping",
            "--out",
            str(c.ws / "c.safetensors"),
        ],
        r"expected a dict with 'vectors'",
    ),
    CliCase(
        "calibrate-not-a-run",
        lambda c: ["calibrate", "--run", str(c.folder("empty", {}))],
        r"is not a personaxis run directory",
    ),
    CliCase(
        "calibrate-percentile-150",
        lambda c: ["calibrate", "--run", str(c.run_copy()), "--percentiles", "25,150"],
        r"--percentiles must be a finite number in \[0, 100\], got 150",
    ),
    CliCase(
        "calibrate-percentile-text",
        lambda c: ["calibrate", "--run", str(c.run_copy()), "--percentiles", "low,high"],
        r"expected comma-separated numbers, got 'low,high'",
    ),
    CliCase(
        "calibrate-empty-band",
        lambda c: ["calibrate", "--run", str(c.run_copy()), "--bands", "3:1"],
        r"layer range '3:1' is empty",
    ),
    CliCase(
        "calibrate-band-too-deep",
        lambda c: ["calibrate", "--run", str(c.run_copy()), "--bands", "2:9"],
        r"does not fit a model of 4 layers",
    ),
    CliCase(
        "calibrate-axis-wrong-hidden",
        lambda c: [
            "calibrate",
            "--run",
            str(c.run_copy()),
            "--axis",
            str(c.axis_file("h16.safetensors", good_axis(4, 16))),
        ],
        r"do not fit an axis of 4 layers and hidden size 16",
    ),
    CliCase(
        "serve-missing-axis",
        lambda c: ["serve", "--run", str(c.run), "--axis", str(c.ws / "none.safetensors"), "--model", str(c.model)],
        r"no axis at .*none\.safetensors",
    ),
    CliCase(
        "serve-cap-without-config",
        lambda c: ["serve", "--run", str(c.run), "--cap", "layers_1:2-p25", "--model", str(c.model)],
        r"--cap layers_1:2-p25: no capping config",
    ),
    CliCase(
        "serve-axis-wrong-hidden",
        lambda c: [
            "serve",
            "--run",
            str(c.run),
            "--axis",
            str(c.axis_file("h16.safetensors", good_axis(4, 16))),
            "--model",
            str(c.model),
        ],
        r"axis hidden size 16 does not match .*hidden size 32",
    ),
    CliCase(
        "serve-axis-wrong-layers",
        lambda c: [
            "serve",
            "--run",
            str(c.run),
            "--axis",
            str(c.axis_file("l6.safetensors", good_axis(6, 32))),
            "--model",
            str(c.model),
        ],
        r"axis has 6 layers but .* has 4",
    ),
    CliCase(
        "serve-garbage-capping",
        lambda c: [
            "serve",
            "--run",
            str(c.run),
            "--capping",
            str(c.file("cap.safetensors", b"\x00" * 64)),
            "--model",
            str(c.model),
        ],
        r"cap\.safetensors: not a valid safetensors file",
    ),
    CliCase(
        "serve-zero-new-tokens",
        lambda c: ["serve", "--run", str(c.run), "--max-new-tokens", "0", "--model", str(c.model)],
        r"--max-new-tokens must be a whole number in \[1, 1e\+06\], got 0",
    ),
]


def _zero_activation(run: Path) -> Path:
    """A run whose first activation file is all zero bytes (same size), with its vectors to recompute."""
    unit = sorted((run / "activations").rglob("*.safetensors"))[0]
    unit.write_bytes(b"\x00" * unit.stat().st_size)
    (run / "vectors" / "index.json").unlink()
    return run


def _rollout_without_answer(run: Path) -> Path:
    """A run whose first rollout file lost an 'answer', with that unit's activations to extract again."""
    unit = sorted((run / "rollouts").rglob("*.json"))[0]
    data = json.loads(unit.read_text())
    del data["rollouts"][0]["answer"]
    unit.write_text(json.dumps(data))
    (run / "activations" / unit.relative_to(run / "rollouts")).with_suffix(".safetensors").unlink()
    return run


NESTED = "[" * 100_000 + "]" * 100_000
TRANSCRIPT = json.dumps(
    {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
)

# Issue 19: numbers that are not finite or out of range, output paths of the wrong kind (checked before the model
# loads), damaged run folders, deeply nested JSON, role names that would clash or are reserved, imports that wrote
# part of their output, and messages that misled.
CLI_ROBUST_CASES: list[CliCase] = [
    CliCase(
        "run-nan-temperature",
        lambda c: _run(c, "--temperature", "nan"),
        r"--temperature must be a finite number in \[0, 100\], got nan",
    ),
    CliCase(
        "run-negative-seed",
        lambda c: _run(c, "--seed", "-1"),
        r"--seed must be a whole number in \[0, 9\.22337e\+18\], got -1",
    ),
    CliCase(
        "run-zero-batch-size",
        lambda c: _run(c, "--batch-size", "0"),
        r"--batch-size must be a whole number in \[1, 1e\+06\], got 0",
    ),
    CliCase(
        "steer-nan-temperature",
        lambda c: [
            "steer",
            "Hi",
            "--axis",
            str(c.run),
            "--alpha",
            "0.1",
            "--temperature",
            "nan",
            "--model",
            str(c.model),
        ],
        r"--temperature must be a finite number in \[0, 100\], got nan",
    ),
    CliCase(
        "steer-huge-alpha",
        lambda c: ["steer", "Hi", "--axis", str(c.run), "--alpha", "1e300", "--model", str(c.model)],
        r"--alpha must be a finite number in \[-10000, 10000\], got 1e\+300",
    ),
    CliCase(
        "steer-json-is-a-folder",
        lambda c: [
            "steer",
            "Hi",
            "--axis",
            str(c.run),
            "--alpha",
            "0.1",
            "--model",
            str(c.model),
            "--json",
            str(c.folder("answers", {})),
        ],
        r"--json .*answers: is a folder; give a file name",
    ),
    CliCase(
        "chat-inf-temperature",
        lambda c: ["chat", "--axis", str(c.run), "--temperature", "inf", "--model", str(c.model)],
        r"--temperature must be a finite number in \[0, 100\], got inf",
    ),
    CliCase(
        "export-huge-scale",
        lambda c: [
            "export",
            "--axis",
            str(c.run / "axis.safetensors"),
            "--format",
            "gguf",
            "--layer",
            "1",
            "--scale",
            "1e39",
            "--out",
            str(c.ws / "x.gguf"),
        ],
        r"--scale must be a finite number in \[-10000, 10000\], got 1e\+39",
    ),
    CliCase(
        "export-out-is-a-folder",
        lambda c: [
            "export",
            "--axis",
            str(c.run / "axis.safetensors"),
            "--format",
            "reference",
            "--out",
            str(c.folder("exported", {})),
        ],
        r"--out .*exported: is a folder; give a file name",
    ),
    CliCase(
        "monitor-zero-max-tokens",
        lambda c: [
            "monitor",
            str(c.file("t.json", TRANSCRIPT)),
            "--axis",
            str(c.run),
            "--max-tokens",
            "0",
            "--model",
            str(c.model),
            "--out",
            str(c.ws / "drift"),
        ],
        r"--max-tokens must be a whole number in \[1, 1e\+07\], got 0",
    ),
    CliCase(
        "monitor-out-is-a-file",
        lambda c: [
            "monitor",
            str(c.file("t.json", TRANSCRIPT)),
            "--axis",
            str(c.run),
            "--model",
            str(c.model),
            "--out",
            str(c.file("drift.txt", "x")),
        ],
        r"--out .*drift\.txt: .*drift\.txt is a file, not a folder",
    ),
    *[
        CliCase(
            f"eval-{command}-out-is-a-file",
            lambda c, command=command: [
                "eval",
                command,
                "--run",
                str(c.run),
                "--model",
                str(c.model),
                "--out",
                str(c.file(f"{command}.txt", "x")),
            ],
            rf"--out .*{command}\.txt: .*{command}\.txt is a file, not a folder",
        )
        for command in ("steering", "drift", "jailbreak", "capability", "capping")
    ],
    CliCase(
        "monitor-unknown-windows",
        lambda c: [
            "monitor",
            str(c.file("t.json", TRANSCRIPT)),
            "--axis",
            str(c.run),
            "--model",
            str(c.model),
            "--windows",
            "all",
            "--out",
            str(c.ws / "drift"),
        ],
        r"--windows 'all': choose chunked or longest",
    ),
    CliCase(
        "monitor-deeply-nested-json",
        lambda c: [
            "monitor",
            str(c.file("deep.json", NESTED)),
            "--axis",
            str(c.run),
            "--model",
            str(c.model),
            "--out",
            str(c.ws / "drift"),
        ],
        r"nested too deeply",
    ),
    CliCase(
        "serve-port-99999",
        lambda c: ["serve", "--run", str(c.run), "--port", "99999", "--model", str(c.model)],
        r"--port must be a whole number in \[1, 65535\], got 99999",
    ),
    CliCase(
        "serve-nan-upload-limit",
        lambda c: ["serve", "--run", str(c.run), "--max-upload-mb", "nan", "--model", str(c.model)],
        r"--max-upload-mb must be a finite number in \(0, 1024\], got nan",
    ),
    CliCase(
        "run-manifest-is-a-list",
        lambda c: _run(c, out=c.folder("listed", {"manifest.json": "[]"})),
        r"listed/manifest\.json: not a personaxis manifest",
    ),
    CliCase(
        "run-manifest-settings-5",
        lambda c: _run(c, out=c.folder("five", {"manifest.json": '{"format": "personaxis.run/1", "settings": 5}'})),
        r"five/manifest\.json: not a personaxis manifest",
    ),
    CliCase(
        "run-manifest-deeply-nested",
        lambda c: _run(c, out=c.folder("deep", {"manifest.json": NESTED})),
        r"deep/manifest\.json: unreadable manifest \(RecursionError\)",
    ),
    CliCase(
        "stage-manifest-settings-damaged",
        lambda c: [
            "vectors",
            "--out",
            str(
                c.folder(
                    "hot",
                    {"manifest.json": json.dumps({"format": "personaxis.run/1", "settings": {"temperature": "hot"}})},
                )
            ),
        ],
        r"hot/manifest\.json: the settings in the manifest are damaged",
    ),
    CliCase(
        "stage-zeroed-activation-file",
        lambda c: ["vectors", "--out", str(_zero_activation(c.run_copy()))],
        r"activations/.*\.safetensors: damaged unit file .*delete it and rerun",
    ),
    CliCase(
        "stage-rollout-without-answer",
        lambda c: ["extract", "--out", str(_rollout_without_answer(c.run_copy()))],
        r"rollouts/.*\.json: damaged unit file \(rollouts\.0\.answer lacks its 'answer'\); delete it and rerun",
    ),
    CliCase(
        "run-role-named-Default",
        lambda c: _run(
            c,
            "--roles-dir",
            str(c.folder("roles", {"d.json": json.dumps({**ROLE, "name": "Default"}), "b.json": json.dumps(ROLE2)})),
        ),
        r"role name 'Default' is reserved",
    ),
    CliCase(
        "run-role-named-trait",
        lambda c: _run(
            c,
            "--roles-dir",
            str(
                c.folder(
                    "roles", {"d.json": json.dumps({**ROLE, "name": "Trait-calm-pos"}), "b.json": json.dumps(ROLE2)}
                )
            ),
        ),
        r"role name 'Trait-calm-pos' is reserved",
    ),
    CliCase(
        "run-role-names-share-a-folder",
        lambda c: _run(
            c,
            "--roles-dir",
            str(
                c.folder(
                    "roles",
                    {
                        "a.json": json.dumps({**ROLE, "name": "opera singer"}),
                        "b.json": json.dumps({**ROLE2, "name": "opera-singer"}),
                    },
                )
            ),
        ),
        r"names clash: 'opera singer' and 'opera-singer' would share the folder 'opera-singer'",
    ),
    CliCase(
        "import-out-without-suffix",
        lambda c: ["import", "--from", str(c.pt("a.pt", good_axis())), "--kind", "axis", "--out", str(c.ws / "noext")],
        r"--out .*noext: our files are \.safetensors files",
    ),
    CliCase(
        "import-vectors-folder-one-malicious",
        lambda c: [
            "import",
            "--from",
            str(
                c.folder(
                    "vecs",
                    {
                        "a.pt": c.pt("good.pt", {"vector": good_axis()}).read_bytes(),
                        "b.pt": c.malicious("evil.pt", {"vector": Payload(c.marker)}).read_bytes(),
                    },
                )
            ),
            "--kind",
            "vectors",
            "--out",
            str(c.ws / "imported"),
        ],
        r"b\.pt: refused",
    ),
    CliCase(
        "import-vectors-out-is-a-file",
        lambda c: [
            "import",
            "--from",
            str(c.folder("vecs", {"a.pt": c.pt("good.pt", {"vector": good_axis()}).read_bytes()})),
            "--kind",
            "vectors",
            "--out",
            str(c.file("imported", "x")),
        ],
        r"imported is a file, not a folder",
    ),
    CliCase(
        "calibrate-reference-out-is-a-folder",
        lambda c: ["calibrate", "--run", str(c.run_copy()), "--reference-out", str(c.folder("ref", {}))],
        r"--reference-out .*ref: is a folder",
    ),
    CliCase(
        "calibrate-out-is-a-folder",
        lambda c: ["calibrate", "--run", str(c.run_copy()), "--out", str(c.folder("cfg", {}))],
        r"--out .*cfg: is a folder",
    ),
]

# Bad inputs of a new run that are checked before anything is written (the model, the judge).
CLI_NEW_RUN_CASES: list[CliCase] = [
    CliCase("run-missing-model", lambda c: _run(c, "--model", str(c.ws / "no-model")), r"model path does not exist"),
    CliCase("run-unknown-judge", lambda c: _run(c, "--judge", "anthropic:claude"), r"unknown judge 'anthropic:claude'"),
]


def _without(run: Path, stage_dir: str) -> Path:
    shutil.rmtree(run / stage_dir)
    return run


def _check_cli(case: CliCase, c: Ctx) -> None:
    args = case.args(c)
    with nothing_written(c.ws, c.run, c.model):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert re.search(case.match, errors[0]), errors[0]
    assert "Traceback" not in result.output
    assert not c.marker.exists()


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case: CliCase, ctx: Ctx) -> None:
    _check_cli(case, ctx)


# A new run checks the model and the judge before Pipeline.open writes anything.
@pytest.mark.parametrize("case", CLI_NEW_RUN_CASES, ids=[c.id for c in CLI_NEW_RUN_CASES])
def test_cli_bad_input_checked_before_writing(case: CliCase, ctx: Ctx) -> None:
    _check_cli(case, ctx)


@pytest.mark.parametrize("case", CLI_ROBUST_CASES, ids=[c.id for c in CLI_ROBUST_CASES])
def test_cli_bad_input_issue_19(case: CliCase, ctx: Ctx) -> None:
    _check_cli(case, ctx)


def test_run_folder_in_use_is_refused_naming_the_holder(ctx: Ctx) -> None:
    import os
    import socket

    from personaxis.store import RunStore

    run = ctx.run_copy()
    holder = RunStore(run)
    holder.acquire_lock()
    try:
        _check_cli(
            CliCase(
                "run-folder-in-use",
                lambda c: ["vectors", "--out", str(run)],
                rf"is in use by pid {os.getpid()} on host {re.escape(socket.gethostname())}; wait for it to finish",
            ),
            ctx,
        )
    finally:
        holder.release_lock()


def test_refusing_a_malicious_torch_file_never_quotes_the_unsafe_advice(ctx: Ctx) -> None:
    """PyTorch's own message suggests retrying with weights_only=False (running the file's code): never shown."""
    for obj in ({"axis": Payload(ctx.marker)}, [Payload(ctx.marker)]):
        result = CliRunner().invoke(
            app,
            [
                "import",
                "--from",
                str(ctx.malicious("evil.pt", obj)),
                "--kind",
                "axis",
                "--out",
                str(ctx.ws / "a.safetensors"),
            ],
        )
        assert result.exit_code == 2 and "refused" in result.output, result.output
        for advice in (
            "weights_only=False",
            "weights_only` set to `False",
            "add_safe_globals",
            "safe_globals",
            "trust the source",
        ):
            assert advice not in result.output, result.output
        assert not ctx.marker.exists()


def test_gguf_reader_refuses_non_finite_directions(ctx: Ctx) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from personaxis.interop import InteropError, read_gguf_control_vector

    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        path = ctx.ws / f"{name}.gguf"
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", "tiny")
        writer.add_uint32("controlvector.layer_count", 1)
        writer.add_tensor("direction.1", np.full(HIDDEN, value, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(InteropError, match=r"direction\.1 holds NaN or infinite values"):
            read_gguf_control_vector(path, hidden=HIDDEN)


# ------------------------------------------------------------------------------------------------ Python API and files
@dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable[[Ctx], Callable[[], Any]]  # makes the bad input, returns the failing call
    error: type[BaseException]
    match: str


def _axis() -> Axis:
    return Axis(good_axis(), model="tiny", residual_norms=torch.ones(N_LAYERS))


def _conv(*messages: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"role": role, "content": content} for role, content in messages]


def _render(lm: LoadedModel, conversation: Any) -> Callable[[], Any]:
    from personaxis.chat import render_chat

    return lambda: render_chat(lm.tokenizer, conversation, lm.profile)


def _api_cases(lm: LoadedModel) -> list[ApiCase]:
    from personaxis import interop
    from personaxis.axis import AxisError
    from personaxis.capping import CappingError
    from personaxis.chat import ConversationError, render_prompt, validate_conversation
    from personaxis.data import CatalogueError, load_default, load_questions, load_roles, load_traits
    from personaxis.interventions import Add, FloorCap, VectorError, apply_interventions, check_vector
    from personaxis.judges import JudgeItem, make_judge
    from personaxis.monitor import MonitorError, load_transcript, transcript_files
    from personaxis.pipeline import open_existing
    from personaxis.store import RunDirError

    def enter(manager: Any) -> Callable[[], Any]:
        def call() -> None:
            with manager():
                pass

        return call

    return [
        # axis: shapes, values, layers, hidden sizes
        ApiCase(
            "axis-zero-vectors",
            lambda c: lambda: Axis(torch.zeros(4, 32)),
            AxisError,
            r"zero vector at layer\(s\) \[0, 1, 2, 3\]",
        ),
        ApiCase("axis-nan", lambda c: lambda: Axis(with_value(float("nan"))), AxisError, r"holds NaN or inf"),
        ApiCase("axis-inf", lambda c: lambda: Axis(with_value(float("-inf"))), AxisError, r"holds NaN or inf"),
        ApiCase(
            "axis-1d", lambda c: lambda: Axis(torch.ones(32)), AxisError, r"shape \[n_layers, hidden\], got \(32,\)"
        ),
        ApiCase(
            "axis-target-layer",
            lambda c: lambda: Axis(good_axis(), target_layer=9),
            AxisError,
            r"target layer 9 is out of range",
        ),
        ApiCase(
            "axis-negative-norms",
            lambda c: lambda: Axis(good_axis(), residual_norms=torch.tensor([1.0, -1, 1, 1])),
            AxisError,
            r"residual norms must be 4 positive finite numbers",
        ),
        ApiCase(
            "project-hidden-mismatch",
            lambda c: lambda: _axis().project(torch.ones(16), layer=1),
            AxisError,
            r"activations have hidden size 16, the axis 32",
        ),
        ApiCase(
            "project-needs-layer",
            lambda c: lambda: _axis().project(torch.ones(5, 32)),
            AxisError,
            r"need a layer index",
        ),
        ApiCase(
            "axis-layer-out-of-range",
            lambda c: lambda: _axis().layer(4),
            IndexError,
            r"layer 4 is out of range .* \(0\.\.3\)",
        ),
        ApiCase(
            "axis-fits-wrong-layers",
            lambda c: lambda: _axis().check_fits(30, 32, "SmolLM2"),
            AxisError,
            r"axis has 4 layers but SmolLM2 has 30",
        ),
        ApiCase(
            "axis-fits-wrong-hidden",
            lambda c: lambda: _axis().check_fits(4, 576, "SmolLM2"),
            AxisError,
            r"hidden size 32 does not match SmolLM2's hidden size 576",
        ),
        ApiCase(
            "axis-cosine-shape",
            lambda c: lambda: _axis().cosine(good_axis(3, 32)),
            AxisError,
            r"cannot compare an axis of shape \(4, 32\)",
        ),
        ApiCase("axis-add-shape", lambda c: lambda: _axis() + good_axis(4, 16), AxisError, r"cannot combine"),
        ApiCase(
            "axis-alpha-without-norms",
            lambda c: lambda: Axis(good_axis()).alpha_to_raw(1, 0.3),
            AxisError,
            r"has no residual norms",
        ),
        ApiCase(
            "axis-file-without-axis-tensor",
            lambda c: (lambda p: lambda: load_axis(p))(c.st("v.safetensors", {"vector": good_axis()})),
            AxisError,
            r"no 'axis' tensor in the file \(found: vector\)",
        ),
        ApiCase(
            "axis-file-garbage",
            lambda c: (lambda p: lambda: load_axis(p))(c.file("g.safetensors", b"\x07" * 100)),
            AxisError,
            r"g\.safetensors: not a valid safetensors file",
        ),
        ApiCase(
            "axis-file-empty",
            lambda c: (lambda p: lambda: load_axis(p))(c.file("e.safetensors", b"")),
            AxisError,
            r"e\.safetensors: not a valid safetensors file: .*header too small",
        ),
        ApiCase(
            "axis-file-wrong-sign",
            lambda c: (lambda p: lambda: load_axis(p))(c.axis_file("s.safetensors", good_axis(), sign="role_positive")),
            AxisError,
            r"unknown sign convention 'role_positive'",
        ),
        ApiCase(
            "axis-file-bad-metadata",
            lambda c: (lambda p: lambda: load_axis(p))(
                c.axis_file("m.safetensors", good_axis(), target_layer="middle")
            ),
            AxisError,
            r"malformed metadata",
        ),
        ApiCase(
            "axis-file-nan",
            lambda c: (lambda p: lambda: load_axis(p))(c.axis_file("n.safetensors", with_value(float("nan")))),
            AxisError,
            r"n\.safetensors: axis holds NaN or inf",
        ),
        ApiCase(
            "axis-reference-malicious",
            lambda c: (lambda p: lambda: load_axis(p))(c.malicious("evil.pt")),
            interop.InteropError,
            r"evil\.pt: refused",
        ),
        ApiCase(
            "reference-vectors-wrong-layers",
            lambda c: (lambda p: lambda: interop.load_reference_vectors(p, n_layers=30, hidden=32))(
                c.pt("v.pt", good_axis())
            ),
            interop.InteropError,
            r"has 4 layers but the model has 30",
        ),
        ApiCase(
            "reference-vectors-wrong-hidden",
            lambda c: (lambda p: lambda: interop.load_reference_vectors(p, n_layers=4, hidden=576))(
                c.pt("v.pt", good_axis())
            ),
            interop.InteropError,
            r"hidden size 32 but the model's hidden size is 576",
        ),
        ApiCase(
            "gguf-not-gguf",
            lambda c: (lambda p: lambda: interop.read_gguf_control_vector(p))(c.file("x.gguf", b"GGUF" + b"\xff" * 60)),
            interop.InteropError,
            r"x\.gguf: not a readable GGUF file",
        ),
        # interventions
        ApiCase(
            "vector-nan", lambda c: lambda: check_vector(with_value(float("nan"))[1]), VectorError, r"holds NaN or inf"
        ),
        ApiCase(
            "vector-zero",
            lambda c: lambda: check_vector(torch.zeros(32)),
            VectorError,
            r"all zeros: it has no direction",
        ),
        ApiCase(
            "vector-2d",
            lambda c: lambda: check_vector(good_axis()),
            VectorError,
            r"must be 1-D \[hidden\], got shape \(4, 32\)",
        ),
        ApiCase(
            "vector-wrong-hidden",
            lambda c: lambda: check_vector(torch.ones(16), 32),
            VectorError,
            r"size 16 but the model's hidden size is 32",
        ),
        ApiCase(
            "cap-infinite-threshold",
            lambda c: lambda: FloorCap(torch.ones(32), tau=float("inf")),
            VectorError,
            r"cap threshold must be finite",
        ),
        ApiCase(
            "intervene-wrong-hidden",
            lambda c: enter(lambda: apply_interventions(lm, {1: [Add(torch.ones(16))]})),
            VectorError,
            r"layer 1: Add vector has size 16 but the model's hidden size is 32",
        ),
        ApiCase(
            "intervene-layer-out-of-range",
            lambda c: enter(lambda: apply_interventions(lm, {4: [Add(torch.ones(32))]})),
            IndexError,
            r"layer 4 is out of range for tiny-llama: it has 4 layers",
        ),
        ApiCase(
            "intervene-not-an-operator",
            lambda c: enter(lambda: apply_interventions(lm, {1: ["cap"]})),
            TypeError,  # type: ignore[list-item]
            r"layer 1: 'cap' is not an intervention operator",
        ),
        # conversations
        ApiCase(
            "chat-unknown-role",
            lambda c: lambda: validate_conversation(_conv(("wizard", "hi"))),
            ConversationError,
            r"message 0 has unknown role 'wizard'",
        ),
        ApiCase(
            "chat-empty-content",
            lambda c: lambda: validate_conversation(_conv(("user", "hi"), ("assistant", "  "))),
            ConversationError,
            r"message 1 \(assistant\) has empty content",
        ),
        ApiCase(
            "chat-content-not-text",
            lambda c: lambda: validate_conversation(_conv(("user", 42))),
            ConversationError,
            r"message 0 \(user\) has no text content",
        ),
        ApiCase(
            "chat-late-system",
            lambda c: lambda: validate_conversation(_conv(("user", "hi"), ("system", "Be a pirate."))),
            ConversationError,
            r"message 1: a system message may only come first",
        ),
        ApiCase(
            "chat-not-a-list", lambda c: lambda: validate_conversation("hello"), ConversationError, r"must be a list of"
        ),
        ApiCase(
            "chat-empty", lambda c: lambda: validate_conversation([]), ConversationError, r"the conversation is empty"
        ),
        ApiCase(
            "prompt-ends-with-assistant",
            lambda c: lambda: render_prompt(lm.tokenizer, _conv(("user", "hi"), ("assistant", "yo")), lm.profile),
            ConversationError,
            r"must end with a user message",
        ),
        ApiCase(
            "render-no-assistant-required",
            lambda c: lambda: render_chat_required(lm, _conv(("user", "hi"))),
            ConversationError,
            r"has no assistant turn",
        ),
        # transcripts
        ApiCase(
            "transcript-malformed-json",
            lambda c: (lambda p: lambda: load_transcript(p))(c.file("t.json", '{"conversation": [')),
            MonitorError,
            r"t\.json: malformed JSON at line 1",
        ),
        ApiCase(
            "transcript-latin1",
            lambda c: (lambda p: lambda: load_transcript(p))(
                c.file(
                    "t.json",
                    json.dumps(
                        {"conversation": _conv(("user", "Où?"), ("assistant", "Là."))}, ensure_ascii=False
                    ).encode("latin-1"),
                )
            ),
            MonitorError,
            r"t\.json: not UTF-8 text",
        ),
        ApiCase(
            "transcript-empty-file",
            lambda c: (lambda p: lambda: load_transcript(p))(c.file("t.json", b"")),
            MonitorError,
            r"t\.json: malformed JSON at line 1, column 1",
        ),
        ApiCase(
            "transcript-no-conversation",
            lambda c: (lambda p: lambda: load_transcript(p))(c.file("t.json", '{"messages": []}')),
            MonitorError,
            r"t\.json: no 'conversation' key \(found: messages\)",
        ),
        ApiCase(
            "transcript-no-assistant",
            lambda c: (lambda p: lambda: load_transcript(p))(
                c.file("t.json", json.dumps({"conversation": _conv(("user", "hi"))}))
            ),
            MonitorError,
            r"t\.json: the conversation has no assistant turn",
        ),
        ApiCase(
            "transcript-not-an-object",
            lambda c: (lambda p: lambda: load_transcript(p))(c.file("t.json", "42")),
            MonitorError,
            r"must be a JSON object with a 'conversation' list",
        ),
        ApiCase(
            "transcript-missing",
            lambda c: lambda: load_transcript(c.ws / "gone.json"),
            MonitorError,
            r"gone\.json: transcript file not found",
        ),
        ApiCase(
            "transcript-folder-empty",
            lambda c: (lambda p: lambda: transcript_files([p]))(c.folder("ts", {"a.txt": "x"})),
            MonitorError,
            r"ts: folder holds no \.json transcripts",
        ),
        # capping configs
        ApiCase(
            "capping-foreign-safetensors",
            lambda c: (lambda p: lambda: load_capping(p))(c.st("c.safetensors", {"x": torch.ones(2)})),
            CappingError,
            r"not a personaxis capping config",
        ),
        ApiCase(
            "capping-missing",
            lambda c: lambda: load_capping(c.ws / "none.safetensors"),
            CappingError,
            r"capping config not found",
        ),
        ApiCase(
            "capping-malicious",
            lambda c: (lambda p: lambda: load_capping(p))(c.malicious("evil.pt", {"vectors": Payload(c.marker)})),
            interop.InteropError,
            r"evil\.pt: refused",
        ),
        ApiCase(
            "capping-unknown-experiment",
            lambda c: (
                lambda: interop.capping_from_reference(reference_capping(torch.randn(32), -1.0)).experiment(
                    "layers_9:10-p0.5"
                )
            ),
            CappingError,
            r"unknown capping experiment 'layers_9:10-p0\.5'; this config has: layers_1:2-p0\.25",
        ),
        ApiCase(
            "capping-wrong-hidden",
            lambda c: (
                lambda: interop.capping_from_reference(reference_capping(torch.randn(16), -1.0)).check_fits(4, 32)
            ),
            CappingError,
            r"capping vectors have hidden size 16 but the model's hidden size is 32",
        ),
        ApiCase(
            "capping-too-deep",
            lambda c: (
                lambda: interop.capping_from_reference(
                    {
                        **reference_capping(torch.randn(32), -1.0),
                        "vectors": {"axis_layer_1": {"vector": torch.randn(32), "layer": 40}},
                    }
                ).check_fits(4, 32)
            ),
            CappingError,
            r"uses layer 40 but the model has 4 layers",
        ),
        # data files and settings
        ApiCase(
            "roles-file-is-a-number",
            lambda c: (lambda p: lambda: load_roles(p))(c.folder("roles", {"r.json": "3"})),
            CatalogueError,
            r"r\.json: expected a role object or a list of roles, got int",
        ),
        ApiCase(
            "roles-unknown-field",
            lambda c: (lambda p: lambda: load_roles(p))(
                c.folder("roles", {"r.json": json.dumps({**ROLE, "colour": "red"})})
            ),
            CatalogueError,
            r"r\.json: colour: Extra inputs are not permitted",
        ),
        ApiCase(
            "roles-unknown-name",
            lambda c: lambda: load_roles(names=["no-such-role"]),
            CatalogueError,
            r"unknown role\(s\): no-such-role",
        ),
        ApiCase(
            "roles-unknown-category",
            lambda c: lambda: load_roles(categories=["robots"]),
            CatalogueError,
            r"unknown role categories: robots",
        ),
        ApiCase(
            "default-json-invalid",
            lambda c: (lambda p: lambda: load_default(p))(c.folder("roles", {"default.json": "{oops"})),
            CatalogueError,
            r"default\.json: invalid JSON at line 1, column 2",
        ),
        ApiCase(
            "questions-not-objects",
            lambda c: (lambda p: lambda: load_questions(p))(c.file("q.jsonl", '"Who are you?"\n')),
            CatalogueError,
            r"q\.jsonl: line 1: .*valid dictionary",
        ),
        ApiCase(
            "traits-not-a-list",
            lambda c: (lambda p: lambda: load_traits(p))(c.folder("traits", {"t.json": "{}"})),
            CatalogueError,
            r"t\.json: expected a JSON list",
        ),
        ApiCase(
            "traits-unknown-name",
            lambda c: lambda: load_traits(names=["no-such-trait"]),
            CatalogueError,
            r"unknown trait\(s\): no-such-trait",
        ),
        ApiCase(
            "settings-store-dtype",
            lambda c: lambda: RunSettings.from_preset("tiny", store_dtype="int8"),
            ValueError,
            r"store dtype must be float32, float16 or bfloat16, got 'int8'",
        ),
        ApiCase(
            "role-named-default",
            lambda c: (
                lambda p: (
                    lambda: Pipeline(c.ws / "out", RunSettings.from_preset("tiny", model="tiny", roles_dir=str(p)))
                )
            )(c.folder("roles", {"r.json": json.dumps([{**ROLE, "name": "default"}, ROLE2])})),
            ValueError,
            r"role name .default. is reserved",
        ),
        ApiCase(
            "open-not-a-run",
            lambda c: (lambda p: lambda: open_existing(p))(c.folder("empty", {})),
            RunDirError,
            r"not a personaxis run directory",
        ),
        # judges
        ApiCase(
            "judge-unknown-spec",
            lambda c: lambda: make_judge("anthropic:claude"),
            ValueError,
            r"unknown judge 'anthropic:claude'",
        ),
        ApiCase(
            "judge-duplicate-keys",
            lambda c: (lambda judge: lambda: judge.score([JudgeItem("a", "r", "", "q", "x")] * 2))(
                make_judge(
                    "openai:m",
                    base_url="http://127.0.0.1:9",
                    api_key="k",
                    cache_dir=c.ws / "cache",
                    requests_per_minute=None,
                )
            ),
            ValueError,
            r"duplicate judge item key 'a'",
        ),
    ]


def render_chat_required(lm: LoadedModel, conversation: Any) -> Any:
    from personaxis.chat import render_chat

    return render_chat(lm.tokenizer, conversation, lm.profile, require_assistant=True)


API_IDS = [case.id for case in _api_cases(cast(LoadedModel, None))]  # the model is only used when a case runs


@pytest.mark.parametrize("index", range(len(API_IDS)), ids=API_IDS)
def test_api_bad_input(index: int, ctx: Ctx, lm: LoadedModel) -> None:
    case = _api_cases(lm)[index]
    call = case.call(ctx)
    with nothing_written(ctx.ws, ctx.run), pytest.raises(case.error) as info:
        call()
    assert re.search(case.match, str(info.value)), str(info.value)
    assert "Traceback" not in str(info.value)
    assert not ctx.marker.exists()


# ------------------------------------------------------------------------------------------------ web API
@dataclass(frozen=True)
class WebCase:
    id: str
    method: str
    url: str
    body: Any  # JSON-able, or bytes sent as is with the content type below
    status: int
    match: str
    content_type: str = "application/json"


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": t} for r, t in pairs]


HI = _msgs(("user", "hi"))
WEB_LIMITS = dict(
    max_body_bytes=64 * 1024, max_messages=8, max_message_chars=500, max_transcripts=2, max_request_tokens=2000
)
WEB_CASES: list[WebCase] = [
    WebCase("chat-malformed-json", "POST", "/api/chat", b'{"messages": [', 422, r"malformed JSON"),
    WebCase(
        "chat-not-utf8",
        "POST",
        "/api/chat",
        '{"messages": [{"role": "user", "content": "é"}]}'.encode("latin-1"),
        400,
        r"error parsing the body",
    ),
    WebCase(
        "chat-body-too-large",
        "POST",
        "/api/chat",
        b" " * (64 * 1024 + 1),
        413,
        r"request body larger than the limit of 65536 bytes",
    ),
    WebCase(
        "chat-wrong-content-type", "POST", "/api/chat", b"messages=hi", 422, r".", "application/x-www-form-urlencoded"
    ),
    WebCase(
        "web-chat-unknown-role", "POST", "/api/chat", {"messages": _msgs(("wizard", "hi"))}, 422, r"messages\.0\.role"
    ),
    WebCase("chat-no-messages", "POST", "/api/chat", {"messages": []}, 422, r"messages"),
    WebCase(
        "chat-empty-user-message", "POST", "/api/chat", {"messages": _msgs(("user", "   "))}, 422, r"empty content"
    ),
    WebCase(
        "chat-too-many-tokens-asked",
        "POST",
        "/api/chat",
        {"messages": HI, "max_tokens": 100000},
        422,
        r"max_tokens is 100000, more than this server's limit of 512",
    ),
    WebCase("chat-temperature", "POST", "/api/chat", {"messages": HI, "temperature": 9}, 422, r"temperature"),
    WebCase(
        "chat-unknown-cap",
        "POST",
        "/api/chat",
        {"messages": HI, "cap": "layers_1:2-p25"},
        400,
        r"unknown capping experiment 'layers_1:2-p25'",
    ),
    WebCase(
        "chat-nan-alpha",
        "POST",
        "/api/chat",
        b'{"messages": [{"role": "user", "content": "hi"}], "alpha": NaN}',
        422,
        r"alpha: Input should be a finite number",
    ),
    WebCase(
        "chat-huge-alpha",
        "POST",
        "/api/chat",
        {"messages": HI, "alpha": 1e6},
        422,
        r"alpha: Input should be less than or equal to 10000",
    ),
    WebCase(
        "chat-alpha-past-the-engine-range",
        "POST",
        "/api/chat",
        {"messages": HI, "alpha": 50},
        400,
        r"between -10 and 10",
    ),
    WebCase(
        "chat-infinite-temperature",
        "POST",
        "/api/chat",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        422,
        r"temperature: Input should be a finite number",
    ),
    WebCase(
        "chat-nan-top-p",
        "POST",
        "/api/chat",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
        422,
        r"top_p",
    ),
    WebCase(
        "chat-negative-seed",
        "POST",
        "/api/chat",
        {"messages": HI, "seed": -1},
        422,
        r"seed: Input should be greater than or equal to 0",
    ),
    WebCase(
        "chat-lone-surrogate",
        "POST",
        "/api/chat",
        b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
        422,
        r"messages\.0\.content: a lone surrogate \(\\ud800\) at character 3 is not text",
    ),
    WebCase(
        "openai-lone-surrogate",
        "POST",
        "/v1/chat/completions",
        b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}',
        422,
        r"lone surrogate",
    ),
    WebCase(
        "transcripts-lone-surrogate",
        "POST",
        "/api/transcripts/project",
        b'{"transcripts": [{"name": "t", "data": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\ud800"}]}]}',
        422,
        r"transcripts\.0\.data\.1\.content: a lone surrogate",
    ),
    WebCase(
        "transcripts-lone-surrogate-in-metadata",
        "POST",
        "/api/transcripts/project",
        b'{"transcripts": [{"name": "t", "data": {"model": "\\ud800", "conversation": [{"role": "user", "content": "a"}, '
        b'{"role": "assistant", "content": "b"}]}}]}',
        422,
        r"transcripts\.0\.data\.model: a lone surrogate",
    ),
    WebCase(
        "transcripts-deeply-nested",
        "POST",
        "/api/transcripts/project",
        b'{"transcripts": [{"name": "t", "data": ' + b"[" * 20000 + b"]" * 20000 + b"}]}",
        422,
        r"nested too deeply",
    ),
    WebCase(
        "chat-deeply-nested",
        "POST",
        "/api/chat",
        b'{"messages": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        422,
        r"nested too deeply",
    ),
    WebCase(
        "chat-over-token-budget",
        "POST",
        "/api/chat",
        {"messages": _msgs(("user", "é" * 500), ("assistant", "ü" * 500), ("user", "ø" * 500))},
        413,
        r"needs about \d+ tokens, more than this server's budget of 2000 tokens per request",
    ),
    WebCase(
        "project-over-token-budget",
        "POST",
        "/api/project",
        {"messages": _msgs(*[("user", "é" * 500), ("assistant", "ü" * 500)] * 2)},
        413,
        r"budget of 2000 tokens",
    ),
    WebCase(
        "transcripts-over-token-budget",
        "POST",
        "/api/transcripts/project",
        {
            "transcripts": [
                {"name": f"t{i}", "data": _msgs(("user", "é" * 500), ("assistant", "ü" * 500))} for i in range(2)
            ]
        },
        413,
        r"transcripts: this request needs about \d+ tokens",
    ),
    WebCase(
        "openai-over-token-budget",
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": _msgs(("user", "é" * 500), ("assistant", "ü" * 500), ("user", "ø" * 500))},
        413,
        r"budget of 2000 tokens",
    ),
    WebCase(
        "chat-message-too-long",
        "POST",
        "/api/chat",
        {"messages": _msgs(("user", "x" * 501))},
        422,
        r"messages\.0\.content: 501 characters, more than the limit of 500",
    ),
    WebCase(
        "chat-too-many-messages",
        "POST",
        "/api/chat",
        {"messages": _msgs(*[("user", "a"), ("assistant", "b")] * 4, ("user", "c"))},
        422,
        r"9 messages, more than the limit of 8",
    ),
    WebCase(
        "chat-longer-than-context",
        "POST",
        "/api/chat",
        {"messages": _msgs(("user", "é" * 400))},
        422,
        r"tokens: with \d+ new tokens it exceeds",
    ),
    WebCase(
        "project-no-assistant", "POST", "/api/project", {"messages": HI}, 422, r"the conversation has no assistant turn"
    ),
    WebCase(
        "transcripts-too-many",
        "POST",
        "/api/transcripts/project",
        {
            "transcripts": [
                {"name": f"t{i}", "data": {"conversation": _msgs(("user", "a"), ("assistant", "b"))}} for i in range(3)
            ]
        },
        422,
        r"3 transcripts in one request, more than the limit of 2",
    ),
    WebCase(
        "transcripts-malformed",
        "POST",
        "/api/transcripts/project",
        {"transcripts": [{"name": "t", "data": {"turns": []}}]},
        422,
        r"malformed transcript: t: no 'conversation' key",
    ),
    WebCase(
        "transcripts-no-name",
        "POST",
        "/api/transcripts/project",
        {"transcripts": [{"name": "", "data": []}]},
        422,
        r"transcripts\.0\.name",
    ),
    WebCase("role-unknown", "GET", "/api/roles/no-such-role", None, 404, r"no role named 'no-such-role' in this run"),
    WebCase("transcript-unknown", "GET", "/api/transcripts/no-such", None, 404, r"no transcript named 'no-such'"),
    WebCase("transcript-symlink-outside", "GET", "/api/transcripts/leak", None, 404, r"no transcript named 'leak'"),
    WebCase(
        "transcript-invalid-file", "GET", "/api/transcripts/broken", None, 422, r"transcript 'broken' is not valid JSON"
    ),
    WebCase(
        "openai-n-choices",
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": HI, "n": 3},
        422,
        r"one choice per request",
    ),
    WebCase(
        "openai-tool-role",
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": _msgs(("tool", "x"))},
        422,
        r"'tool' is not supported",
    ),
    WebCase(
        "openai-image-part",
        "POST",
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        },
        422,
        r"only text parts are supported",
    ),
    WebCase("openai-no-model", "POST", "/v1/chat/completions", {"messages": HI}, 422, r"model"),
    WebCase(
        "openai-too-many-stops",
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": HI, "stop": list("abcde")},
        422,
        r"stop: up to 4 non-empty strings",
    ),
]
SECRET_OUTSIDE = "TOP-SECRET-OUTSIDE-THE-APP"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, lm: LoadedModel, run_dir: Path) -> Iterator[tuple[Any, Path, Path]]:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from personaxis.web.app import create_app
    from personaxis.web.limits import Limits

    root = tmp_path_factory.mktemp("web")
    (root / "outside.json").write_text(
        json.dumps({"conversation": _msgs(("user", SECRET_OUTSIDE), ("assistant", SECRET_OUTSIDE))})
    )
    transcripts = root / "transcripts"
    transcripts.mkdir()
    (transcripts / "good.json").write_text(json.dumps({"conversation": _msgs(("user", "hi"), ("assistant", "hello"))}))
    (transcripts / "broken.json").write_text('{"conversation": [')
    (transcripts / "leak.json").symlink_to(root / "outside.json")
    app_ = create_app(
        lm,
        load_axis(run_dir / "axis.safetensors"),
        run_dir=run_dir,
        transcripts_dir=transcripts,
        limits=Limits(**WEB_LIMITS),
    )
    with TestClient(app_) as client:
        yield client, run_dir, root


@pytest.mark.parametrize("case", WEB_CASES, ids=[c.id for c in WEB_CASES])
def test_web_bad_input(case: WebCase, web: tuple[Any, Path, Path]) -> None:
    client, run, root = web
    kwargs: dict[str, Any] = {}
    if isinstance(case.body, bytes):
        kwargs = {"content": case.body, "headers": {"content-type": case.content_type}}
    elif case.body is not None:
        kwargs = {"json": case.body}
    with nothing_written(run, root):
        response = client.request(case.method, case.url, **kwargs)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert error["code"] == case.status and re.search(case.match, error["message"]), error
    assert SECRET_OUTSIDE not in response.text and "Traceback" not in response.text


def test_the_catalogue_has_at_least_40_distinct_bad_inputs() -> None:
    ids = (
        [c.id for c in CLI_CASES]
        + API_IDS
        + [c.id for c in WEB_CASES]
        + [c.id for c in CLI_NEW_RUN_CASES]
        + [c.id for c in CLI_ROBUST_CASES]
    )
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


# ------------------------------------------------------------------------------------------------ safe loading
REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {
    ".venv",
    "venv",
    ".git",
    "build",
    "dist",
    "runs",
    "node_modules",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _python_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def _dotted(node: Any) -> str:
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _true_keyword(call: Any, key: str) -> bool:
    import ast

    value = next((k.value for k in call.keywords if k.arg == key), None)
    return isinstance(value, ast.Constant) and value.value is True


def unsafe_loads(source: str) -> list[str]:
    """Calls that may unpickle (and so run) what they read: ``pickle.load(s)`` and friends, ``torch.load`` without
    ``weights_only=True``, ``numpy.load(allow_pickle=True)``, ``yaml.load`` without a safe loader,
    ``trust_remote_code=True``, and ``from pickle import load``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in UNSAFE_MODULES:
            found += [
                f"line {node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in ("load", "loads", "Unpickler")
            ]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, tail = name.rpartition(".")
        if head in UNSAFE_MODULES and tail in ("load", "loads", "Unpickler", "open"):
            found.append(f"line {node.lineno}: {name}(")
        elif head.split(".")[-1] == "torch" and tail == "load":
            if not _true_keyword(node, "weights_only"):
                found.append(f"line {node.lineno}: {name}( without weights_only=True")
        elif name in ("np.load", "numpy.load") and _true_keyword(node, "allow_pickle"):
            found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") and "SafeLoader" not in ast.unparse(node):
            found.append(f"line {node.lineno}: {name}( without SafeLoader")
        if _true_keyword(node, "trust_remote_code"):
            found.append(f"line {node.lineno}: {name}(trust_remote_code=True)")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = (
        "import pickle, torch, numpy as np, yaml\nfrom pickle import loads\npickle.load(f)\npickle.loads(b)\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\nyaml.load(s)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True)\n"
    )
    assert len(unsafe_loads(bad)) == 8
    good = "torch.load(p, weights_only=True, map_location='cpu')\npickle.dumps(x)\nnp.load(p)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
    assert unsafe_loads(good) == []


def test_nothing_in_the_repository_unpickles_untrusted_data() -> None:
    files = _python_files()
    assert any(p.parts[-2:] == ("personaxis", "interop.py") for p in files)
    problems = {
        str(p.relative_to(REPO)): found for p in files if (found := unsafe_loads(p.read_text(encoding="utf-8")))
    }
    assert problems == {}


LOADERS: dict[str, Callable[[Path, Path], Any]] = {}


def _loader(name: str) -> Callable[[Callable[[Path, Path], Any]], Callable[[Path, Path], Any]]:
    def register(fn: Callable[[Path, Path], Any]) -> Callable[[Path, Path], Any]:
        LOADERS[name] = fn
        return fn

    return register


@_loader("safe_torch_load")
def _(path: Path, ws: Path) -> Any:
    from personaxis.interop import safe_torch_load

    return safe_torch_load(path)


@_loader("load_axis")
def _(path: Path, ws: Path) -> Any:
    return load_axis(path)


@_loader("load_reference_axis")
def _(path: Path, ws: Path) -> Any:
    from personaxis.interop import load_reference_axis

    return load_reference_axis(path)


@_loader("load_reference_vectors")
def _(path: Path, ws: Path) -> Any:
    from personaxis.interop import load_reference_vectors

    return load_reference_vectors(path)


@_loader("import_vectors")
def _(path: Path, ws: Path) -> Any:
    from personaxis.interop import import_vectors

    return import_vectors(path, ws / "v.safetensors")


@_loader("load_reference_capping")
def _(path: Path, ws: Path) -> Any:
    from personaxis.interop import load_reference_capping

    return load_reference_capping(path)


@_loader("load_capping")
def _(path: Path, ws: Path) -> Any:

    return load_capping(path)


@_loader("load_model")
def _(path: Path, ws: Path) -> Any:
    from personaxis.models import load_model

    folder = ws / "model"
    shutil.copytree(Path(path).parent / "model-template", folder)
    shutil.copy(path, folder / "pytorch_model.bin")
    return load_model(str(folder))


def _cli_loader(*args: str) -> Callable[[Path, Path], Any]:
    def load(path: Path, ws: Path) -> Any:
        result = CliRunner().invoke(app, [a.format(path=path, ws=ws) for a in args])
        assert result.exit_code == 2 and "error: " in result.output, result.output
        raise RuntimeError(result.output)

    return load


LOADERS.update(
    {
        "cli-import-axis": _cli_loader("import", "--from", "{path}", "--kind", "axis", "--out", "{ws}/a.safetensors"),
        "cli-import-vectors": _cli_loader(
            "import", "--from", "{path}", "--kind", "vectors", "--out", "{ws}/v.safetensors"
        ),
        "cli-import-capping": _cli_loader(
            "import", "--from", "{path}", "--kind", "capping", "--out", "{ws}/c.safetensors"
        ),
        "cli-export": _cli_loader("export", "--axis", "{path}", "--format", "reference", "--out", "{ws}/x.pt"),
    }
)


@pytest.mark.parametrize("writer", ["torch-zip", "pickle-protocol-2"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_planted_pickle_payload_is_refused_and_never_runs(
    loader: str, writer: str, tmp_path: Path, model_dir: Path
) -> None:
    marker = tmp_path / "MARKER-payload-ran"
    payload = {
        "axis": Payload(marker),
        "vector": Payload(marker),
        "vectors": Payload(marker),
        "experiments": [],
        "model.embed_tokens.weight": Payload(marker),
    }
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    path = bundle / "published.pt"
    if writer == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    template = bundle / "model-template"
    shutil.copytree(model_dir, template)
    (template / "model.safetensors").unlink()
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(Exception) as info:  # noqa: B017 - each loader has its own error type; all must refuse
        LOADERS[loader](path, ws)
    assert not marker.exists(), "the payload ran"
    message = str(info.value)
    if loader != "load_model":  # transformers' own refusal (weights_only) is not ours to word
        assert re.search(r"refused|not a readable torch file", message), message
    assert not list(ws.glob("*.safetensors")) and not list(ws.glob("*.pt"))


# ------------------------------------------------------------------------------------------------ the web app's exposure
def test_serve_binds_loopback_unless_told_and_limits_request_size(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, model_dir: Path
) -> None:
    pytest.importorskip("uvicorn")
    import uvicorn
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda web, **kwargs: calls.append({"app": web, **kwargs}))
    base = ["serve", "--run", str(run_dir), "--model", str(model_dir)]
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    served = calls[-1]
    assert served["host"] == "127.0.0.1"
    middleware = {m.cls: m.kwargs for m in served["app"].user_middleware}
    assert set(middleware[TrustedHostMiddleware]["allowed_hosts"]) >= {
        "127.0.0.1",
        "localhost",
    }  # against DNS rebinding
    assert served["app"].state.px.limits.max_body_bytes == 2 * 1024 * 1024
    result = CliRunner().invoke(app, [*base, "--host", "0.0.0.0", "--max-upload-mb", "0.5"])
    assert result.exit_code == 0 and "warning: serving on 0.0.0.0" in result.output
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["app"].state.px.limits.max_body_bytes == 512 * 1024


def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


TRAVERSALS = [
    "/static/../app.py",
    "/static/../../personaxis/web/app.py",
    "/static/%2e%2e/app.py",
    "/static/%2e%2e%2fapp.py",
    "/static/..%2fapp.py",
    "/static/..%5capp.py",
    "/static/%252e%252e/app.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/../../../../../../etc/passwd",
    "/static/.%2e/.%2e/.%2e/.%2e/etc/passwd",
    "/../../../../etc/passwd",
    "/static/" + "%2e%2e/" * 8 + "etc/passwd",
    "/api/transcripts/..%2foutside",
    "/api/transcripts/%2e%2e%2foutside",
    "/api/transcripts/../outside",
    "/api/transcripts/leak",
    "/api/roles/..%2f..%2fmanifest",
    "/static/index.html%00.png",
]


def test_no_file_outside_the_apps_own_assets_is_served(web: tuple[Any, Path, Path]) -> None:
    """A real server on 127.0.0.1 and raw requests (no client-side normalising of the path)."""
    import threading
    import time

    import uvicorn

    client, run, root = web
    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=0, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            if server.started:
                break
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        status, body = _raw_get(port, "/static/common.js")
        assert status == 200  # the app's own assets are served
        listed = client.get("/api/transcripts").json()["transcripts"]
        assert [t["name"] for t in listed] == ["good"]  # no symlink, nothing unreadable
        for path in TRAVERSALS:
            status, body = _raw_get(port, path)
            assert status in (400, 404, 422), (path, status, body[:300])
            assert SECRET_OUTSIDE.encode() not in body and b"def create_app" not in body and b"root:" not in body, path
    finally:
        server.should_exit = True
        thread.join(timeout=30)
