"""The run directory's layout lives in one module, and its JSON files go through typed records, byte for byte."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from personaxis.io.records import JudgmentsRecord, ManifestRecord, Rollout, RolloutsRecord, SummaryRecord, VectorIndex
from personaxis.io.run_layout import CAPPING_NAMES, REPORT_FIGURES, RunLayout, find_capping_beside, unit_key
from personaxis.io.tensor_files import load_axis
from personaxis.store import DamagedFileError, atomic_write_json, read_record, write_record

SRC = Path(__file__).resolve().parents[1] / "src" / "personaxis"
LAYOUT_MODULE = SRC / "io" / "run_layout.py"
# File and folder names of a run directory: no module but the layout's may spell them.
RUN_FILE_NAMES = {
    "manifest.json",
    ".personaxis.lock",
    "axis.safetensors",
    "summary.json",
    "report.html",
    "index.json",
    "default.safetensors",
    "residual_norms.safetensors",
    "judge_cache",
    *CAPPING_NAMES,
    *REPORT_FIGURES,
}
# Folder names that are also ordinary words (dict keys, settings): only a path join (``x / "rollouts"``) counts.
RUN_FOLDER_NAMES = {"rollouts", "activations", "judgments", "vectors", "figures", "transcripts"}
# Modules that spell another layout, not ours: the reference pipeline's output folder (activations/, scores/,
# vectors/ of .pt files), read by the importer.
OTHER_LAYOUTS = {SRC / "reference_run.py"}


def _layout_literals(path: Path) -> list[str]:
    where = path.relative_to(SRC.parent) if path.is_relative_to(SRC.parent) else path.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES:
            found.append(f"{where}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in RUN_FOLDER_NAMES:
                    found.append(f"{where}:{node.lineno}: / {side.value!r}")
    return found


def test_no_run_layout_path_outside_the_layout_module() -> None:
    ours = [p for p in sorted(SRC.rglob("*.py")) if p != LAYOUT_MODULE and p not in OTHER_LAYOUTS]
    found = [hit for path in ours for hit in _layout_literals(path)]
    assert not found, "run-directory paths spelled outside personaxis/io/run_layout.py:\n" + "\n".join(found)


def test_the_scan_finds_a_path_literal(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('def f(root):\n    return root / "vectors" / "index.json", {"vectors": 1}\n', encoding="utf-8")
    found = _layout_literals(sample)
    assert sorted(hit.rsplit(": ", 1)[1] for hit in found) == ["'index.json'", "/ 'vectors'"]  # not the dict key


def test_every_path_of_a_run(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    key = unit_key("opera singer", 1)
    assert key == "opera-singer/p1"
    assert layout.rollouts(key) == tmp_path / "rollouts" / "opera-singer" / "p1.json"
    assert layout.activations(key) == tmp_path / "activations" / "opera-singer" / "p1.safetensors"
    assert layout.judgments(key) == tmp_path / "judgments" / "opera-singer" / "p1.json"
    assert layout.condition_rollouts("opera singer") == layout.rollouts(key).parent
    assert layout.role_vectors("Smith").parent == tmp_path / "vectors" / "roles"
    assert layout.role_vectors("Smith").name.startswith("smith--")  # names go through slug
    assert layout.derived == (layout.vector_index, layout.axis, layout.summary)
    with pytest.raises(ValueError, match="unknown report figure"):
        layout.figure("nope.png")
    # the capping config beside a run: ours first, then the reference's names
    assert layout.find_capping() is None
    (tmp_path / "capping_config.pt").write_bytes(b"")
    assert layout.find_capping() == tmp_path / "capping_config.pt"
    (tmp_path / "capping.safetensors").write_bytes(b"")
    assert find_capping_beside(tmp_path) == layout.capping == tmp_path / "capping.safetensors"


def test_records_write_the_bytes_the_dicts_did(tmp_path: Path) -> None:
    rollouts = {
        "condition": "ghost",
        "kind": "role",
        "prompt_index": 0,
        "system_prompt": None,
        "rollouts": [
            {
                "id": "ghost/p0/q3",
                "question_id": 3,
                "question": "Who?",
                "answer": " Boo.\n",
                "new_tokens": 4,
                "stopped": True,
            }
        ],
    }
    judgments = {"judge": "offline", "scores": {"ghost/p0/q3": 3, "ghost/p0/q4": None}}
    manifest = {
        "format": "personaxis.run/1",
        "settings": {"seed": 0},
        "conditions": ["ghost"],
        "questions": [3],
        "created": "t",
    }
    for name, data, record in (
        ("r.json", rollouts, RolloutsRecord),
        ("j.json", judgments, JudgmentsRecord),
        ("m.json", manifest, ManifestRecord),
    ):
        atomic_write_json(tmp_path / f"dict-{name}", data)
        write_record(tmp_path / name, record.model_validate(data))
        assert (tmp_path / name).read_bytes() == (tmp_path / f"dict-{name}").read_bytes()
        assert read_record(tmp_path / name, record).to_json() == data
    rollout = read_record(tmp_path / "r.json", RolloutsRecord).rollouts[0]
    assert isinstance(rollout, Rollout) and rollout.answer == " Boo.\n"


def test_a_file_that_does_not_fit_its_record_is_damaged(tmp_path: Path) -> None:
    (tmp_path / "j.json").write_text(json.dumps({"judge": "x", "scores": {"a": "three"}}))
    with pytest.raises(DamagedFileError, match="damaged file"):
        read_record(tmp_path / "j.json", JudgmentsRecord)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DamagedFileError):
        read_record(tmp_path / "bad.json", JudgmentsRecord)
    with pytest.raises(ValidationError):
        VectorIndex.model_validate({"recipe": "pooled"})


def test_optional_summary_fields_stay_out_until_set() -> None:
    base = {
        "model": "m",
        "n_layers": 2,
        "hidden_size": 4,
        "target_layer": 1,
        "layers": [],
        "roles": [],
        "default_projection": 1.5,
        "default_position": {},
        "target": {},
    }
    assert "trait_space" not in SummaryRecord.model_validate(base).to_json()
    with_traits = SummaryRecord.model_validate({**base, "trait_space": {"layer": 1}}).to_json()
    assert with_traits["trait_space"] == {"layer": 1} and list(with_traits)[-1] == "trait_space"


def test_tensor_files_are_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """safetensors keeps header metadata in a hash map whose order changes per process: ours sorts it, so the axis
    (6 header fields) written by separate processes is byte-identical."""
    code = (
        "import sys, torch\n"
        "from personaxis.axis import Axis\n"
        "from personaxis.io.tensor_files import save_axis\n"
        "save_axis(Axis(torch.arange(8.0).reshape(2, 4) + 1, model='m', metadata={'b': 1, 'a': 2}), sys.argv[1])\n"
    )
    paths = [tmp_path / f"axis{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])
    header = json.loads(first[8 : 8 + int.from_bytes(first[:8], "little")])["__metadata__"]
    assert list(header) == sorted(header) and load_axis(paths[0]).metadata == {"b": 1, "a": 2}


def test_evaluation_records_read_and_write_the_published_results_unchanged(tmp_path: Path) -> None:
    from personaxis.evals.record import read_record as read_evaluation
    from personaxis.evals.record import write_record as write_evaluation

    published = [
        p
        for p in sorted((SRC.parents[1] / "results").rglob("*.json"))
        if '"personaxis.eval/1"' in p.read_text(encoding="utf-8")[:200]
    ]
    assert published, "the repository's results/ hold evaluation records"
    for path in published:
        record = read_evaluation(path)
        written = write_evaluation(record, tmp_path, stem=path.stem)
        assert written.read_bytes() == path.read_bytes(), path
    with pytest.raises(ValueError, match="damaged evaluation result"):
        (tmp_path / "bad.json").write_text(json.dumps({"format": "personaxis.eval/1", "eval": "x"}))
        read_evaluation(tmp_path / "bad.json")
