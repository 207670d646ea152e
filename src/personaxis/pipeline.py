"""The pipeline: generate → extract → judge → vectors → axis → space, each stage idempotent and resumable.

Units of work are (condition, system prompt): ``rollouts/<condition>/p<k>.json``,
``activations/<condition>/p<k>.safetensors`` and ``judgments/<condition>/p<k>.json``. A unit's file is written
atomically once the unit is complete, so a run killed at any instant resumes with ``personaxis run`` on the same
directory, redoing nothing finished and losing nothing written.

With the transformers backend the generate stage also writes the activation files, from activations captured while
generating (:mod:`personaxis.capture`); the extract stage then extracts teacher-forced only what is left (rollouts of
other backends, imported ones, a run with ``extra["extract"] = "teacher-forced"``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personaxis import judges
from personaxis.activations import extract_turn_means
from personaxis.backends import load_run_model, make_backend
from personaxis.capture import extract_mode
from personaxis.chat import build_conversation
from personaxis.derive import compute_axis, compute_vectors, write_space
from personaxis.generation import SamplingConfig
from personaxis.io.records import JudgmentsRecord, Rollout, RolloutsRecord
from personaxis.io.run_layout import unit_key
from personaxis.io.tensor_files import load_unit_activations, save_unit_activations
from personaxis.judges import JudgeItem
from personaxis.judges.factory import judge_model
from personaxis.judges.traits import TraitItem
from personaxis.models import EMBEDDED_ALIASES, EMBEDDED_MODEL_NAME, LoadedModel, ModelPlacement, check_model_source
from personaxis.progress import progress_bar
from personaxis.settings import Condition, RunSettings, build_conditions, build_questions
from personaxis.store import DamagedFileError, RunDirError, RunStore, all_or_nothing, read_record, write_record
from personaxis.threads import ThreadBudget

if TYPE_CHECKING:
    from personaxis.backends import GenerationBackend

STAGES = ("generate", "extract", "judge", "vectors", "axis", "space")
# Rows generated together unless ``--batch-size`` says otherwise. On the quick preset (2-core AMD EPYC, quiet,
# /usr/bin/time): 32 rows 61.8 s and 1,359 MiB peak RSS, 48 rows 55-60 s and 1,496-1,630 MiB, 64 rows 53.5 s and
# 1,668 MiB (the key/value cache of 64 rows of ~150 positions is about 440 MB of it).
DEFAULT_BATCH_SIZE = 64
# Settings that only change how vectors are made from judged rollouts: a run may be asked again with others.
RECIPE_FIELDS = ("vectors", "min_count", "judge_traits")
Log = Callable[[str], None]


@dataclass
class Unit:
    condition: Condition
    prompt_index: int

    @property
    def key(self) -> str:
        return unit_key(self.condition.name, self.prompt_index)

    @property
    def system_prompt(self) -> str | None:
        """The unit's system prompt; ``None`` for none at all (the reference's empty default prompt)."""
        return self.condition.system_prompts[self.prompt_index]


class Executor(Protocol):
    """Runs chunks of units of a stage elsewhere (e.g. :class:`personaxis.distributed.RayExecutor`); each chunk is
    processed exactly as the local loop would, with ``Pipeline.generate_units`` or ``Pipeline.extract_units``."""

    def run_chunks(
        self, pipeline: Pipeline, stage: str, chunks: list[list[Unit]], on_done: Callable[[int], Any]
    ) -> int: ...


class Pipeline:
    """One run directory and the stages that fill it.

    Attributes:
        store: the run's files (:class:`~personaxis.store.RunStore`); ``layout``, their paths
            (:class:`~personaxis.io.run_layout.RunLayout`).
        settings: the :class:`~personaxis.settings.RunSettings` of the run.
        conditions: what the model is prompted as (roles, the default, trait sides), from the settings.
        questions: the questions each system prompt is asked.
        units: the units of work, one per (condition, system prompt).
        placement: where the model is loaded (device, dtype, ...), when given.
        executor: runs a stage's chunks of units elsewhere (Ray workers, :class:`Executor`), or ``None`` to run them here.
        log: a function that receives progress messages.
        show_progress: show progress bars.
        work_done: how many units each stage did in this process.
    """

    def __init__(
        self,
        out: str | Path,
        settings: RunSettings,
        *,
        lm: LoadedModel | None = None,
        log: Log | None = None,
        show_progress: bool = True,
        executor: Executor | None = None,
        placement: ModelPlacement | None = None,
    ) -> None:
        self.store = RunStore(out)
        self.layout = self.store.layout
        self.settings = settings
        self._lm = lm
        self.placement = placement  # where the model is loaded (device, dtype, …), when it is
        self._owns_lm = lm is None  # loaded by the pipeline itself: freed once the stages that use it are done
        self._backend: GenerationBackend | None = None
        self.executor = executor
        self.log = log or (lambda message: None)
        self.show_progress = show_progress
        self._threads: ThreadBudget | None = None
        self.work_done: dict[str, int] = {stage: 0 for stage in STAGES}
        model_name = lm.profile.name if lm is not None else self._model_display_name()
        self.conditions = build_conditions(settings, model_name)
        self.questions = build_questions(settings)
        self.units = [Unit(c, k) for c in self.conditions for k in range(len(c.system_prompts))]

    # -------------------------------------------------------------------------------------------- set-up
    def _model_display_name(self) -> str:
        return EMBEDDED_MODEL_NAME if self.settings.model.lower() in EMBEDDED_ALIASES else self.settings.model

    @property
    def model_name(self) -> str:
        """The model's name: the loaded model's, else the one the settings give (without loading it)."""
        return self._lm.profile.name if self._lm is not None else self._model_display_name()

    def manifest(self) -> dict[str, Any]:
        return {
            "format": "personaxis.run/1",
            "settings": self.settings.to_manifest(),
            "conditions": [c.name for c in self.conditions],
            "questions": [q.id for q in self.questions],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def open(self) -> None:
        if self.store.read_manifest() is None:
            # A new run: check the judge and the model before anything is written.
            if self.settings.judge != "none":
                judge_model(self.settings.judge)
            if self._lm is None:
                check_model_source(
                    None if self.settings.model == "embedded" else self.settings.model,
                    allow_download=bool(self.placement and self.placement.allow_download),
                )
        self.store.acquire_lock()
        try:
            self._change_recipe()
            self.store.open(self.manifest())
        except BaseException:
            self.store.release_lock()
            raise
        removed = self.store.clean_partials()
        if removed:
            self.log(f"removed {removed} partial file(s) left by an interrupted run")

    def _change_recipe(self) -> None:
        """A finished or partial run asked again with only another vector recipe (``--vectors``, ``--min-count``,
        ``--judge-traits``):
        record the new recipe and recompute vectors, axis and summary from the rollouts, activations and judgments
        already there (generation and extraction are not redone)."""
        existing = self.store.read_manifest()
        if existing is None:
            return
        manifest = self.manifest()
        old, new = existing.get("settings", {}), manifest["settings"]
        # A run made before a setting existed behaved as that setting's default does: record it so.
        defaults = {f.name: f.default for f in fields(RunSettings) if f.default is not MISSING}
        added = {k: defaults[k] for k in new if k not in old and k in defaults}
        if added and isinstance(old, dict):
            old = {**old, **added}
            existing = {**existing, "settings": old}
            self.store.write_manifest(existing)

        def others(settings: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in settings.items() if k not in RECIPE_FIELDS}

        changed = [k for k in RECIPE_FIELDS if old.get(k) != new.get(k)]
        same_run = others(old) == others(new) and all(
            existing.get(k) == manifest.get(k) for k in ("conditions", "questions")
        )
        if not changed or not same_run:
            return
        self.log("vector recipe changed (" + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed) + ")")
        self.store.write_manifest({**existing, "settings": new})
        self._forget_derived("the new recipe")

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self.log(f"loading model {self.settings.model}…")
            self._lm = load_run_model(self.settings, self.placement)
        return self._lm

    @property
    def backend(self) -> GenerationBackend:
        """The generation backend named by ``settings.extra["backend"]`` (transformers unless set)."""
        if self._backend is None:
            self._backend = make_backend(self.settings, lambda: self.lm)
        return self._backend

    def release_backend(self) -> None:
        """Free what the generation backend holds beyond the run's model (a vLLM engine's GPU memory)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    # --------------------------------------------------------------------------------------------- paths
    def rollout_path(self, unit: Unit) -> Path:
        return self.layout.rollouts(unit.key)

    def activation_path(self, unit: Unit) -> Path:
        return self.layout.activations(unit.key)

    def judgment_path(self, unit: Unit) -> Path:
        return self.layout.judgments(unit.key)

    def _require(self, paths: Sequence[Path], stage: str) -> None:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise RunDirError(
                f"{len(missing)} unit(s) of the '{stage}' stage are not done yet (e.g. {missing[0]}); "
                f"run `personaxis {stage} --out {self.store.root}` or `personaxis run` first"
            )

    def is_judged(self, condition: Condition) -> bool:
        """Roles are judged 0-3; traits 0-100 when the run judges them (``settings.judges_traits``)."""
        return condition.judged or (condition.is_trait and self.settings.judges_traits)

    def _trait_pair(self, unit: Unit) -> tuple[str, str]:
        """The positive and negative instruction of a trait unit's pair."""
        sides = {c.kind: c for c in self.conditions if c.is_trait and c.trait == unit.condition.trait}
        return (
            sides["trait_pos"].system_prompts[unit.prompt_index] or "",
            sides["trait_neg"].system_prompts[unit.prompt_index] or "",
        )

    def _judge_items(self, unit: Unit, rollouts: list[Rollout], known: dict[str, Any]) -> list[Any]:
        """What the judge is asked about a unit's answers that have no score yet."""
        todo = [r for r in rollouts if r.answer.strip() and known.get(r.id) is None]
        c = unit.condition
        if c.is_trait:
            positive, negative = self._trait_pair(unit)
            return [
                TraitItem(
                    key=r.id,
                    trait=c.trait or c.name,
                    description=c.rubric,
                    positive=positive,
                    negative=negative,
                    question=r.question,
                    answer=r.answer,
                    eval_prompt=c.eval_prompt,
                )
                for r in todo
            ]
        return [
            JudgeItem(
                key=r.id,
                role=c.name,
                rubric=c.rubric,
                question=r.question,
                answer=r.answer,
                eval_prompt=c.eval_prompt,
            )
            for r in todo
        ]

    def read_rollouts(self, unit: Unit) -> list[Rollout]:
        path = self.rollout_path(unit)
        with corrupted_unit(path):
            return read_record(path, RolloutsRecord).rollouts

    def read_scores(self, unit: Unit) -> dict[str, Any]:
        """A judged unit's scores by rollout id (``None``: not scored)."""
        path = self.judgment_path(unit)
        with corrupted_unit(path):
            return read_record(path, JudgmentsRecord).scores

    def _unscored(self, units: Iterable[Unit]) -> tuple[dict[str, dict[str, Any]], int]:
        """The judged units whose judgment file lacks a score for some non-empty answer, by key with the scores it
        holds, and how many answers lack one."""
        out: dict[str, dict[str, Any]] = {}
        n_missing = 0
        for unit in units:
            scores = self.read_scores(unit)
            if None not in scores.values():
                continue
            missing = sum(1 for r in self.read_rollouts(unit) if r.answer.strip() and scores.get(r.id) is None)
            if missing:
                out[unit.key] = scores
                n_missing += missing
        return out, n_missing

    # ---------------------------------------------------------------------------------------------- stages
    def run(self, stages: Sequence[str] = STAGES) -> dict[str, int]:
        unknown = [stage for stage in stages if stage not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; stages are: {', '.join(STAGES)}")
        self.open()
        try:
            for stage in stages:
                getattr(self, f"stage_{stage}")()
        finally:
            self.store.release_lock()
        return self.work_done

    def _chunks(self, units: list[Unit], per_chunk: int) -> list[list[Unit]]:
        """Group units so one batched call covers about ``per_chunk`` conversations (a kill loses one chunk)."""
        size = max(1, per_chunk // max(1, len(self.questions)))
        return [units[i : i + size] for i in range(0, len(units), size)]

    def _sampling_config(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.settings.max_new_tokens,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            seed=self.settings.seed,
            batch_size=int(self.settings.extra.get("batch_size", DEFAULT_BATCH_SIZE)),
        )

    def _run_chunks(self, stage: str, chunks: list[list[Unit]], on_done: Callable[[int], Any]) -> int:
        if self.executor is not None:
            return self.executor.run_chunks(self, stage, chunks, on_done)
        work = self.generate_units if stage == "generate" else self.extract_units
        threads = self._thread_budget()
        done = 0
        for chunk in chunks:
            threads.update()  # fewer threads while other processes hold CPUs (see personaxis.threads)
            n = work(chunk)
            done += n
            on_done(n)
        return done

    def _thread_budget(self) -> ThreadBudget:
        """The thread budget of this run, measured once before its first chunk of work."""
        if self._threads is None:
            self._threads = ThreadBudget(self._log_over_bars)
            self._threads.settle()
        return self._threads

    def _log_over_bars(self, message: str) -> None:
        from tqdm.auto import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            self.log(message)

    def stage_generate(self) -> None:
        todo = [u for u in self.units if not self.rollout_path(u).is_file()]
        self.log(f"generate: {len(self.units) - len(todo)} of {len(self.units)} units done, {len(todo)} to go")
        if not todo:
            return
        bar = progress_bar(
            total=len(todo) * len(self.questions),
            desc="generate rollouts",
            unit="rollout",
            disable=not self.show_progress,
        )
        chunks = self._chunks(todo, 2 * self._sampling_config().batch_size)
        self.work_done["generate"] += self._run_chunks(
            "generate", chunks, lambda n: bar.update(n * len(self.questions))
        )
        bar.close()
        self.release_backend()

    def _capture(self) -> Any:
        """A capture for the backend's next call, when it records activations and the run extracts that way."""
        if extract_mode(self.settings) != "capture" or not getattr(self.backend, "captures", False):
            return None
        return self.backend.new_capture()

    def generate_units(self, units: Sequence[Unit]) -> int:
        """Generate the rollouts of ``units`` in one batched call and write each unit's file; return units written.
        A backend that captures activations while generating also writes their activation files."""
        conversations = [build_conversation(u.system_prompt, q.question) for u in units for q in self.questions]
        capture = self._capture()
        kwargs = {"capture": capture} if capture is not None else {}
        answers = iter(self.backend.generate(conversations, self._sampling_config(), **kwargs))
        for unit in units:
            rollouts = []
            for q in self.questions:
                a = next(answers)
                rollouts.append(
                    Rollout(
                        id=f"{unit.key}/q{q.id}",
                        question_id=q.id,
                        question=q.question,
                        answer=a.text,
                        new_tokens=a.new_tokens,
                        stopped=a.stopped,
                    )
                )
            record = RolloutsRecord(
                condition=unit.condition.name,
                kind=unit.condition.kind,
                prompt_index=unit.prompt_index,
                system_prompt=unit.system_prompt,
                rollouts=rollouts,
            )
            write_record(self.rollout_path(unit), record)
        if capture is not None:
            self._write_captured(units, capture)
        return len(units)

    def _write_captured(self, units: Sequence[Unit], capture: Any) -> None:
        """Activation files from a capture; rollouts it cannot give (see :mod:`personaxis.capture`) are extracted
        teacher-forced."""
        per_unit = [[r for r in self.read_rollouts(u) if r.answer.strip()] for u in units]
        index = {r.id: i for i, r in enumerate(r for u in units for r in self.read_rollouts(u))}
        acts: dict[str, Any] = {}
        missing: list[tuple[str, Any]] = []
        for unit, rollouts in zip(units, per_unit, strict=True):
            for r in rollouts:
                conversation = build_conversation(unit.system_prompt, r.question, r.answer)
                captured = capture.turn_activations(index[r.id], conversation)
                if captured is None:
                    missing.append((r.id, conversation))
                else:
                    acts[r.id] = captured
        if missing:
            acts.update(
                zip([key for key, _ in missing], extract_turn_means(self.lm, [c for _, c in missing]), strict=True)
            )
        for unit, rollouts in zip(units, per_unit, strict=True):
            self._write_activations(unit, rollouts, [acts[r.id] for r in rollouts])

    def stage_extract(self) -> None:
        self._require([self.rollout_path(u) for u in self.units], "generate")
        todo = [u for u in self.units if not self.activation_path(u).is_file()]
        self.log(f"extract: {len(self.units) - len(todo)} of {len(self.units)} units done, {len(todo)} to go")
        if todo:
            bar = progress_bar(total=len(todo), desc="extract activations", unit="unit", disable=not self.show_progress)
            self.work_done["extract"] += self._run_chunks("extract", self._chunks(todo, 128), bar.update)
            bar.close()
        self.release_model()

    def release_model(self) -> None:
        """Free the run's model if the pipeline loaded it (the later stages read activation files only): the judge
        stage then runs without the model's memory."""
        if not self._owns_lm or self._lm is None:
            return
        import gc

        self.release_backend()
        self._lm = None
        gc.collect()
        _return_free_memory()

    def extract_units(self, units: Sequence[Unit]) -> int:
        """Extract the activations of ``units``' rollouts in one batched call and write each unit's file."""
        per_unit = [[r for r in self.read_rollouts(u) if r.answer.strip()] for u in units]
        conversations = [
            build_conversation(u.system_prompt, r.question, r.answer)
            for u, rollouts in zip(units, per_unit, strict=True)
            for r in rollouts
        ]
        acts = iter(extract_turn_means(self.lm, conversations) if conversations else [])
        for unit, rollouts in zip(units, per_unit, strict=True):
            self._write_activations(unit, rollouts, [next(acts) for _ in rollouts])
        return len(units)

    def _write_activations(self, unit: Unit, rollouts: Sequence[Rollout], unit_acts: Sequence[Any]) -> None:
        """One unit's activation file: the means and norms of its rollouts' answers, in order."""
        dtype = getattr(torch, self.settings.store_dtype)
        n_layers, hidden = self.lm.profile.n_layers, self.lm.profile.hidden_size
        means = torch.stack([a.means[0] for a in unit_acts]) if unit_acts else torch.zeros((0, n_layers, hidden))
        norms = torch.stack([a.norms[0] for a in unit_acts]) if unit_acts else torch.zeros((0, n_layers))
        save_unit_activations(self.activation_path(unit), [r.id for r in rollouts], means.to(dtype), norms)

    def read_activations(self, unit: Unit) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        path = self.activation_path(unit)
        with corrupted_unit(path):
            return load_unit_activations(path)

    def stage_judge(self) -> None:
        self._require([self.rollout_path(u) for u in self.units], "generate")
        judged_units = [u for u in self.units if self.is_judged(u.condition)]
        done = [u for u in judged_units if self.judgment_path(u).is_file()]
        todo = [u for u in judged_units if not self.judgment_path(u).is_file()]
        # Answers a judge could not score (None: endpoint down, unparsable replies) are asked again on resume.
        retry, n_retry = ({}, 0) if self.settings.judge == "none" else self._unscored(done)
        self.log(
            f"judge: {len(done)} of {len(judged_units)} units done, {len(todo)} to go"
            + (f", {n_retry} unscored answers to retry" if retry else "")
        )
        todo += [u for u in done if u.key in retry]
        if not todo:
            return
        if self.settings.judge == "none":
            for unit in todo:
                write_record(
                    self.judgment_path(unit),
                    JudgmentsRecord(judge="none", scores={r.id: None for r in self.read_rollouts(unit)}),
                )
                self.work_done["judge"] += 1
            return
        cache = self.layout.judge_cache
        role_judge = judges.make_judge(self.settings.judge, cache_dir=cache)  # looked up here: tests script it
        trait_judge = (
            judges.make_trait_judge(self.settings.judge, cache_dir=cache) if self.settings.judges_traits else None
        )
        bar = progress_bar(
            total=len(todo), desc=f"judge ({role_judge.name})", unit="unit", disable=not self.show_progress
        )
        for unit in todo:
            rollouts = self.read_rollouts(unit)
            known = retry.get(unit.key, {})
            items = self._judge_items(unit, rollouts, known)
            judge = trait_judge if unit.condition.is_trait else role_judge
            assert judge is not None
            scores = {**known, **(judge.score(items) if items else {})}
            write_record(
                self.judgment_path(unit),
                JudgmentsRecord(judge=judge.name, scores={r.id: scores.get(r.id) for r in rollouts}),
            )
            self.work_done["judge"] += 1
            bar.update(1)
        bar.close()
        if retry:
            self._forget_derived("new judgments")

    def _forget_derived(self, why: str) -> None:
        """Remove the outputs computed from the judgments (vectors, axis, summary) so the next stages recompute them."""
        derived = self.layout.derived
        if any(p.is_file() for p in derived):
            self.log(f"{why}: vectors, axis and summary will be recomputed")
        for path in derived:
            path.unlink(missing_ok=True)

    def stage_vectors(self) -> None:
        self._require([self.activation_path(u) for u in self.units], "extract")
        self._require([self.judgment_path(u) for u in self.units if self.is_judged(u.condition)], "judge")
        if self.layout.vector_index.is_file():
            return
        with all_or_nothing():  # a damaged unit found halfway leaves no vector files behind
            compute_vectors(self)
        self.work_done["vectors"] += 1

    def stage_axis(self) -> None:
        if self.layout.axis.is_file():
            return
        self._require([self.layout.vector_index], "vectors")
        compute_axis(self)
        self.work_done["axis"] += 1

    def stage_space(self) -> None:
        if self.layout.summary.is_file() and self.layout.report.is_file():
            return
        self._require([self.layout.axis], "axis")
        with all_or_nothing():
            write_space(self)
        self.work_done["space"] += 1


@contextmanager
def corrupted_unit(path: Path) -> Iterator[None]:
    """Turn any failure to read a unit's file into a ``RunDirError`` that says how to redo the unit."""
    try:
        yield
    except DamagedFileError as exc:
        raise _damaged(path, exc.reason) from None
    except RunDirError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON, safetensors and shape errors all mean "this file is damaged"
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from None


def _damaged(path: Path, reason: str) -> RunDirError:
    return RunDirError(
        f"{path}: damaged unit file ({reason}); delete it and rerun `personaxis run` on the same --out to redo that unit"
    )


def _return_free_memory() -> None:
    """Hand memory freed by the process back to the system (glibc keeps freed small blocks for reuse)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def open_existing(out: str | Path, **kwargs: Any) -> Pipeline:
    """A pipeline over an existing run directory, with the settings of its manifest."""
    store = RunStore(out)
    manifest = store.read_manifest()
    if manifest is None:
        raise RunDirError(
            f"{out} is not a personaxis run directory (no manifest.json); start one with `personaxis run`"
        )
    try:
        settings = RunSettings.from_manifest(manifest["settings"])
        settings.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"{store.manifest_path}: the settings in the manifest are damaged ({exc})") from None
    return Pipeline(out, settings, **kwargs)
