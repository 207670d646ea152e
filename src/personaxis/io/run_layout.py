"""The run directory's layout: one object that knows every path of a run, and nothing else does.

::

    RUN/manifest.json                              ManifestRecord: settings, conditions, questions
    RUN/.personaxis.lock                           the writer's lock
    RUN/rollouts/<condition>/p<k>.json             RolloutsRecord: questions and answers of one unit
    RUN/activations/<condition>/p<k>.safetensors   per-rollout response means [n, n_layers, hidden] and norms
    RUN/judgments/<condition>/p<k>.json            JudgmentsRecord: judge scores of one unit
    RUN/judge_cache/                               the judges' answer cache
    RUN/vectors/index.json                         VectorIndex: what each role used
    RUN/vectors/default.safetensors                the default vector
    RUN/vectors/roles/<role>.safetensors           role vectors per score group
    RUN/vectors/traits/<trait>.safetensors         trait vectors
    RUN/vectors/residual_norms.safetensors         mean residual norms per layer
    RUN/axis.safetensors                           the axis
    RUN/summary.json                               SummaryRecord: the persona space
    RUN/report.html, RUN/figures/*.png             the report and its figures
    RUN/capping.safetensors                        the capping config `personaxis calibrate` writes
    RUN/transcripts/                               transcripts the web app lists

A unit of work is a condition and a system prompt; its key is ``<condition folder>/p<k>`` (:func:`unit_key`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

# Names kept as they are (spaces become hyphens): lowercase ASCII words joined by single spaces or hyphens.
_PLAIN_NAME = re.compile(r"[a-z0-9]+(?:[ -][a-z0-9]+)*")
_NOT_WORD = re.compile(r"[^a-z0-9]+")
MAX_FOLDER_NAME = 64  # well under every file system's limit, with room for the unit's suffix
_HASH_CHARS = 10
RESERVED_NAMES = ("default",)
RESERVED_PREFIXES = ("trait-",)


STAGE_FOLDERS = ("rollouts", "activations", "judgments")
# The capping config is looked for beside a run (or an axis) under these names: ours first, then the reference's.
CAPPING_NAMES = ("capping.safetensors", "capping.pt", "capping_config.pt")
REPORT_FIGURES = ("persona_space.png", "variance.png", "cosine_per_layer.png", "axis_extremes.png")


def slug(name: str) -> str:
    """The folder (or file) name of a role or condition; distinct names give distinct folder names.

    Plain names (lowercase ASCII words separated by single spaces or hyphens, at most 64 characters) keep their
    form with spaces as hyphens: ``"opera singer"`` → ``opera-singer``. Any other name is its lowercase words (cut
    to fit), ``--`` and a hash of the exact name: ``"Smith"`` → ``smith--<hash>``, so it cannot meet a plain name
    (which never holds ``--``), another spelling or another case. Only ``"a b"`` and ``"a-b"`` share a folder:
    :func:`check_folder_names` refuses such a pair.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"cannot make a file name from {name!r}: the name is empty")
    if _PLAIN_NAME.fullmatch(name) and len(name) <= MAX_FOLDER_NAME:
        return name.replace(" ", "-")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    words = _NOT_WORD.sub("-", name.lower()).strip("-")[: MAX_FOLDER_NAME - _HASH_CHARS - 2].strip("-")
    return f"{words or 'name'}--{digest}"


def check_folder_names(names: Iterable[str], *, what: str = "role") -> None:
    """Refuse names whose folders would clash (``"a b"`` and ``"a-b"``, or the same name twice), before anything
    is written."""
    seen: dict[str, str] = {}
    for name in names:
        folder = slug(name)
        if folder in seen:
            other = seen[folder]
            why = (
                "the same name twice" if other == name else f"{other!r} and {name!r} would share the folder {folder!r}"
            )
            raise ValueError(f"{what} names clash: {why}; rename one of them")
        seen[folder] = name


