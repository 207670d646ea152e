"""Role and condition names become folder names that keep distinct names distinct: plain lowercase names as they are
(so existing runs read as before), anything else with a hash of the exact name; names that would still share a
folder, or that are reserved, are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personaxis.data import load_roles, load_traits
from personaxis.io.run_layout import MAX_FOLDER_NAME, check_folder_names, check_role_name, slug
from personaxis.pipeline import Pipeline
from personaxis.settings import QUICK_ROLES, RunSettings
from personaxis.store import all_or_nothing, atomic_write_bytes


def test_plain_names_keep_their_folder_names() -> None:
    """The quick preset's and the catalogue's folders are what they were (spaces as hyphens)."""
    assert slug("opera singer") == "opera-singer" and slug("ghost") == "ghost"
    assert slug("trait-self-conscious-pos") == "trait-self-conscious-pos"
    for name in [*QUICK_ROLES, *(r.name for r in load_roles()), *(f"trait-{t.name}-pos" for t in load_traits())]:
        assert slug(name) == name.replace(" ", "-"), name


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Smith", "smith"),
        ("SMITH", "Smith"),
        ("smith?", "smith!"),
        ("Default", "default"),
        ("Zoë", "zoe"),
        ("a_b", "a-b"),
        ("a.b", "a-b"),
        ("a  b", "a b"),
        ("a b ", "a b"),
        ("???", "!!!"),
        ("", " "),
    ],
)
def test_distinct_names_get_distinct_folders_also_on_case_insensitive_file_systems(a: str, b: str) -> None:
    if not a.strip() or not b.strip():
        with pytest.raises(ValueError, match="the name is empty"):
            slug(a if not a.strip() else b)
        return
    assert slug(a).casefold() != slug(b).casefold()


def test_hashed_folder_names_are_stable_safe_and_never_meet_a_plain_one() -> None:
    folder = slug("Smith")
    assert folder == slug("Smith") and folder.startswith("smith--") and len(folder) == len("smith--") + 10
    for name in ("Smith", "???", "Ünïcödé role", "x" * 300, "a/b\\c:d", "..", "con", "日本語"):
        made = slug(name)
        assert made == made.lower() and "/" not in made and "\\" not in made and not made.startswith(".")
        assert len(made) <= MAX_FOLDER_NAME and ("--" in made or made == name)


def test_300_character_names_are_capped_with_a_hash() -> None:
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    assert len(slug(long_a)) <= MAX_FOLDER_NAME and len(slug(long_b)) <= MAX_FOLDER_NAME
    assert slug(long_a) != slug(long_b)
    assert slug("a" * MAX_FOLDER_NAME) == "a" * MAX_FOLDER_NAME  # a plain name that fits stays as it is


def test_names_that_would_share_a_folder_or_are_reserved_are_refused() -> None:
    with pytest.raises(ValueError, match="'opera singer' and 'opera-singer' would share the folder 'opera-singer'"):
        check_folder_names(["opera singer", "opera-singer"])
    with pytest.raises(ValueError, match="the same name twice"):
        check_folder_names(["ghost", "ghost"])
    check_folder_names(["Smith", "smith", "SMITH", "default"])
    for reserved in ("default", "Default", " DEFAULT ", "trait-calm-pos", "Trait-x"):
        with pytest.raises(ValueError, match="is reserved"):
            check_role_name(reserved)
    for bad in ("", "   ", "tab\there", "lone \ud800"):
        with pytest.raises(ValueError):
            check_role_name(bad)


ROLE = {
    "category": "human_roles",
    "rubric": "Score 3 if it plays the role.",
    "system_prompts": ["You are a blacksmith at a busy forge in the old town."],
}


def test_a_run_keeps_roles_apart_that_differ_in_case_or_are_very_long(tmp_path: Path, tiny_llama) -> None:
    """`Smith` and `smith` (and a 300-character role) each get their own rollouts and vector: nothing shared."""
    roles = tmp_path / "roles"
    roles.mkdir()
    names = ["Smith", "smith", "S" * 300]
    for i, name in enumerate(names):
        prompt = f"You are {name[:40]}, number {i}, who works at a busy forge in the old town."
        (roles / f"r{i}.json").write_text(json.dumps({**ROLE, "name": name, "system_prompts": [prompt]}))
    out = tmp_path / "run"
    settings = RunSettings.from_preset(
        "tiny",
        model="tiny",
        judge="none",
        roles_dir=str(roles),
        n_roles=3,
        n_questions=2,
        n_traits=0,
        max_new_tokens=4,
        min_count=1,
    )
    Pipeline(out, settings, lm=tiny_llama, show_progress=False).run(["generate", "extract", "judge", "vectors"])
    folders = sorted(p.name for p in (out / "rollouts").iterdir())
    assert len(folders) == 4  # three roles and the default
    for name in names:
        rollout = json.loads((out / "rollouts" / slug(name) / "p0.json").read_text())
        assert rollout["condition"] == name
        assert (out / "vectors" / "roles" / f"{slug(name)}.safetensors").is_file()
    index = json.loads((out / "vectors" / "index.json").read_text())
    assert index["n_roles_kept"] == 3 and len(list((out / "vectors" / "roles").iterdir())) == 3


def test_a_refused_role_name_writes_nothing(tmp_path: Path, tiny_llama) -> None:
    """The corrected rerun is not refused as 'started with other settings': no manifest was left."""
    roles = tmp_path / "roles"
    roles.mkdir()
    (roles / "a.json").write_text(json.dumps({**ROLE, "name": "default"}))
    (roles / "b.json").write_text(
        json.dumps({**ROLE, "name": "baker", "system_prompts": ["You are a baker at dawn in a village."]})
    )
    out = tmp_path / "run"
    settings = RunSettings.from_preset("tiny", model="tiny", judge="none", roles_dir=str(roles), n_roles=2, n_traits=0)
    with pytest.raises(ValueError, match="is reserved"):
        Pipeline(out, settings, lm=tiny_llama, show_progress=False).run(["generate"])
    assert not out.exists()


def test_all_or_nothing_restores_replaced_files_and_removes_new_ones_and_folders(tmp_path: Path) -> None:
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    with pytest.raises(RuntimeError, match="halfway"), all_or_nothing():
        atomic_write_bytes(kept, b"new")
        atomic_write_bytes(tmp_path / "deep" / "er" / "new.txt", b"x")
        raise RuntimeError("halfway")
    assert kept.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]  # no new file, folder or temporary file
    with all_or_nothing():
        atomic_write_bytes(kept, b"new")
        atomic_write_bytes(tmp_path / "new.txt", b"x")
    assert kept.read_text() == "new" and (tmp_path / "new.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt", "new.txt"]
