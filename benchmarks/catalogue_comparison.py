"""Controlled comparison: our catalogue against the reference's data folder, one factor swapped at a time.

    python benchmarks/catalogue_comparison.py --ref-data DIR --runs /tmp/cmp            # run every cell, then tabulate
    python benchmarks/catalogue_comparison.py --ref-data DIR --runs /tmp/cmp --cells ours,ref --table-only

``DIR`` is the reference repository's ``data/`` folder (github.com/safety-research/assistant-axis; fetch it
yourself, nothing of it ships here): role files in ``DIR/roles/instructions`` (or ``DIR/roles``) and questions in
``DIR/extraction_questions.jsonl`` (or ``DIR/questions.jsonl``). The reference's ``default.json`` is left out (a
roles folder without it is made under ``--runs`` when needed), so every cell uses our 5 default prompts.

Every cell is one ``personaxis run`` on the embedded model at equal sizes (31 roles, 2 prompts per role, 6 questions,
no traits), greedy, with judge ``none``; each is then judged ``offline`` on a copy of its rollouts and activations
(nothing is generated again). The cells swap one factor at a time: role set (our quick roles / a set that both
catalogues have), system prompts (ours / theirs), questions (our self-descriptive ones / their first 6), answer
length. Writes ``--md`` and ``--json`` (default ``results/catalogue_comparison.{md,json}``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
SIZES = ["--prompts", "2", "--questions", "6", "--traits", "0"]


@dataclass(frozen=True)
class Cell:
    name: str
    roles: str  # "quick" (our old quick list) or "common"
    prompts: str  # "ours" or "ref"
    questions: str  # "ours" (self-descriptive), a key of OUR_QUESTION_SETS, or "ref"
    tokens: int
    preset: str = "quick-openings"  # its question ids are "our questions" (self-descriptive); sizes are overridden
    note: str = ""


CELLS = (
    Cell("A-ours", "quick", "ours", "ours", 64, note="our catalogue (old quick roles)"),
    Cell("B-common-ourprompts", "common", "ours", "ours", 64, note="role set swapped"),
    Cell("C-common-refprompts", "common", "ref", "ours", 64, note="B with their system prompts"),
    Cell("D-ref", "common", "ref", "ref", 64, note="the reference's data (C with their questions)"),
    Cell("E-common-ourprompts-refq", "common", "ours", "ref", 64, note="B with their questions"),
    Cell("F-ours-8tok", "quick", "ours", "ours", 8, note="A with 8-token answers"),
    Cell("G-ref-8tok", "common", "ref", "ref", 8, note="D with 8-token answers"),
    Cell(
        "H-ours-generalq",
        "quick",
        "ours",
        "general",
        64,
        note="A with 6 of our catalogue's opinion, values, advice and task questions",
    ),
    Cell(
        "I-common-ourprompts-newq",
        "common",
        "ours",
        "new",
        64,
        note="B with 6 questions added to our catalogue for this comparison",
    ),
)
# Questions of cells H and I: ids in our catalogue, written to JSONL files under --runs (our data, not the reference's).
OUR_QUESTION_SETS = {"general": (54, 7, 228, 139, 4, 151), "new": (262, 263, 264, 265, 266, 267)}


def reference_paths(ref: Path, runs: Path) -> tuple[Path, Path]:
    """The reference roles folder (without ``default.json``) and questions file."""
    roles = ref / "roles" / "instructions" if (ref / "roles" / "instructions").is_dir() else ref / "roles"
    questions = ref / "extraction_questions.jsonl"
    if not questions.is_file():
        questions = ref / "questions.jsonl"
    if not roles.is_dir() or not questions.is_file():
        sys.exit(
            f"error: {ref} is not the reference's data folder (roles/instructions/*.json, extraction_questions.jsonl)"
        )
    if (roles / "default.json").exists():
        copy = runs / "ref-roles"
        if not copy.is_dir():
            copy.mkdir(parents=True)
            for path in roles.glob("*.json"):
                if path.stem != "default":
                    shutil.copy(path, copy / path.name)
        roles = copy
    return roles, questions


def our_questions_file(runs: Path, name: str) -> Path:
    """One of OUR_QUESTION_SETS from our catalogue, as a JSONL of ``{question, id}``."""
    from personaxis.data import load_questions

    path = runs / f"our-{name}-q.jsonl"
    by_id = {q.id: q for q in load_questions()}
    path.write_text(
        "".join(json.dumps({"question": by_id[i].question, "id": i}) + "\n" for i in OUR_QUESTION_SETS[name])
    )
    return path


def cell_command(cell: Cell, out: Path, ref_roles: Path, ref_questions: Path, judge: str) -> list[str]:
    # Our quick preset's roles before this comparison, or the same mix of categories with the 6 roles the reference
    # lacks replaced by ones both catalogues have (the quick preset's roles since).
    from personaxis.settings import OPENINGS_ROLES, QUICK_ROLES

    names = OPENINGS_ROLES if cell.roles == "quick" else QUICK_ROLES
    command = ["personaxis", "run", "--out", str(out), "--preset", cell.preset, *SIZES, "-q"]
    if cell.prompts == "ref":
        command += ["--roles-dir", str(ref_roles)]
        names = tuple(n.replace(" ", "_") for n in names)  # the reference names files with underscores
    for name in names:
        command += ["--role", name]
    if cell.questions == "ref":
        command += ["--questions-file", str(ref_questions)]
    elif cell.questions in OUR_QUESTION_SETS:
        command += ["--questions-file", str(our_questions_file(out.parent, cell.questions))]
    return command + ["--max-new-tokens", str(cell.tokens), "--judge", judge]


def run_cell(command: list[str], out: Path, log: Path) -> float | None:
    if (out / "summary.json").is_file():
        return None
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(
            [sys.executable, "-m", "personaxis.cli", *command[1:]], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
    if code != 0:
        sys.exit(f"error: {' '.join(command)} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def copy_for_offline(source: Path, target: Path) -> None:
    """Rollouts and activations of a judge-none run, for an offline-judged run that generates nothing again."""
    if target.exists():
        return
    target.mkdir(parents=True)
    for stage in ("rollouts", "activations"):
        shutil.copytree(source / stage, target / stage)


def judge_counts(run: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for path in (run / "judgments").rglob("*.json"):
        for score in json.loads(path.read_text())["scores"].values():
            counts["unscored" if score is None else str(score)] += 1
    return dict(sorted(counts.items()))


def cell_figures(run: Path) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    target = summary["target_layer"]
    default_pc1 = summary["default_position"]["pc1"]
    role_pc1 = {r["name"]: r["pc"][0] for r in summary["roles"]}
    ordered = sorted(role_pc1, key=role_pc1.get)
    below = sum(v < default_pc1 for v in role_pc1.values())
    return {
        "cos_pc1_axis": {layer["layer"]: layer["cos_pc1_axis"] for layer in summary["layers"]},
        "target_layer": target,
        "pc1_share": summary["layers"][target]["pc1_explained_variance"],
        "default_pc1_fraction": summary["default_position"]["pc1_fraction"],
        "default_pc1_percentile": round(100 * below / len(role_pc1), 1),
        "default_axis_fraction": summary["default_position"]["axis_fraction"],
        "roles_kept": summary["n_roles_kept"],
        "judge_counts": judge_counts(run),
        "role_end": ordered[:5],
        "assistant_end": ordered[::-1][:5],
    }


def table(rows: list[dict[str, Any]], layers: list[int]) -> str:
    head = [
        "cell",
        "roles",
        "prompts",
        "questions",
        "tokens",
        "judge",
        *[f"L{layer}" for layer in layers],
        "PC1 share",
        "default on PC1 (0..1)",
        "default pct",
        "roles kept",
        "judge 0/1/2/3",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        f = row["figures"]
        counts = f["judge_counts"]
        scored = "/".join(str(counts.get(str(s), 0)) for s in range(4)) if row["judge"] != "none" else "—"
        cells = [
            row["cell"],
            row["roles"],
            row["prompts"],
            row["questions"],
            str(row["tokens"]),
            row["judge"],
            *[f"{f['cos_pc1_axis'][layer]:.2f}" for layer in layers],
            f"{f['pc1_share']:.2f}",
            f"{f['default_pc1_fraction']:.2f}",
            f"{f['default_pc1_percentile']:.0f}",
            str(f["roles_kept"]),
            scored,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-data", type=Path, required=True, help="the reference repository's data/ folder")
    p.add_argument("--runs", type=Path, required=True, help="folder for the run directories (outside the repo)")
    p.add_argument(
        "--cells",
        default=",".join(c.name.split("-")[0] for c in CELLS),
        help="cells to run and tabulate, by letter or name (default: all)",
    )
    p.add_argument("--judges", default="none,offline", help="none, offline or both")
    p.add_argument("--table-only", action="store_true", help="tabulate runs already made; run nothing")
    p.add_argument(
        "--preset-run",
        type=Path,
        help="a run of `personaxis run --preset quick` to add below the table "
        "(with its timing.json of stage times, when there is one)",
    )
    p.add_argument("--md", type=Path, default=REPO / "results" / "catalogue_comparison.md")
    p.add_argument("--json", type=Path, default=REPO / "results" / "catalogue_comparison.json")
    args = p.parse_args(argv)
    ref_roles, ref_questions = reference_paths(args.ref_data, args.runs)
    wanted = args.cells.split(",")
    cells = [c for c in CELLS if c.name in wanted or c.name.split("-")[0] in wanted]
    rows = []
    args.runs.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        for judge in args.judges.split(","):
            out = args.runs / (cell.name if judge == "none" else f"{cell.name}-{judge}")
            command = cell_command(cell, out, ref_roles, ref_questions, judge)
            wall = None
            if not args.table_only:
                if judge != "none":
                    copy_for_offline(args.runs / cell.name, out)
                wall = run_cell(command, out, args.runs / f"{out.name}.log")
            if not (out / "summary.json").is_file():
                print(f"skipped {out.name}: no summary.json", file=sys.stderr)
                continue
            rows.append(
                {
                    "cell": cell.name,
                    "roles": cell.roles,
                    "prompts": cell.prompts,
                    "questions": cell.questions,
                    "tokens": cell.tokens,
                    "judge": judge,
                    "note": cell.note,
                    "command": " ".join(f"'{a}'" if " " in a else a for a in command),
                    "wall_s": None if wall is None else round(wall, 1),
                    "figures": cell_figures(out),
                }
            )
    if not rows:
        sys.exit("error: no cell has a summary.json yet")
    n_layers = len(rows[0]["figures"]["cos_pc1_axis"])
    layers = sorted({*range(0, n_layers, 3), rows[0]["figures"]["target_layer"]})
    preset = None
    if args.preset_run is not None:
        timing = args.preset_run / "timing.json"
        preset = {
            "run": str(args.preset_run),
            "figures": cell_figures(args.preset_run),
            "settings": json.loads((args.preset_run / "manifest.json").read_text())["settings"],
            "timing_s": json.loads(timing.read_text()) if timing.is_file() else None,
        }
        rows_preset = [
            {
                "cell": "quick preset",
                "roles": "quick",
                "prompts": "ours",
                "questions": "quick",
                "tokens": preset["settings"]["max_new_tokens"],
                "judge": preset["settings"]["judge"],
                "figures": preset["figures"],
            }
        ]
    args.json.write_text(json.dumps({"layers_shown": layers, "rows": rows, "quick_preset": preset}, indent=1) + "\n")
    findings = ""
    if args.md.is_file() and "## Findings" in (old := args.md.read_text()):  # hand-written; kept across reruns
        findings = (
            "## Findings" + old.split("## Findings", 1)[1].split("\n## ", 1)[0].split("\n| cell |")[0].rstrip() + "\n\n"
        )
    parts = [
        "# Catalogue comparison: our catalogue against the reference's data, one factor at a time",
        "",
        "cos(PC1, axis) per layer (every third layer and the target), PC1's share of variance and the default's "
        "position at the target layer (0..1 of the role range along PC1, and the percentile of roles it is "
        "beyond), on SmolLM2-135M-Instruct, greedy. 31 roles x 2 prompts x 6 questions, no traits; the "
        "default is our 5 prompts in every cell (the reference's default.json is left out). Made by "
        "`benchmarks/catalogue_comparison.py`.",
        "",
        findings + "## Cells",
        "",
        table(rows, layers),
        "",
    ]
    if preset is not None:
        parts += ["## The quick preset", "", table(rows_preset, layers), ""]
        if preset["timing_s"]:
            parts += ["Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in preset["timing_s"].items()), ""]
    parts += ["## Ends of PC1 (target layer)", ""]
    for row in rows:
        f = row["figures"]
        parts.append(
            f"- {row['cell']} / {row['judge']}: Assistant end {', '.join(f['assistant_end'])}; "
            f"role-playing end {', '.join(f['role_end'])}"
        )
    parts += ["", "## Commands", ""] + [f"- `{row['command']}`" for row in rows]
    args.md.write_text("\n".join(parts) + "\n")
    print(f"wrote {args.md} and {args.json}")


if __name__ == "__main__":
    main()