def check_role_name(name: str) -> None:
    """Refuse a role name that is empty, reserved (``default``, ``trait-…``: the run's own conditions, in any case)
    or holds control characters."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"role name {name!r} is empty")
    folded = name.strip().casefold()
    if folded in RESERVED_NAMES or folded.startswith(RESERVED_PREFIXES):
        raise ValueError(
            f"role name {name!r} is reserved (the run's own conditions are named "
            f"{', '.join(repr(n) for n in RESERVED_NAMES)} and 'trait-…'); rename the role"
        )
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise ValueError(f"role name {name!r} holds control characters or lone surrogates")


def unit_key(condition: str, prompt_index: int) -> str:
    """``<condition folder>/p<k>``: the unit's files under each stage folder, and the prefix of its rollout ids."""
    return f"{slug(condition)}/p{prompt_index}"


class RunLayout:
    """Every path of one run directory.

    It holds only ``root``, the run directory; each property or method gives one file or folder under it (the
    manifest, the axis, the vector index, a unit's rollouts, activations and judgments, a role's vectors, ...), as
    listed in docs/design.md "The run directory". Nothing is read or created by the layout itself.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    # run-level files --------------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".personaxis.lock"

    @property
    def judge_cache(self) -> Path:
        return self.root / "judge_cache"

    @property
    def axis(self) -> Path:
        return self.root / "axis.safetensors"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def figure(self, name: str) -> Path:
        """A figure of the report (one of :data:`REPORT_FIGURES`)."""
        if name not in REPORT_FIGURES:
            raise ValueError(f"unknown report figure {name!r}; figures are: {', '.join(REPORT_FIGURES)}")
        return self.root / "figures" / name

    @property
    def transcripts(self) -> Path:
        return self.root / "transcripts"

    # units ------------------------------------------------------------------------------------------------
    def stage_folder(self, stage: str) -> Path:
        if stage not in STAGE_FOLDERS:
            raise ValueError(f"unknown stage folder {stage!r}; stage folders are: {', '.join(STAGE_FOLDERS)}")
        return self.root / stage

    def rollouts(self, key: str) -> Path:
        return self.root / "rollouts" / f"{key}.json"

    def activations(self, key: str) -> Path:
        return self.root / "activations" / f"{key}.safetensors"

    def judgments(self, key: str) -> Path:
        return self.root / "judgments" / f"{key}.json"

    def condition_rollouts(self, condition: str) -> Path:
        """The folder of a condition's rollout files (``p<k>.json``)."""
        return self.root / "rollouts" / slug(condition)

    # vectors ----------------------------------------------------------------------------------------------
    @property
    def vectors(self) -> Path:
        return self.root / "vectors"

    @property
    def vector_index(self) -> Path:
        return self.vectors / "index.json"

    @property
    def default_vector(self) -> Path:
        return self.vectors / "default.safetensors"

    @property
    def residual_norms(self) -> Path:
        return self.vectors / "residual_norms.safetensors"

    def role_vectors(self, role: str) -> Path:
        return self.vectors / "roles" / f"{slug(role)}.safetensors"

    def trait_vector(self, trait: str) -> Path:
        return self.vectors / "traits" / f"{slug(trait)}.safetensors"

    # derived outputs --------------------------------------------------------------------------------------
    @property
    def derived(self) -> tuple[Path, ...]:
        """The outputs computed from the judgments: a new recipe or new judgments remove them."""
        return (self.vector_index, self.axis, self.summary)

    # capping ----------------------------------------------------------------------------------------------
    @property
    def capping(self) -> Path:
        """Where `personaxis calibrate` writes the run's capping config."""
        return self.root / CAPPING_NAMES[0]

    def find_capping(self) -> Path | None:
        """The capping config beside the run (or beside an axis in this folder), ours first; ``None`` if none."""
        return find_capping_beside(self.root)


def find_capping_beside(folder: str | Path) -> Path | None:
    """The capping config in ``folder`` under one of :data:`CAPPING_NAMES` (ours first); ``None`` if none."""
    folder = Path(folder)
    return next((folder / name for name in CAPPING_NAMES if (folder / name).is_file()), None)
