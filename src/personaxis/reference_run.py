"""Import the reference pipeline's outputs into a run directory, so ``vectors``, ``axis``, ``space`` and
``calibrate`` run on them.

The reference's output folder holds, per role (the file stem; ``default`` for the default condition):

- ``activations/<role>.pt``: ``{"<label>_p<k>_q<j>": tensor[n_layers, hidden]}``, the mean response activation of
  the answer to question ``j`` under system prompt ``k``;
- ``scores/<role>.json``: ``{"<label>_p<k>_q<j>": 0..3}``, the judge's scores (a key missing: not scored);
- ``vectors/<role>.pt``: ``{"vector": tensor[n_layers, hidden], "type": "pos_3" | "mean", "role": ...}``.

With activations, each (role, prompt) becomes a unit of our run (``activations/<role>/p<k>.safetensors`` and
``judgments/<role>/p<k>.json``); roles without a scores file are left out, as the reference's vector step leaves them
out. With vectors only, the role vectors are the run's (each a fully played vector) and only ``axis`` and
``space`` can follow. The recipe is the reference's (score 3 only, at least 50 rollouts) unless ``min_count`` says
otherwise. The reference keeps no residual norms: the imported run's axis has none (norm-relative α then needs
them measured on the model). Every ``.pt`` file is read with :func:`personaxis.interop.safe_torch_load` only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personaxis.interop import InteropError, safe_torch_load
from personaxis.io.records import JudgmentsRecord, VectorIndex
from personaxis.io.run_layout import RunLayout
from personaxis.io.tensor_files import save_unit_activations
from personaxis.pipeline import Pipeline
from personaxis.settings import RECIPE_MIN_COUNT, RunSettings
from personaxis.store import RunDirError, atomic_save_tensors, write_record
from personaxis.vectors import recipe_counts

IMPORT_KEY = "imported"
JUDGE_NAME = "reference (imported scores)"
_KEY = re.compile(r"^(?P<label>[A-Za-z0-9]+)_p(?P<prompt>\d+)_q(?P<question>\d+)$")


def _is_default(role: str) -> bool:
    return role == "default"


def _read_activations(path: Path) -> dict[tuple[int, int], Tensor]:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or not obj:
        raise InteropError(f"{path}: expected a non-empty dict of '<label>_p<k>_q<j>' keys to activation tensors")
    rows: dict[tuple[int, int], Tensor] = {}
    for key, value in obj.items():
        match = _KEY.match(str(key))
        if match is None:
            raise InteropError(f"{path}: key {key!r} is not of the form '<label>_p<k>_q<j>'")
        if not isinstance(value, Tensor) or value.dim() != 2:
            raise InteropError(f"{path}: {key!r} is not a tensor [n_layers, hidden]")
        where = (int(match["prompt"]), int(match["question"]))
        if where in rows:
            raise InteropError(f"{path}: two activations for prompt {where[0]}, question {where[1]}")
        rows[where] = value.detach().to(torch.float32)
    return rows


def _read_scores(path: Path) -> dict[tuple[int, int], int]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise InteropError(f"{path}: expected an object of '<label>_p<k>_q<j>': score")
    scores: dict[tuple[int, int], int] = {}
    for key, value in raw.items():
        match = _KEY.match(str(key))
        if match is None or not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3:
            raise InteropError(f"{path}: entry {key!r}: {value!r} is not a 0-3 score under a '<label>_p<k>_q<j>' key")
        scores[(int(match["prompt"]), int(match["question"]))] = value
    return scores


def _read_vector(path: Path) -> Tensor:
    obj = safe_torch_load(path)
    vector = obj.get("vector") if isinstance(obj, dict) else obj
    if not isinstance(vector, Tensor) or vector.dim() != 2:
        raise InteropError(f"{path}: expected a dict with 'vector' (a tensor [n_layers, hidden]) or such a tensor")
    return vector.detach().to(torch.float32)


def imported_layout(settings: RunSettings) -> dict[str, Any] | None:
    """What an imported run holds (``settings.extra["imported"]``), or ``None`` for a run made here."""
    value = settings.extra.get(IMPORT_KEY)
    return value if isinstance(value, dict) else None


def import_reference_run(
    source: str | Path,
    out: str | Path,
    *,
    model: str = "unknown",
    min_count: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a run directory at ``out`` from the reference pipeline's output folder ``source``; return what was
    imported (roles, rollouts, roles left out and why)."""
    say = log or (lambda message: None)
    src, root = Path(source), Path(out)
    acts_dir, scores_dir, vectors_dir = src / "activations", src / "scores", src / "vectors"
    if RunLayout(root).manifest.exists():
        raise RunDirError(f"{root} is already a run directory: import into a new --out")
    acts_files = sorted(acts_dir.glob("*.pt")) if acts_dir.is_dir() else []
    vector_files = sorted(vectors_dir.glob("*.pt")) if vectors_dir.is_dir() else []
    if not acts_files and not vector_files:
        raise InteropError(f"{src}: no activations/*.pt or vectors/*.pt (the reference pipeline's output folder)")
    left_out: dict[str, str] = {}
    shape: tuple[int, ...] | None = None

    def check_shape(tensor: Tensor, where: Path) -> None:
        nonlocal shape
        if shape is None:
            shape = tuple(tensor.shape)
        elif tuple(tensor.shape) != shape:
            raise InteropError(f"{where}: tensors of shape {list(tensor.shape)}, earlier files {list(shape)}")

    layout: dict[str, Any] = {
        "source": str(src),
        "roles": {},
        "default_prompts": 0,
        "question_ids": [],
        "vectors_only": not acts_files,
    }
    units: dict[tuple[str, int], tuple[list[int], Tensor, list[int | None]]] = {}
    question_ids: set[int] = set()
    if acts_files:
        if not any(_is_default(p.stem) for p in acts_files):
            raise InteropError(f"{acts_dir}: no default.pt (the default condition's activations)")
        for path in acts_files:
            role = path.stem
            rows = _read_activations(path)
            scores: dict[tuple[int, int], int] = {}
            if not _is_default(role):
                score_file = scores_dir / f"{role}.json"
                if not score_file.is_file():
                    left_out[role] = "no scores file"
                    continue
                scores = _read_scores(score_file)
            prompts = sorted({k for k, _ in rows})
            for k in prompts:
                questions = sorted(j for p, j in rows if p == k)
                stacked = torch.stack([rows[(k, j)] for j in questions])
                check_shape(stacked[0], path)
                units[(role, k)] = (questions, stacked, [scores.get((k, j)) for j in questions])
                question_ids.update(questions)
            n_prompts = max(prompts) + 1
            if _is_default(role):
                layout["default_prompts"] = n_prompts
            else:
                layout["roles"][role] = n_prompts
        layout["question_ids"] = sorted(question_ids)
    else:
        for path in vector_files:
            check_shape(_read_vector(path), path)
        roles = [p.stem for p in vector_files if not _is_default(p.stem)]
        if not any(_is_default(p.stem) for p in vector_files):
            raise InteropError(f"{vectors_dir}: no default.pt (the default vector)")
        layout["roles"] = {role: 0 for role in roles}
    if len(layout["roles"]) < 2:
        raise InteropError(f"{src}: a persona space needs at least 2 roles with scores; found {len(layout['roles'])}")
    assert shape is not None
    settings = RunSettings(
        model=model,
        preset="reference-import",
        n_roles=len(layout["roles"]),
        prompts_per_role=1,
        n_questions=1,
        persona_questions_only=False,
        n_traits=0,
        judge=JUDGE_NAME,
        vectors="reference",
        min_count=min_count if min_count is not None else RECIPE_MIN_COUNT["reference"],
        extra={IMPORT_KEY: layout},
    )
    pipeline = Pipeline(root, settings, show_progress=False)
    pipeline.store.open(pipeline.manifest())
    n_layers = shape[0]
    for unit in pipeline.units:
        questions, means, scores = units.get(
            (unit.condition.name, unit.prompt_index), ([], torch.zeros((0, *shape)), [])
        )
        ids = [f"{unit.key}/q{j}" for j in questions]
        save_unit_activations(pipeline.activation_path(unit), ids, means, torch.full((len(ids), n_layers), math.nan))
        if unit.condition.judged:
            write_record(
                pipeline.judgment_path(unit),
                JudgmentsRecord(judge=JUDGE_NAME, scores=dict(zip(ids, scores, strict=True))),
            )
    if layout["vectors_only"]:
        _write_vector_index(root, vector_files, settings.min_count)
    say(f"imported {len(layout['roles'])} roles from {src}" + (f"; left out {len(left_out)}" if left_out else ""))
    return {
        "roles": sorted(layout["roles"]),
        "n_units": len(pipeline.units),
        "left_out": left_out,
        "vectors_only": layout["vectors_only"],
        "shape": list(shape),
    }


