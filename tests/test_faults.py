"""Faults: SIGKILL at random points of every pipeline stage, disk-full and permission errors on the run directory, and
an OpenAI-compatible judge endpoint that misbehaves — nothing lost, nothing duplicated, nothing partial read as whole.

The SIGKILL runs are real subprocesses of ``python -m personaxis.cli run`` on a tiny random model folder. Each case
kills the same run directory three times, at seeded random points (a count of the stage's files and a delay after
it), resumes it each time, and checks after every kill that whatever exists reads as complete, and at the end that
the outputs equal an uninterrupted run's. The seven cases kill 21 times in all, on a tiny model, and all run in CI
(about half a minute each on two free cores). A second writer on the same run folder is refused while the first
holds its lock, and the lock of a killed writer is taken over.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_judges_http import FAST, SECRET, FakeOpenAI, judge_for, serving
from test_judges_http import items as judge_items
from tiny import tiny_model
from typer.testing import CliRunner

from personaxis.cli import app
from personaxis.io.tensor_files import load_axis
from personaxis.models import LoadedModel
from personaxis.pipeline import STAGES, Pipeline, open_existing
from personaxis.settings import RunSettings
from personaxis.store import RunDirError

N_ROLES = 6
N_QUESTIONS = 2
N_UNITS = N_ROLES + 5 + 2  # roles x 1 prompt, default x 5 prompts, 1 trait x 2 sides
CLI_OPTIONS = [
    "--preset",
    "tiny",
    "--judge",
    "none",
    "--roles",
    str(N_ROLES),
    "--questions",
    str(N_QUESTIONS),
    "--traits",
    "1",
    "--max-new-tokens",
    "8",
    "--batch-size",
    "4",
    "-q",
]
RUN_TIMEOUT_S = 600
PNG_END = b"IEND\xaeB`\x82"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a local model folder, loadable by `personaxis run --model`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _cli(out: Path, model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "personaxis.cli", "run", "--out", str(out), "--model", str(model_dir), *CLI_OPTIONS]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The same run, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(_cli(out, tiny_model_dir), check=True, capture_output=True, env=_env(), timeout=RUN_TIMEOUT_S)
    return out


# ------------------------------------------------------------------------------------------------ what "complete" means
def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _hidden(root: Path) -> list[Path]:
    """Temporary files of a writer (``.name.XXXX.tmp``) or anything else hidden."""
    return [p for p in root.rglob(".*")]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)}


def check_everything_present_is_complete(root: Path, n_questions: int = N_QUESTIONS) -> None:
    """Every visible file of the run reads as whole: JSON parses, safetensors load, units hold all their rollouts."""
    for path in _files(root):
        if path.name.startswith("."):
            continue  # a writer's temporary file: never read (removed when the run resumes)
        rel = path.relative_to(root)
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if rel.parts[0] == "rollouts":
                ids = [r["id"] for r in data["rollouts"]]
                assert len(ids) == n_questions == len(set(ids)), rel
            if rel.parts[0] == "judgments":
                rollouts = json.loads((root / "rollouts" / rel.relative_to("judgments")).read_text())["rollouts"]
                assert list(data["scores"]) == [r["id"] for r in rollouts], rel
        elif path.suffix == ".safetensors":
            tensors = load_file(str(path))
            if rel.parts[0] == "activations":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    ids = json.loads(handle.metadata()["ids"])
                unit = root / "rollouts" / rel.relative_to("activations").with_suffix(".json")
                expected = [r["id"] for r in json.loads(unit.read_text())["rollouts"] if r["answer"].strip()]
                assert ids == expected and tensors["means"].shape[0] == len(ids), rel
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and data.endswith(PNG_END), rel
        elif path.suffix == ".html":
            assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), rel
    if (root / "axis.safetensors").exists():
        load_axis(root / "axis.safetensors")


def _rollouts(root: Path) -> dict[str, Any]:
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted((root / "rollouts").rglob("*.json"))}


def _close(a: Any, b: Any, tol: float = 1e-5, where: str = "") -> None:
    """Equal JSON values, floats within ``tol``."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), where
        assert abs(a - b) <= tol, f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _close(a[key], b[key], tol, f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, tol, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_equals_reference(out: Path, reference: Path) -> None:
    """The resumed run's outputs equal the uninterrupted run's (timestamps aside)."""
    assert not _hidden(out), f"left-over temporary files: {_hidden(out)}"
    assert sorted(_snapshot(out)) == sorted(_snapshot(reference))
    ours, theirs = _rollouts(out), _rollouts(reference)
    assert ours == theirs  # identical text, ids, order
    ids = [r["id"] for unit in ours.values() for r in unit["rollouts"]]
    assert len(ids) == len(set(ids)) == N_UNITS * N_QUESTIONS  # none lost, none duplicated
    for path in sorted((reference / "activations").rglob("*.safetensors")):
        rel = path.relative_to(reference)
        mine, ref = load_file(str(out / rel)), load_file(str(path))
        torch.testing.assert_close(mine["means"], ref["means"], atol=1e-6, rtol=0)
        torch.testing.assert_close(mine["norms"], ref["norms"], atol=1e-6, rtol=0)
    for path in sorted((reference / "judgments").rglob("*.json")):
        assert json.loads((out / path.relative_to(reference)).read_text()) == json.loads(path.read_text())
    a, b = load_axis(out / "axis.safetensors"), load_axis(reference / "axis.safetensors")
    torch.testing.assert_close(a.vectors, b.vectors, atol=1e-6, rtol=0)
    assert a.target_layer == b.target_layer and a.model == b.model and a.metadata == b.metadata
    _close(
        json.loads((out / "vectors" / "index.json").read_text()),
        json.loads((reference / "vectors" / "index.json").read_text()),
    )
    _close(
        json.loads((out / "summary.json").read_text()),
        json.loads((reference / "summary.json").read_text()),
        where="summary",
    )
    manifest, ref_manifest = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    manifest.pop("created")
    ref_manifest.pop("created")
    assert manifest == ref_manifest


# ------------------------------------------------------------------------------------------------ SIGKILL
# Per stage: the files that show the stage has begun (all of the previous stage's), the files it writes, how many of
# them there are, and the longest extra delay before the kill.
STAGE_FILES: dict[str, tuple[str | None, int, str, int, float]] = {
    "generate": ("manifest.json", 1, "rollouts/*/*.json", N_UNITS, 3.0),
    "extract": ("rollouts/*/*.json", N_UNITS, "activations/*/*.safetensors", N_UNITS, 0.05),
    "judge": ("activations/*/*.safetensors", N_UNITS, "judgments/*/*.json", N_ROLES, 0.02),
    "vectors": ("judgments/*/*.json", N_ROLES, "vectors/**/*.safetensors", N_ROLES + 3, 0.02),
    "axis": ("vectors/index.json", 1, "axis.safetensors", 1, 0.05),
    "space": ("axis.safetensors", 1, "figures/*.png", 4, 2.0),
}
# Seven cases of three kills each, every stage at least three times.
CASES: list[tuple[str, str, str]] = [
    ("generate", "extract", "space"),
    ("generate", "judge", "axis"),
    ("extract", "vectors", "space"),
    ("generate", "vectors", "axis"),
    ("extract", "judge", "space"),
    ("judge", "axis", "space"),
    ("generate", "extract", "vectors"),
]


@dataclass(frozen=True)
class KillPoint:
    stage: str
    after_files: int  # kill once this many of the stage's files exist …
    delay_s: float  # … and this long after that

    def ready(self, out: Path) -> bool:
        started, n_started, writes, _, _ = STAGE_FILES[self.stage]
        if started is None or len(list(out.glob(started))) < n_started:
            return False
        return len(list(out.glob(writes))) >= self.after_files


def kill_points(stages: tuple[str, ...], seed: int) -> list[KillPoint]:
    rng = random.Random(seed)
    points = []
    for stage in stages:
        _, _, _, total, max_delay = STAGE_FILES[stage]
        after = rng.randrange(0, max(1, total - 1))
        # Early in a stage, wait up to the stage's longest delay (model loading, figure drawing); within its writes,
        # only a few milliseconds.
        delay = rng.uniform(0, max_delay if after == 0 else 0.01)
        points.append(KillPoint(stage, after, round(delay, 4)))
    return points


def run_and_kill(cmd: list[str], out: Path, point: KillPoint) -> bool:
    """Start the run, SIGKILL it at ``point``; True if it was still running when killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and not point.ready(out):
            if time.monotonic() > deadline:
                raise AssertionError(f"the run never reached {point}")
            time.sleep(0.003)
        if point.delay_s:
            time.sleep(point.delay_s)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=60)
    if not alive:
        assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    return alive


def _kill_case(case: int, out: Path, model_dir: Path, reference: Path) -> None:
    cmd = _cli(out, model_dir)
    points = kill_points(CASES[case], seed=1000 + case)
    kills = 0
    for point in points:
        kills += run_and_kill(cmd, out, point)
        check_everything_present_is_complete(out)
    resumed = subprocess.run(cmd, capture_output=True, env=_env(), timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr.decode(errors="replace")[-3000:]
    check_everything_present_is_complete(out)
    check_equals_reference(out, reference)
    assert kills == len(points), f"only {kills} of {points} found the run still running"


def test_sigkill_three_times_then_resume_equals_uninterrupted(
    tmp_path: Path, tiny_model_dir: Path, reference_run: Path
) -> None:
    _kill_case(0, tmp_path / "run", tiny_model_dir, reference_run)


@pytest.mark.parametrize("case", range(1, len(CASES)))
def test_sigkill_at_random_points_of_every_stage(
    tmp_path: Path, tiny_model_dir: Path, reference_run: Path, case: int
) -> None:
    _kill_case(case, tmp_path / "run", tiny_model_dir, reference_run)


def test_kill_plan_covers_every_stage_at_least_20_times() -> None:
    assert sum(len(c) for c in CASES) >= 20
    assert Counter(s for c in CASES for s in c).keys() == set(STAGES)
    assert all(list(c) == sorted(c, key=STAGES.index) for c in CASES)
    assert kill_points(CASES[0], 1000) == kill_points(CASES[0], 1000)  # seeded per case


# ------------------------------------------------------------------------------------------------ concurrent writers
def test_a_second_writer_is_refused_while_the_first_runs_and_the_first_finishes_intact(
    tmp_path: Path, tiny_model_dir: Path, reference_run: Path
) -> None:
    out = tmp_path / "run"
    cmd = _cli(out, tiny_model_dir)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (out / ".personaxis.lock").is_file() or not (out / "manifest.json").is_file():
            assert first.poll() is None, "the first run ended before the second could start"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        second = subprocess.run(cmd, capture_output=True, env=_env(), timeout=RUN_TIMEOUT_S)
        first_alive = first.poll() is None
        _, stderr = first.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr.decode(errors="replace")[-3000:]
    if first_alive:  # the second started while the first held the folder: refused, naming the holder
        errors = [line for line in second.stderr.decode().splitlines() if line.startswith("error: ")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr.decode()[-2000:]
        assert re.search(rf"is in use by pid {first.pid} on host \S+; wait for it to finish", errors[0]), errors[0]
    check_equals_reference(out, reference_run)  # the first run's outputs, untouched by the second


def test_run_folder_lock_in_process_names_the_holder_and_is_released(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    out = tmp_path / "run"
    holder = Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False)
    holder.open()
    try:
        with pytest.raises(RunDirError, match=rf"is in use by pid {os.getpid()} on host .*; wait for it to finish"):
            Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False).run(["generate"])
    finally:
        holder.store.release_lock()
    assert not (out / ".personaxis.lock").exists()
    Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False).run(["generate"])  # free again
    assert not (out / ".personaxis.lock").exists()


def test_stale_lock_and_temporary_files_of_a_killed_writer_are_taken_over(
    tmp_path: Path, tiny_llama: LoadedModel
) -> None:
    """A writer killed while holding the folder leaves its lock file and temporary files: the next run takes the
    lock (the operating system released it) and removes the dead writer's temporary files, but never a live
    writer's file in progress or a file that is not one of ours."""
    from personaxis.store import _HOST

    out = tmp_path / "run"
    Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False).run(["generate"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (out / ".personaxis.lock").write_text(f"pid {dead.pid} on host {_HOST}")
        unit = out / "rollouts" / "default"
        stale = unit / f".p9.json.{_HOST}-{dead.pid}.abcd1234.tmp"
        in_progress = unit / f".p8.json.{_HOST}-{live.pid}.efgh5678.tmp"
        foreign = unit / ".notes.tmp"
        other_host = unit / f".p7.json.elsewhere-{dead.pid}.ijkl9012.tmp"
        for path in (stale, in_progress, foreign, other_host):
            path.write_text("partial")
        logs: list[str] = []
        Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False, log=logs.append).run(["generate"])
        assert not stale.exists()
        assert in_progress.exists() and foreign.exists() and other_host.exists()
        assert any("removed 1 partial file" in line for line in logs), logs
        assert not (out / ".personaxis.lock").exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------------ disk full, no permission
INPROC_UNITS = 3 + 5 + 2  # 3 roles, default x 5, 1 trait x 2


def _inproc_settings() -> RunSettings:
    return RunSettings.from_preset(
        "tiny",
        model="tiny",
        judge="none",
        n_roles=3,
        n_questions=2,
        n_traits=1,
        max_new_tokens=6,
        extra={"batch_size": 4},
    )


class FailingCall:
    """Wraps ``os.replace`` (or ``os.fsync``): the ``fail_at``-th call that writes under ``root`` raises ``OSError``."""

    def __init__(self, real: Callable[..., Any], root: Path, fail_at: int | None, err: int) -> None:
        self.real, self.root, self.fail_at, self.err = real, root, fail_at, err
        self.every_call = real is os.fsync  # fsync gets a descriptor, not a path: count every call
        self.calls: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = str(args[1]) if len(args) > 1 else ""
        if self.every_call or target.startswith(str(self.root)):
            self.calls.append(target)
            if len(self.calls) == self.fail_at:
                raise OSError(self.err, os.strerror(self.err), target or None)
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def inproc_reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel) -> tuple[Path, list[str]]:
    """An uninterrupted in-process run and the files it renamed into place, in order."""
    out = tmp_path_factory.mktemp("inproc") / "run"
    recorder = FailingCall(os.replace, out, None, 0)
    os.replace = recorder  # type: ignore[assignment]
    try:
        Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False).run()
    finally:
        os.replace = recorder.real
    return out, [str(Path(c).relative_to(out)) for c in recorder.calls]


