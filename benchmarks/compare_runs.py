"""Compare two run directories file by file: the same files, byte-identical, except the fields that name when or
where a run was made.

    python benchmarks/compare_runs.py RUN_A RUN_B        # exit 0 when the runs match, 1 (with the differences) if not

Used to check that a restructuring leaves the quick preset's outputs unchanged: run `personaxis run --out RUN_A` at
the commit before and `--out RUN_B` at the commit after (same preset, same machine, same ``OMP_NUM_THREADS``), then
compare. Every file must be byte-identical, except these fields, which legitimately differ between two runs:

- ``manifest.json`` → ``created`` (the time the run started);
- a capping config's metadata → ``run_dir`` (the run's path; written by `personaxis calibrate`, not by `run`).

Files that are not read as the run's outputs are skipped: the lock file and temporary files of killed writers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open

# (file name, field) pairs that may differ: JSON fields, or safetensors metadata fields (a JSON-encoded ``config``
# or ``metadata`` header holds them).
IGNORED_FIELDS: dict[str, tuple[str, ...]] = {
    "manifest.json": ("created",),
    "capping.safetensors": ("run_dir",),
}
SKIPPED = (".personaxis.lock",)


def _files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name not in SKIPPED and not p.name.endswith(".tmp")
    }


def _without(obj: object, fields: tuple[str, ...]) -> object:
    if isinstance(obj, dict):
        return {k: _without(v, fields) for k, v in obj.items() if k not in fields}
    if isinstance(obj, list):
        return [_without(v, fields) for v in obj]
    return obj


def _safetensors_without(path: Path, fields: tuple[str, ...]) -> tuple[dict[str, object], dict[str, bytes]]:
    with safe_open(str(path), framework="pt") as handle:
        header: dict[str, object] = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k).numpy().tobytes() for k in handle.keys()}
    for key, value in list(header.items()):
        try:
            header[key] = _without(json.loads(str(value)), fields)
        except json.JSONDecodeError:
            pass
    return header, tensors


def compare_runs(a: str | Path, b: str | Path) -> list[str]:
    """The differences between run directories ``a`` and ``b`` (empty: they match)."""
    a, b = Path(a), Path(b)
    files_a, files_b = _files(a), _files(b)
    problems = [f"only in {a}: {name}" for name in sorted(files_a - files_b)]
    problems += [f"only in {b}: {name}" for name in sorted(files_b - files_a)]
    for name in sorted(files_a & files_b):
        data_a, data_b = (a / name).read_bytes(), (b / name).read_bytes()
        if data_a == data_b:
            continue
        fields = IGNORED_FIELDS.get(Path(name).name)
        if fields and name.endswith(".json"):
            same = _without(json.loads(data_a), fields) == _without(json.loads(data_b), fields)
            # The rest of the file must still be written the same way: same bytes once the fields are dropped.
            if same and _redump(data_a, fields) == _redump(data_b, fields):
                continue
        elif fields and name.endswith(".safetensors"):
            if _safetensors_without(a / name, fields) == _safetensors_without(b / name, fields):
                continue
        problems.append(f"differs: {name}")
    return problems


def _redump(data: bytes, fields: tuple[str, ...]) -> str:
    return json.dumps(_without(json.loads(data), fields), indent=1, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    problems = compare_runs(args.run_a, args.run_b)
    for line in problems:
        print(line)
    n = len(_files(args.run_a))
    print(
        f"{n} files in {args.run_a}: "
        + (
            "identical (ignoring the fields that name when or where)"
            if not problems
            else f"{len(problems)} difference(s)"
        )
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
