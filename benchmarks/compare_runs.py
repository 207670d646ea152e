"""Compare two run directories file by file: the same files, byte-identical, except the fields that name when or
where a run was made.

    python benchmarks/compare_runs.py RUN_A RUN_B        # exit 0 when the runs match, 1 (with the differences) if not

Used to check that a restructuring leaves the quick preset's outputs unchanged: run `personaxis run --out RUN_A` at
the commit before and `--out RUN_B` at the commit after (same preset, same machine, same ``OMP_NUM_THREADS``), then
compare. Every file must be byte-identical, except these fields, which legitimately differ between two runs:

- ``manifest.json`` → ``created`` (the time the run started);
- a capping config's metadata → ``run_dir`` (the run's path; written by `personaxis calibrate`, not by `run`).

Files that are not read as the run's outputs are skipped: the lock file and temporary files of killed writers.

One more difference is reported apart and does not fail the comparison: a safetensors file whose tensors and header
fields are equal but whose header lists the fields in another order. Before personaxis sorted them
(``store.safetensors_bytes``), the order came from the safetensors library's hash map and changed from one process
to the next, so even two runs of one commit differed there (``axis.safetensors``, whose header has six fields).

Two runs match only when both were made with a fixed thread count (``PERSONAXIS_THREADS=1``): otherwise
``personaxis.threads`` changes the thread count with the machine's load while generating, and the float sums of
the activations (and the role vectors and axis made from them) differ in their last bits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
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


def _tensor_key(tensor: Any) -> tuple[str, tuple[int, ...], bytes]:
    return str(tensor.dtype), tuple(tensor.shape), tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _safetensors_without(
    path: Path, fields: tuple[str, ...]
) -> tuple[dict[str, object], dict[str, tuple[str, tuple[int, ...], bytes]]]:
    with safe_open(str(path), framework="pt") as handle:
        header: dict[str, object] = dict(handle.metadata() or {})
        tensors = {k: _tensor_key(handle.get_tensor(k)) for k in handle.keys()}
    for key, value in list(header.items()):
        try:
            header[key] = _without(json.loads(str(value)), fields)
        except json.JSONDecodeError:
            pass
    return header, tensors


def compare_runs(a: str | Path, b: str | Path, reordered: list[str] | None = None) -> list[str]:
    """The differences between run directories ``a`` and ``b`` (empty: they match). Safetensors files that differ
    only in the order of their header fields are appended to ``reordered`` instead."""
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
            if _json_matches(data_a, data_b, fields):
                continue
        elif name.endswith(".safetensors"):
            if _safetensors_without(a / name, fields or ()) == _safetensors_without(b / name, fields or ()):
                if not fields and reordered is not None:
                    reordered.append(name)
                continue
        problems.append(f"differs: {name}")
    return problems


def _dump(obj: object) -> bytes:
    """A JSON file as personaxis writes it (``store.atomic_write_json``)."""
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _json_matches(data_a: bytes, data_b: bytes, fields: tuple[str, ...]) -> bool:
    """Whether ``b`` is ``a`` byte for byte once ``b``'s top-level ``fields`` take ``a``'s values."""
    obj_a, obj_b = json.loads(data_a), json.loads(data_b)
    if not (isinstance(obj_a, dict) and isinstance(obj_b, dict)) or _dump(obj_b) != data_b:
        return False
    patched = {k: (obj_a[k] if k in fields and k in obj_a else v) for k, v in obj_b.items()}
    return _dump(patched) == data_a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    reordered: list[str] = []
    problems = compare_runs(args.run_a, args.run_b, reordered)
    for line in problems:
        print(line)
    for name in reordered:
        print(f"same content, header fields in another order: {name}")
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