def _first_write(calls: list[str], prefix: str, offset: int = 0) -> int:
    """1-based index of the ``offset``-th write whose path starts with ``prefix``."""
    matching = [i for i, c in enumerate(calls, start=1) if c.startswith(prefix)]
    return matching[min(offset, len(matching) - 1)]


def check_inproc_equals_reference(out: Path, reference: Path) -> None:
    assert not _hidden(out)
    assert sorted(_snapshot(out)) == sorted(_snapshot(reference))
    assert _rollouts(out) == _rollouts(reference)
    for path in sorted((reference / "activations").rglob("*.safetensors")):
        torch.testing.assert_close(
            load_file(str(out / path.relative_to(reference)))["means"], load_file(str(path))["means"], atol=1e-6, rtol=0
        )
    torch.testing.assert_close(
        load_axis(out / "axis.safetensors").vectors,
        load_axis(reference / "axis.safetensors").vectors,
        atol=1e-6,
        rtol=0,
    )
    _close(json.loads((out / "summary.json").read_text()), json.loads((reference / "summary.json").read_text()))


UNIT_DIRS = ("rollouts", "activations", "judgments")


def _kept_before(calls: list[str], fail_at: int) -> list[str]:
    """The writes before the failed one that a failure keeps: every unit and stage output, less the earlier writes
    of the failed stage when that stage writes all or nothing (vectors; space: figures, summary and report)."""
    earlier = calls[: fail_at - 1]
    if calls[fail_at - 1].startswith("vectors/"):
        return earlier[: _first_write(calls, "vectors/") - 1]
    axis_at = calls.index("axis.safetensors") + 1
    if fail_at > axis_at:
        return earlier[:axis_at]
    return earlier


