"""The run directory: one file per unit of work, written atomically, plus a manifest.

A file exists only once it is complete (written to a temporary name in the same folder, flushed, fsynced, then
renamed), so a run killed at any instant leaves finished units intact and no partial file that could be read as
complete. Resuming skips every unit whose file exists. The manifest pins the settings; resuming with other settings
is refused.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MANIFEST = "manifest.json"
_SAFE_NAME = re.compile(r"[^a-z0-9_.-]+")


class RunDirError(RuntimeError):
    """The run directory cannot be used (settings differ, disk full, no permission, …)."""


def slug(name: str) -> str:
    """A file-system-safe name for a role or condition."""
    cleaned = _SAFE_NAME.sub("-", name.strip().lower()).strip("-.")
    if not cleaned:
        raise ValueError(f"cannot make a file name from {name!r}")
    return cleaned


@contextmanager
def _io_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RunDirError(f"disk full while writing {path}; finished work is kept, free space and rerun to resume") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise RunDirError(f"no permission to write {path}: {exc.strerror}; finished work is kept") from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    with _io_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class RunStore:
    """Paths and read/write helpers for one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # manifest -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            return read_json(self.manifest_path)
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{self.manifest_path}: unreadable manifest ({exc.msg})") from None

    def open(self, manifest: dict[str, Any]) -> None:
        """Create the run or check that an existing one was made with the same settings."""
        existing = self.read_manifest()
        if existing is None:
            if self.root.exists() and not self.root.is_dir():
                raise RunDirError(f"{self.root} exists and is not a directory")
            with _io_errors(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.manifest_path, manifest)
            return
        keys = sorted(set(existing) | set(manifest))
        differing = [k for k in keys if k != "created" and existing.get(k) != manifest.get(k)]
        if differing:
            details = "; ".join(f"{k}: run has {existing.get(k)!r}, asked {manifest.get(k)!r}" for k in differing[:5])
            raise RunDirError(
                f"{self.root} was started with other settings ({details}). Resume with the same settings, "
                "or use a new --out directory."
            )

    # units ----------------------------------------------------------------------------------------------
    def unit_path(self, stage: str, condition: str, unit: str, suffix: str) -> Path:
        return self.root / stage / slug(condition) / f"{unit}{suffix}"

    def stage_path(self, name: str) -> Path:
        return self.root / name

    def is_done(self, path: Path) -> bool:
        return path.is_file()

    def save_torch_free(self, path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
        atomic_save_tensors(path, tensors, metadata)

    def clean_partials(self) -> int:
        """Remove temporary files left by a killed writer; return how many."""
        count = 0
        if self.root.exists():
            for tmp in self.root.rglob(".*.tmp"):
                try:
                    tmp.unlink()
                    count += 1
                except OSError:
                    pass
        return count


def stack_or_empty(rows: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    return torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=torch.float32)
