"""Role descriptions for the offline judge, read from the package's role catalogue (tolerant of partial files)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

log = logging.getLogger(__name__)

NONHUMAN_CATEGORIES = frozenset({"nonhuman_collective"})


@dataclass(frozen=True)
class RoleInfo:
    name: str
    description: str = ""
    category: str = ""
    signs: str = ""  # the rubric's "Signs of the X: ..." / "such as ..." phrases, if it has them
    prompts: tuple[str, ...] = ()  # the role's system prompts, if the catalogue has it

    @property
    def nonhuman(self) -> bool:
        return self.category in NONHUMAN_CATEGORIES


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """``name -> (description, category, system prompts)`` for every readable role file; broken files are skipped."""
    found: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    try:
        folders = [resources.files("personaxis") / "data" / "roles", resources.files("personaxis") / "data" / "eval"]
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        return found
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not entry.name.endswith(".json"):
                continue
            try:
                data = json.loads(entry.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.debug("role catalogue: skipping %s (%s)", entry.name, exc)
                continue
            roles = data if isinstance(data, list) else data.get("roles", []) if isinstance(data, dict) else []
            for role in roles:
                if isinstance(role, dict) and isinstance(role.get("name"), str):
                    desc, cat = str(role.get("description", "")), str(role.get("category", ""))
                    raw = role.get("system_prompts")
                    prompts = tuple(p for p in raw if isinstance(p, str)) if isinstance(raw, list) else ()
                    found.setdefault(role["name"].strip().lower(), (desc, cat, prompts))
    return found


_SIGNS = re.compile(r"(?:signs? of (?:the |a |an )?[^:.]{0,60}:|such as)\s*([^.]*)", re.IGNORECASE)


def role_info(name: str, rubric: str = "") -> RoleInfo:
    """What the offline judge knows about a role: the catalogue's description and category, and the rubric's signs."""
    desc, cat, prompts = _catalogue().get(name.strip().lower(), ("", "", ()))
    signs = "; ".join(m.group(1).strip() for m in _SIGNS.finditer(rubric or ""))
    return RoleInfo(name=name, description=desc, category=cat, signs=signs, prompts=prompts)


def catalogue_roles() -> list[RoleInfo]:
    """Every role of the catalogue (name, description, category, prompts), sorted by name."""
    return [RoleInfo(name=n, description=d, category=c, prompts=p) for n, (d, c, p) in sorted(_catalogue().items())]
