"""Writing a run directory: one file per unit of work, written atomically, plus a manifest and a lock.

A file exists only once it is complete (written to a temporary name in the same folder, flushed, fsynced, then
renamed), so a run killed at any instant leaves finished units intact and no partial file that could be read as
complete. Resuming skips every unit whose file exists. The manifest pins the settings; resuming with other settings
is refused.

Where each file goes is :class:`personaxis.io.run_layout.RunLayout`'s business (role and condition names become
folder names through its ``slug``); what a JSON file holds is its record's (:mod:`personaxis.io.records`, read and
written with :func:`read_record` and :func:`write_record`). A run folder is locked while a
process writes to it (:meth:`RunStore.lock`): a second writer is refused with the holder's pid and host; the lock of
a killed process is released by the operating system, so the next run takes it over. Temporary files carry their
writer's host and pid, and start-up removes only those of writers that are gone.
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors.torch import save
from torch import Tensor

from personaxis.io.records import ManifestRecord, Record, RecordT
from personaxis.io.run_layout import RunLayout


class RunDirError(RuntimeError):
    """The run directory cannot be used (settings differ, disk full, no permission, …)."""


class DamagedFileError(RunDirError):
    """A file of the run cannot be read as its record (``reason`` says why)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: damaged file ({reason})")
        self.path, self.reason = path, reason


@contextmanager
def _io_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RunDirError(
                f"disk full while writing {path}; finished work is kept, free space and rerun to resume"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise RunDirError(f"no permission to write {path}: {exc.strerror}; finished work is kept") from None
        raise


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TMP_OWNER = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
# Inside ``all_or_nothing()``: the files written, each with the backup of the file it replaced (or None), and the
# folders created for them.
_TRANSACTION: contextvars.ContextVar[tuple[list[tuple[Path, Path | None]], list[Path]] | None] = contextvars.ContextVar(
    "_TRANSACTION", default=None
)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    transaction = _TRANSACTION.get()
    with _io_errors(path):
        if transaction is not None:
            transaction[1].extend(reversed([d for d in (path.parent, *path.parent.parents) if not d.exists()]))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if transaction is not None:
                backup = None
                if path.is_file():
                    backup = Path(tempfile.mktemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
                    os.link(path, backup)
                transaction[0].append((path, backup))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Files written with :func:`atomic_write_bytes` inside this block are all kept, or — when the block raises —
    none: new files are removed and replaced files get their old content back."""
    if _TRANSACTION.get() is not None:  # nested: the outer block decides
        yield
        return
    written: list[tuple[Path, Path | None]] = []
    created: list[Path] = []
    token = _TRANSACTION.set((written, created))
    try:
        yield
    except BaseException:
        for path, backup in reversed(written):
            if backup is not None:
                os.replace(backup, path)
            else:
                path.unlink(missing_ok=True)
        for folder in reversed(created):  # deepest first; only folders this block made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    else:
        for _, backup in written:
            if backup is not None:
                backup.unlink(missing_ok=True)
    finally:
        _TRANSACTION.reset(token)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_record(path: str | Path, record: type[RecordT]) -> RecordT:
    """Read and validate one JSON file of a run (:mod:`personaxis.io.records`); a file that does not fit its record
    is reported as damaged (``RunDirError``)."""
    path = Path(path)
    try:
        return record.model_validate(read_json(path))
    except ValidationError as exc:
        raise DamagedFileError(path, _what_does_not_fit(exc)) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DamagedFileError(path, f"{type(exc).__name__}: {exc}") from None


def _what_does_not_fit(exc: ValidationError) -> str:
    """``rollouts.0.answer lacks its 'answer'`` or ``scores.a: Input should be a valid integer`` (and how many more)."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        said = f"{where} lacks its {first['loc'][-1]!r}"
    else:
        said = f"{where}: {first['msg']}"
    return said + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def write_record(path: str | Path, record: Record) -> None:
    """Write one JSON file of a run atomically, exactly as :func:`atomic_write_json` writes its JSON object."""
    atomic_write_json(Path(path), record.to_json())


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata in every process.

    The safetensors library keeps the metadata in a hash map whose order changes from one process to the next, so
    two runs wrote the same header fields in different orders; here the metadata fields are sorted (the header keeps
    its length and padding, the tensor data is untouched)."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if len(header.get("__metadata__") or {}) < 2:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length or json.loads(text) != json.loads(data[8 : 8 + length]):  # pragma: no cover - defensive
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length :]


def atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class RunStore:
    """Paths and read/write helpers for one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.layout = RunLayout(root)
        self.root = self.layout.root

    # manifest -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.layout.manifest

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = read_json(self.manifest_path)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise RunDirError(f"{self.manifest_path}: unreadable manifest ({why})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings", {}), dict):
            raise RunDirError(
                f"{self.manifest_path}: not a personaxis manifest (expected an object with a 'settings' "
                "object); use a new --out directory"
            )
        try:
            ManifestRecord.model_validate(manifest)
        except ValidationError as exc:
            raise RunDirError(
                f"{self.manifest_path}: not a personaxis manifest ({exc.error_count()} field(s) do not fit); "
                "use a new --out directory"
            ) from None
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_record(self.manifest_path, ManifestRecord.model_validate(manifest))

    # lock -----------------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.layout.lock

    def acquire_lock(self) -> None:
        """Hold the run folder for this process (released by :meth:`release_lock`, or by the operating system when
        the process ends). A second writer gets a ``RunDirError`` naming the holder."""
        if getattr(self, "_lock_fd", None) is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            self._lock_fd: int | None = None
            return
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"{self.root} exists and is not a directory")
        with _io_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        while True:
            with _io_errors(self.lock_path):
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise RunDirError(
                    f"{self.root} is in use by {holder}; wait for it to finish, or use another --out directory"
                ) from None
            try:  # the holder before us may have removed the file after we opened it: lock the one on disk
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        self._lock_fd = fd

    def release_lock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is None:
            return
        self._lock_fd = None
        self.lock_path.unlink(missing_ok=True)
        os.close(fd)

    @contextmanager
    def lock(self) -> Iterator[None]:
        self.acquire_lock()
        try:
            yield
        finally:
            self.release_lock()

    def open(self, manifest: dict[str, Any]) -> None:
        """Create the run or check that an existing one was made with the same settings."""
        existing = self.read_manifest()
        if existing is None:
            if self.root.exists() and not self.root.is_dir():
                raise RunDirError(f"{self.root} exists and is not a directory")
            with _io_errors(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
            self.write_manifest(manifest)
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
    def clean_partials(self) -> int:
        """Remove temporary files that writers of this host left when they were killed (their pid is gone); keep
        every other file, including a live writer's file in progress. Return how many were removed."""
        count = 0
        if self.root.exists():
            for tmp in self.root.rglob(".*.tmp"):
                owner = _TMP_OWNER.search(tmp.name)
                if owner is None or owner["host"] != _HOST or _alive(int(owner["pid"])):
                    continue
                try:
                    tmp.unlink()
                    count += 1
                except OSError:
                    pass
        return count


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no write in progress while it starts up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