def _write_vector_index(root: Path, files: list[Path], min_count: int) -> None:
    """The vectors stage's outputs from the reference's vectors/*.pt (a run with no activations)."""
    layout = RunLayout(root)
    entries = []
    n_layers = 0
    for path in files:
        vector = _read_vector(path)
        n_layers = vector.shape[0]
        if _is_default(path.stem):
            atomic_save_tensors(layout.default_vector, {"vector": vector}, {"n_rollouts": "0"})
            continue
        atomic_save_tensors(layout.role_vectors(path.stem), {"fully": vector, "used": vector.clone()})
        entries.append(
            {
                "name": path.stem,
                "category": "custom",
                "n_rollouts": 0,
                "judge_counts": {},
                "vector_source": "fully",
                "axis_vector": "fully",
                "space_vectors": ["fully"],
                "vectors": ["fully"],
            }
        )
    atomic_save_tensors(layout.residual_norms, {"norms": torch.full((n_layers,), math.nan)}, {"n_rollouts": "0"})
    index: dict[str, Any] = {
        "recipe": "reference",
        "min_count": min_count,
        "roles": entries,
        "traits": [],
        "default": {"n_rollouts": 0},
        "trait_details": {},
        "traits_dropped": [],
    }
    index.update(recipe_counts(entries))
    write_record(layout.vector_index, VectorIndex.model_validate(index))