@pytest.mark.parametrize(
    ("where", "offset", "err", "message"),
    [
        ("manifest.json", 0, errno.EACCES, "no permission"),
        ("rollouts/", 5, errno.ENOSPC, "disk full"),
        ("activations/", 3, errno.ENOSPC, "disk full"),
        ("judgments/", 1, errno.EACCES, "no permission"),
        ("vectors/", 2, errno.ENOSPC, "disk full"),
        ("axis.safetensors", 0, errno.EROFS, "no permission"),
        ("figures/", 1, errno.ENOSPC, "disk full"),
        ("report.html", 0, errno.ENOSPC, "disk full"),
    ],
)
def test_disk_full_or_no_permission_stops_clearly_and_loses_nothing(
    tmp_path: Path,
    tiny_llama: LoadedModel,
    inproc_reference: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    offset: int,
    err: int,
    message: str,
) -> None:
    reference, calls = inproc_reference
    out = tmp_path / "run"
    fail_at = _first_write(calls, where, offset)
    failing = FailingCall(os.replace, out, fail_at, err)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(RunDirError, match=message) as info:
        Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False).run()
    assert str(out / calls[fail_at - 1]) in str(info.value) and "finished work is kept" in str(info.value)
    monkeypatch.setattr(os, "replace", failing.real)
    assert not _hidden(out)  # the temporary file of the failed write is gone
    check_everything_present_is_complete(out)
    before = _snapshot(out)
    assert sorted(before) == sorted(_kept_before(calls, fail_at))  # every earlier write is there (stages: see below)
    Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False).run()
    after = _snapshot(out)
    kept = {k: v for k, v in before.items() if k.split("/")[0] in UNIT_DIRS or k == "manifest.json"}
    assert {k: after[k] for k in kept} == kept  # finished units untouched by the resume
    check_inproc_equals_reference(out, reference)


