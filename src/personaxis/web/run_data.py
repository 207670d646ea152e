"""What the pages read from disk: a run directory's summary, role prompts and sample answers, and a folder of
transcripts, at the paths of :class:`personaxis.io.run_layout.RunLayout`. Files are read leniently (a page shows what
it can of a partial or older run) rather than validated as :mod:`personaxis.io.records`. Only names the app itself listed are ever opened (no path from
a request reaches the file system)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from personaxis.io.run_layout import RunLayout, unit_key
from personaxis.web.errors import ApiError


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


class RunData:
    """A run directory (``summary.json``, ``manifest.json``, ``rollouts/``) and an optional transcripts folder."""

    def __init__(self, run_dir: str | Path | None, transcripts_dir: str | Path | None = None) -> None:
        self.root = Path(run_dir) if run_dir is not None else None
        self.layout = RunLayout(self.root) if self.root is not None else None
        self._transcripts_dir = Path(transcripts_dir) if transcripts_dir is not None else None
        self._summary: dict[str, Any] | None = None

    @property
    def transcripts_dir(self) -> Path | None:
        """The folder given, else ``RUN/transcripts``."""
        if self._transcripts_dir is not None:
            return self._transcripts_dir
        return self.layout.transcripts if self.layout is not None else None

    # --------------------------------------------------------------------------------------------- summary
    @property
    def summary(self) -> dict[str, Any] | None:
        if self._summary is None and self.layout is not None:
            data = _read_json(self.layout.summary)
            self._summary = data if isinstance(data, dict) and isinstance(data.get("roles"), list) else None
        return self._summary

    def require_summary(self) -> dict[str, Any]:
        summary = self.summary
        if summary is None:
            where = str(self.layout.summary) if self.layout is not None else "no run directory was given"
            raise ApiError(
                404,
                f"no persona space to show ({where}): run `personaxis run` first, then "
                "`personaxis serve --run RUN_DIR`",
            )
        return summary

    def reference(self) -> dict[str, Any]:
        summary = self.summary
        if not summary or not summary.get("roles"):
            return {}
        roles = [r for r in summary["roles"] if isinstance(r.get("projection"), int | float)]
        if not roles:
            return {"default_projection": summary.get("default_projection")}
        low = min(roles, key=lambda r: r["projection"])
        high = max(roles, key=lambda r: r["projection"])
        return {
            "default_projection": summary.get("default_projection"),
            "role_min": low["projection"],
            "role_min_name": low["name"],
            "role_max": high["projection"],
            "role_max_name": high["name"],
        }

    # ----------------------------------------------------------------------------------------------- roles
    def _settings(self) -> dict[str, Any]:
        manifest = _read_json(self.layout.manifest) if self.layout is not None else None
        if isinstance(manifest, dict) and isinstance(manifest.get("settings"), dict):
            return manifest["settings"]
        summary = self.summary or {}
        return summary.get("settings") if isinstance(summary.get("settings"), dict) else {}

    def role_detail(self, name: str) -> dict[str, Any]:
        summary = self.require_summary()
        entry = next((r for r in summary["roles"] if r.get("name") == name), None)
        if entry is None:
            entry = next((r for r in summary.get("dropped_roles", []) if r.get("name") == name), None)
        if entry is None:
            raise ApiError(404, f"no role named {name!r} in this run")
        description, prompts = "", []
        try:
            from personaxis.data import load_roles

            roles_dir = self._settings().get("roles_dir")
            role = load_roles(roles_dir, names=[name])[0]
            description, prompts = role.description, list(role.system_prompts)
        except (ValueError, OSError, IndexError):  # a role of another catalogue: fall back to the rollouts
            pass
        samples = self._samples(name)
        if not prompts:
            prompts = [s["system_prompt"] for s in samples if s.get("system_prompt")]
        return {
            "name": name,
            "category": str(entry.get("category", "custom")),
            "description": description,
            "system_prompts": prompts,
            "samples": samples,
            "projection": entry.get("projection"),
            "pc": list(entry.get("pc") or []),
        }

    def _samples(self, name: str, limit: int = 3) -> list[dict[str, Any]]:
        if self.layout is None:
            return []
        samples: list[dict[str, Any]] = []
        for index in range(10):
            data = _read_json(self.layout.rollouts(unit_key(name, index)))
            if not isinstance(data, dict):
                if index > 0:
                    break
                continue
            for rollout in data.get("rollouts", [])[:1]:
                if isinstance(rollout, dict) and isinstance(rollout.get("answer"), str):
                    samples.append(
                        {
                            "prompt_index": index,
                            "system_prompt": data.get("system_prompt"),
                            "question": str(rollout.get("question", "")),
                            "answer": rollout["answer"],
                        }
                    )
            if len(samples) >= limit:
                break
        return samples

    # ------------------------------------------------------------------------------------------ transcripts
    def transcript_names(self) -> dict[str, Path]:
        folder = self.transcripts_dir
        if folder is None or not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.glob("*.json")) if p.is_file() and not p.is_symlink()}

    def transcript(self, name: str) -> Any:
        path = self.transcript_names().get(name)
        if path is None:
            raise ApiError(404, f"no transcript named {name!r}")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(422, f"transcript {name!r} is not valid JSON: {exc}") from None