def test_disk_full_on_the_write_itself_keeps_no_partial_file(
    tmp_path: Path, tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    failing = FailingCall(os.fsync, out, 4, errno.ENOSPC)  # the 4th file's data never reaches the disk
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(RunDirError, match="disk full while writing"):
        Pipeline(out, _inproc_settings(), lm=tiny_llama, show_progress=False).run(["generate"])
    monkeypatch.setattr(os, "fsync", failing.real)
    assert not _hidden(out)
    assert len(list((out / "rollouts").rglob("*.json"))) == 2  # manifest, then two units; the third failed
    check_everything_present_is_complete(out)
    assert open_existing(out, lm=tiny_llama, show_progress=False).run(["generate"])["generate"] == INPROC_UNITS - 2


def test_run_dir_that_cannot_be_created_is_a_clear_error(
    tmp_path: Path, tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkdir = Path.mkdir

    def no_permission(self: Path, *args: Any, **kwargs: Any) -> None:
        if str(self).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_permission)
    with pytest.raises(RunDirError, match="no permission to write .*Permission denied"):
        Pipeline(tmp_path / "run", _inproc_settings(), lm=tiny_llama, show_progress=False).run()
    assert list(tmp_path.iterdir()) == []


def test_cli_disk_full_exits_2_with_an_error_line_and_resumes(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--model", str(tiny_model_dir), *CLI_OPTIONS]
    failing = FailingCall(os.replace, out, 9, errno.ENOSPC)
    monkeypatch.setattr(os, "replace", failing)
    result = CliRunner().invoke(app, args)
    monkeypatch.setattr(os, "replace", failing.real)
    assert result.exit_code == 2, result.output
    assert re.search(
        r"^error: disk full while writing .*; finished work is kept, free space and rerun to resume$",
        result.output,
        re.M,
    ), result.output
    assert "Traceback" not in result.output
    written = _snapshot(out)
    assert len(written) == 8 and not _hidden(out)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {k: _snapshot(out)[k] for k in written} == written
    check_everything_present_is_complete(out)


# ------------------------------------------------------------------------------------------------ judge endpoint faults
class RoleScriptedOpenAI(FakeOpenAI):
    """The fake endpoint of test_judges_http, scripted per *role* (read from the prompt's ``Role:`` line): every
    distinct prompt of that role follows the role's script, attempt by attempt, then ``after`` (or the role's last
    action when it is listed in ``forever``). ``echo`` answers a score and echoes the Authorization header back."""

    def __init__(self, by_role: dict[str, list[str]], forever: set[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.by_role = by_role
        self.forever = forever or set()
        self.role_of: dict[str, str] = {}

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        payload = json.loads(body)
        user = payload["messages"][-1]["content"]
        match = re.search(r"^Role: (.+)$", user, re.M)
        role = match.group(1) if match else "?"
        key = hashlib.sha256(user.encode()).hexdigest()[:16]
        with self.lock:
            self.times.append(time.monotonic())
            self.auth_headers.add(h.headers.get("Authorization", ""))
            self.role_of[key] = role
            n = self.attempts[key]
            self.attempts[key] += 1
            script = self.by_role.get(role, [])
            if n < len(script):
                action = script[n]
            else:
                action = script[-1] if role in self.forever and script else self.after
            if action in ("ok", "echo"):
                self.served_ok[key] += 1
        try:
            if action == "echo":
                content = f"SCORE: 3 (request carried {h.headers.get('Authorization')})"
                self.send(h, 200, json.dumps({"choices": [{"message": {"content": content}}]}).encode())
            else:
                self.act(h, action, payload)
        except OSError:
            pass


ROLE_SCRIPTS: list[list[str]] = [
    ["429", "429", "echo"],  # 429 without Retry-After, then a reply that echoes the key
    ["429ra", "ok"],  # 429 with Retry-After: 1
    ["500", "502", "503", "ok"],
    ["reset", "timeout", "slow", "ok"],
    ["badjson", "text", "ok"],  # malformed JSON, then an answer that is not a score
    ["text"],  # never a score: unjudged
]


@pytest.fixture
def judge_server() -> Iterator[Callable[..., RoleScriptedOpenAI]]:
    yield from serving(RoleScriptedOpenAI)


def _fast_judges(monkeypatch: pytest.MonkeyPatch, made: list[Any]) -> None:
    """Make the pipeline's judge with short timeouts and backoff (the endpoint and key still come from the
    environment, as in a real run), at 6000 requests per minute, and keep it for inspection."""
    import personaxis.judges as judges_pkg
    from personaxis.judges.ratelimit import TokenBucket

    real = judges_pkg.make_judge

    def make(spec: str, **kwargs: Any) -> Any:
        judge = real(spec, **{**kwargs, **FAST, "requests_per_minute": 6000, "max_parse_retries": 2})
        bucket = judge.client.rate_limiter
        assert isinstance(bucket, TokenBucket) and bucket.rate == pytest.approx(100.0)
        acquire = bucket.acquire
        bucket.acquires = 0

        def counted() -> float:
            bucket.acquires += 1
            return acquire()

        bucket.acquire = counted
        made.append(judge)
        return judge

    monkeypatch.setattr(judges_pkg, "make_judge", make)


def _no_secret_anywhere(root: Path, *texts: str) -> None:
    for path in _files(root):
        data = path.read_bytes()
        assert SECRET.encode() not in data and b"Bearer sk-" not in data, f"API key in {path}"
    for text in texts:
        assert SECRET not in text


def test_pipeline_with_a_faulty_judge_endpoint_judges_each_rollout_once_or_reports_it_unjudged(
    tmp_path: Path,
    tiny_model_dir: Path,
    judge_server: Callable[..., RoleScriptedOpenAI],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from personaxis.data import load_roles

    caplog.set_level(logging.DEBUG)
    roles = [r.name for r in load_roles(limit=N_ROLES)]
    unjudged_role = roles[-1]
    fake = judge_server(by_role=dict(zip(roles, ROLE_SCRIPTS, strict=True)), forever={unjudged_role})
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    made: list[Any] = []
    _fast_judges(monkeypatch, made)
    out = tmp_path / "run"
    options = [o if o != "none" else "openai:judge-model" for o in CLI_OPTIONS]
    args = ["run", "--out", str(out), "--model", str(tiny_model_dir), *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert fake.auth_headers == {f"Bearer {SECRET}"}

    # every rollout with an answer was sent; each was judged exactly once, or (one role) never and reported so
    judgments = {p.parent.name: json.loads(p.read_text()) for p in (out / "judgments").rglob("*.json")}
    rollouts = {p.parent.name: json.loads(p.read_text())["rollouts"] for p in (out / "rollouts").rglob("*.json")}
    from personaxis.io.run_layout import slug

    sent = 0
    for role in roles:
        scores = judgments[slug(role)]["scores"]
        assert judgments[slug(role)]["judge"] == "openai:judge-model"
        assert list(scores) == [r["id"] for r in rollouts[slug(role)]]
        for rollout in rollouts[slug(role)]:
            answered = bool(rollout["answer"].strip())
            sent += answered
            expected = 3 if answered and role != unjudged_role else None
            assert scores[rollout["id"]] == expected, (role, rollout)
    assert len(fake.attempts) == sent
    for key, role in fake.role_of.items():
        if role == unjudged_role:
            assert fake.served_ok[key] == 0 and fake.attempts[key] == 3  # asked three times, never guessed
        else:
            assert fake.served_ok[key] == 1 and fake.attempts[key] == len(ROLE_SCRIPTS[roles.index(role)])
    assert made[0].client.rate_limiter.acquires == fake.requests  # every attempt waited for the rate limiter

    summary = json.loads((out / "summary.json").read_text())
    entries = {r["name"]: r for r in summary["roles"] + summary["dropped_roles"]}
    for role in roles:
        counts = entries[role]["judge_counts"]
        if role == unjudged_role:
            assert counts == {"unjudged": entries[role]["n_rollouts"]} and entries[role]["vector_source"] == "dropped"
        else:
            assert "unjudged" not in counts and set(counts) == {"3"}
    _no_secret_anywhere(out, result.output, caplog.text, repr(made[0]), repr(vars(made[0])))
    assert "could not be judged" in caplog.text

    # resuming pays for nothing already scored: only the unscored answers are asked again, and once the endpoint
    # has healed they are scored and the role gets its vector
    paid = fake.requests
    answered = {r["id"] for r in rollouts[slug(unjudged_role)] if r["answer"].strip()}
    fake.forever.clear()
    fake.by_role[unjudged_role] = ["ok"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert answered and fake.requests == paid + len(answered)
    healed = json.loads((out / "judgments" / slug(unjudged_role) / "p0.json").read_text())["scores"]
    assert {k for k, v in healed.items() if v == 3} == answered
    summary = json.loads((out / "summary.json").read_text())
    assert unjudged_role in {r["name"] for r in summary["roles"]}  # the vectors were recomputed
    paid = fake.requests
    assert CliRunner().invoke(app, args).exit_code == 0
    assert fake.requests == paid


def test_rejected_key_stops_the_judge_stage_without_leaking_it(
    tmp_path: Path,
    tiny_model_dir: Path,
    judge_server: Callable[..., RoleScriptedOpenAI],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import traceback

    from personaxis.judges import JudgeAuthError

    caplog.set_level(logging.DEBUG)
    fake = judge_server(by_role={}, after="401")  # the 401 body echoes the bearer token
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    _fast_judges(monkeypatch, [])
    out = tmp_path / "run"
    options = [o if o != "none" else "openai:judge-model" for o in CLI_OPTIONS]
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--model", str(tiny_model_dir), *options])
    # a rejected key ends the run with one clear `error:` line (exit 2), not a traceback
    assert result.exit_code == 2 and "error:" in result.output and "401" in result.output
    assert "Traceback" not in result.output
    rendered = "".join(traceback.format_exception(result.exception))
    assert issubclass(JudgeAuthError, Exception)
    assert not (out / "judgments").exists() or not list((out / "judgments").rglob("*.json"))
    assert len(list((out / "activations").rglob("*.safetensors"))) == N_UNITS  # earlier stages kept
    _no_secret_anywhere(out, result.output, caplog.text, rendered)


# Judge-level faults that test_judges_http does not script.
class ExtraFaults(FakeOpenAI):
    """More behaviours: ``429forever`` without Retry-After, ``429date`` (Retry-After as an HTTP date 1 s ahead),
    ``400echo`` (a non-retryable error whose body echoes the key), ``html`` (a 200 HTML error page), ``null`` (a
    completion whose content is null), ``range`` / ``float`` / ``negative`` (scores 7, 2.5 and -1), ``echo``. ``stamps`` holds each item's request
    times."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stamps: dict[str, list[float]] = {}

    def act(self, h: BaseHTTPRequestHandler, action: str, payload: dict) -> None:
        import email.utils

        match = re.search(r"ITEM(\w+)", " ".join(m["content"] for m in payload["messages"]))
        with self.lock:
            self.stamps.setdefault(match.group(1) if match else "?", []).append(time.monotonic())

        def reply(content: Any) -> None:
            self.send(
                h, 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            )

        if action == "429forever":
            self.send(h, 429, b'{"error": "slow down"}')
        elif action == "429date":
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            self.send(h, 429, b'{"error": "slow down"}', {"Retry-After": when})
        elif action == "400echo":
            self.send(h, 400, json.dumps({"error": f"bad request from {h.headers.get('Authorization')}"}).encode())
        elif action == "html":
            data = b"<html><body>502 Bad Gateway</body></html>"
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        elif action == "null":
            reply(None)
        elif action == "range":
            reply("SCORE: 7")
        elif action == "float":
            reply("SCORE: 2.5")
        elif action == "negative":
            reply("SCORE: -1")
        elif action == "echo":
            reply(f"SCORE: 2 — {h.headers.get('Authorization')}")
        else:
            super().act(h, action, payload)


@pytest.fixture
def extra_server() -> Iterator[Callable[..., ExtraFaults]]:
    yield from serving(ExtraFaults)


def test_judge_faults_not_scripted_elsewhere(
    extra_server: Callable[..., ExtraFaults], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    scripts = {
        "k0": ["429forever"] * 10,  # retries exhausted: unjudged
        "k1": ["429date", "ok"],  # Retry-After as an HTTP date
        "k2": ["400echo"],  # not retryable: unjudged, the echoed key redacted
        "k3": ["html", "null", "ok"],
        "k4": ["range", "float", "negative"],  # never a valid score: unjudged, not clamped or rounded
        "k5": ["echo"],  # a good score whose text holds the key: cached with the key masked
    }
    fake = extra_server(scripts=scripts)
    judge = judge_for(fake, tmp_path, max_retries=3, max_parse_retries=2)
    scores = judge.score(judge_items(7))
    assert scores == {"k0": None, "k1": 3, "k2": None, "k3": 3, "k4": None, "k5": 2, "k6": 3}
    assert fake.attempts["k0"] == 4 and fake.attempts["k2"] == 1 and fake.attempts["k4"] == 3
    assert sum(fake.served_ok.values()) == 3  # k1, k3, k6 (k5's echo is counted by its own action)
    assert fake.stamps["k1"][1] - fake.stamps["k1"][0] >= 1.0  # the date was honoured
    cached = "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    assert len(cached.splitlines()) == 4 and "***" in cached  # only real scores are cached
    assert SECRET not in cached and SECRET not in caplog.text
    assert "HTTP 400" in caplog.text and "could not be judged" in caplog.text
    before = fake.requests
    assert judge_for(fake, tmp_path, max_retries=0, max_parse_retries=0).score(judge_items(7))["k5"] == 2
    assert fake.requests == before + 3  # only the three unjudged items are asked again
