"""The results page: ``results/README.md`` and one PNG per evaluation, from the JSON records in a folder.

Each record's metrics are recomputed from its raw items before anything is drawn or written; the page says whether
they matched what the evaluation stored. Every figure is listed with the model, axis, judge, settings, sample sizes,
the command that made it and the git commit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaxis.evals import capability, capping_sweep, drift, drift_predict, jailbreak, steering_sweep
from personaxis.evals.judging import relabel_record
from personaxis.evals.record import EVAL_NAMES, git_commit, read_record, write_record
from personaxis.store import atomic_write_bytes

TITLES = {
    "steering": "Steering sweep: identity labels against α",
    "drift": "Persona drift in four conversation domains",
    "drift_predict": "What predicts drift: ridge on user-message embeddings",
    "jailbreak": "Persona jailbreaks with and without capping",
    "capability": "Capability guard with and without capping",
    "capping": "Capping sweep: harmful rate against capability change",
}


@dataclass(frozen=True)
class Section:
    name: str
    record: dict[str, Any]
    figure: Path
    recomputed: str  # "match", "differ: …" or "not checked: …"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _rate(r: dict[str, Any]) -> str:
    if r.get("rate") is None:
        return f"– (0/{r['n']})"
    return f"{100 * r['rate']:.0f} % ({r['k']}/{r['n']}; {100 * r['low']:.0f}–{100 * r['high']:.0f})"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _same(stored: Any, fresh: Any, tol: float = 1e-6) -> bool:
    """Whether every stored metric equals its recomputed value (fields added by newer code are not compared)."""
    a, b = stored, fresh
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() <= b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
    return a == b


def recompute(record: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a record recomputed from its items (``None`` when that needs the embedder and it is missing)."""
    name, items, stored = record["eval"], record["items"], record["metrics"]
    if name == "steering":
        return steering_sweep.steering_metrics(items)
    if name == "drift":
        return drift.drift_metrics(items, int(stored["layer"]))
    if name == "jailbreak":
        return jailbreak.jailbreak_metrics(items)
    if name == "capability":
        return capability.capability_metrics(items, reference=stored.get("reference", "plain"))
    if name == "capping":
        return capping_sweep.sweep_metrics(items, max_capability_drop=stored["max_capability_drop"])
    if name == "drift_predict":
        try:
            embeddings = drift_predict.embed_texts([r["user"] for r in items])
        except RuntimeError:
            return None
        return drift_predict.prediction_metrics(
            items, embeddings, folds=int(stored["folds"]), seed=int(record["settings"].get("seed", 0))
        )
    raise ValueError(f"unknown evaluation {name!r}")


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "steering": steering_sweep.plot_steering,
    "drift": drift.plot_drift,
    "drift_predict": drift_predict.plot_prediction,
    "jailbreak": jailbreak.plot_jailbreak,
    "capability": capability.plot_capability,
    "capping": capping_sweep.plot_sweep,
}


# ------------------------------------------------------------------------------------------------ tables
def _steering_table(record: dict[str, Any]) -> list[str]:
    labels = record["metrics"]["labels"]
    lines = [
        "| layers | α | n | " + " | ".join(labels) + " | non-assistant (95 % CI) |",
        "|---|---:|---:|" + "---:|" * len(labels) + "---|",
    ]
    for row in record["metrics"]["by_setting"]:
        lines.append(
            f"| {','.join(map(str, row['layers']))} | {row['alpha']:+g} | {row['n']} | "
            + " | ".join(_pct(row["shares"][c]) for c in labels)
            + f" | {_rate(row['non_assistant'])} |"
        )
    return (
        lines
        + ["", "Example answers (first question, first three roles, at each α; the judge's label in brackets):", ""]
        + _examples(record)
    )


def _examples(record: dict[str, Any], per_setting: int = 3, width: int = 110) -> list[str]:
    """The answers to the first question of the first ``per_setting`` roles at each (layers, α)."""
    lines = []
    seen: dict[tuple[Any, ...], int] = {}
    for item in record["items"]:
        key = (tuple(item["layers"]), item["alpha"])
        if seen.get(key, 0) >= per_setting or item.get("question_index", 0) != 0 or item.get("prompt_index", 0) != 0:
            continue
        seen[key] = seen.get(key, 0) + 1
        text = " ".join(item["answer"].split())
        text = text[:width] + ("…" if len(text) > width else "")
        text = text.replace("|", "\\|").replace("`", "'")
        lines.append(
            f"- L{','.join(map(str, item['layers']))} α {item['alpha']:+g}, {item['role']}, “{item['question']}” "
            f"[{item.get('label')}]: {text}"
        )
    return lines


def _drift_table(record: dict[str, Any]) -> list[str]:
    lines = [
        "| domain | conversations | turn 1 mean ± sd | last turn mean ± sd | all turns mean ± sd | first→last change "
        "(mean ± sd) | slope per turn |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for domain, s in record["metrics"]["domains"].items():
        first, last, overall, change = s["per_turn"][0], s["per_turn"][-1], s["overall"], s["first_to_last"]
        lines.append(
            f"| {domain} | {s['n_conversations']} | {_num(first['mean'])} ± {_num(first['std'])} | "
            f"{_num(last['mean'])} ± {_num(last['std'])} | {_num(overall['mean'])} ± {_num(overall['std'])} | "
            f"{_num(change['mean'])} ± {_num(change['std'])} | {_num(s['slope_per_turn'], 3)} |"
        )
    refs = record.get("references") or {}
    if refs:
        lines += ["", "Reference lines: " + "; ".join(f"{k} = {v:.2f}" for k, v in refs.items()) + "."]
    return lines


def _predict_table(record: dict[str, Any]) -> list[str]:
    m = record["metrics"]
    lines = [
        "| target | cross-validated R² (embedding ridge) | R² of domain only | rows | conversations | folds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target in drift_predict.TARGETS:
        t = m[target]
        lines.append(
            f"| {target.replace('_', ' ')} | {_num(t['r2'])} | {_num(t['domain_only_r2'])} | {t['n']} | "
            f"{m['n_conversations']} | {t['folds']} |"
        )
    return lines


def _jailbreak_table(record: dict[str, Any]) -> list[str]:
    m = record["metrics"]
    labels = m["labels"]
    lines = [
        "| condition | n | harmful rate (95 % Wilson CI) | " + " | ".join(labels) + " |",
        "|---|---:|---|" + "---:|" * len(labels),
    ]
    for condition, row in m["conditions"].items():
        lines.append(
            f"| {condition} | {row['n']} | {_rate(row['harmful'])} | "
            + " | ".join(_pct(row["shares"][c]) for c in labels)
            + " |"
        )
    for p in m["paired"]:
        rel = "–" if p["relative_change"] is None else f"{100 * p['relative_change']:+.0f} %"
        lines.append(
            f"\n{p['a']} → {p['b']}: harmful {p['harmful_a']} → {p['harmful_b']} of {p['n']} paired items "
            f"(relative change {rel}; exact McNemar p = {p['mcnemar_p']:.3g}); "
            f"{p['answers_changed']} of {p['answers_compared']} answers differ at all."
        )
    return lines


def _capability_table(record: dict[str, Any]) -> list[str]:
    m = record["metrics"]
    lines = ["| condition | arithmetic | instructions | overall |", "|---|---|---|---|"]
    for condition, row in m["conditions"].items():
        lines.append(
            f"| {condition} | {_rate(row['arithmetic'])} | {_rate(row['instructions'])} | {_rate(row['overall'])} |"
        )
    for condition, c in m["change"].items():
        lines.append(
            f"\n{condition} vs {m['reference']}: overall change {_num(c['overall'])} (lost {c['lost']}, gained "
            f"{c['gained']} of {c['n_paired']}; exact McNemar p = {c['mcnemar_p']:.3g}); "
            f"{c['answers_changed']} of {c['n_paired']} answers differ at all."
        )
    lm_eval = record.get("lm_eval") or {}
    if lm_eval:
        lines.append(
            f"\nlm-eval: {lm_eval.get('status')}"
            + (f" ({lm_eval['reason']})" if lm_eval.get("reason") else "")
            + (f": `{json.dumps(lm_eval.get('results'))}`" if lm_eval.get("results") else "")
        )
    return lines


def _capping_table(record: dict[str, Any]) -> list[str]:
    m = record["metrics"]
    lines = [
        "| setting | harmful rate (95 % CI) | capability | capability change | answers changed | Pareto |",
        "|---|---|---|---:|---:|:---:|",
    ]
    for row in m["settings"]:
        lines.append(
            f"| {row['setting']} | {_rate(row['harmful'])} | {_rate(row['capability'])} | "
            f"{_num(row['capability_change'])} | {row['answers_changed']}/{row['answers_compared']} | "
            f"{'★' if row['pareto'] else ''} |"
        )
    lines.append(
        f"\nBest (lowest harmful rate losing at most {100 * m['max_capability_drop']:.0f} points of capability): "
        f"**{m['best']}**."
    )
    scored = [(r["harmful"]["rate"], r["capability_change"]) for r in m["settings"] if r["harmful"]["rate"] is not None]
    if len(scored) > 1 and len(set(scored)) == 1:
        lines.append(
            "All settings tie on both axes, so the Pareto marks and the choice of best say nothing here: at this "
            "sample size and with this judge the sweep cannot rank the settings."
        )
    return lines


TABLES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "steering": _steering_table,
    "drift": _drift_table,
    "drift_predict": _predict_table,
    "jailbreak": _jailbreak_table,
    "capability": _capability_table,
    "capping": _capping_table,
}


# ------------------------------------------------------------------------------------------------ page
def _commit_text(git: dict[str, Any] | None) -> str:
    git = git or {}
    sha = git.get("commit") or "unknown"
    return f"`{sha[:12]}`" + (" (with uncommitted changes)" if git.get("dirty") else "")


def _plain_prompt(rendered: str | None) -> str | None:
    """A template's rendered built-in system prompt without its special tokens and role headers."""
    if not rendered:
        return None
    text = re.sub(r"<\|[^|]*\|>|<[a-z_]+>", "\n", rendered)
    lines = [line.strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line and line not in ("system", "user", "assistant", "model")) or None


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())


def _section(section: Section) -> list[str]:
    r = section.record
    model = r["model"]
    axis = r.get("axis") or {}
    lines = [f"## {TITLES[section.name]}", "", f"![{section.name}]({section.figure.name})", ""]
    lines += TABLES[section.name](r)
    builtin = _plain_prompt(model.get("builtin_system_prompt"))
    lines += [
        "",
        f"- model: {model['name']} ({model['n_layers']} layers, hidden {model['hidden_size']})"
        + (f"; its chat template adds the system prompt “{builtin}” when none is given" if builtin else ""),
    ]
    if axis:
        lines.append(f"- axis: `{axis.get('path')}` (target layer {axis.get('target_layer')})")
    if r.get("judge"):
        lines.append(f"- judge: {r['judge']}")
    if r.get("user"):
        lines.append(f"- user side: {r['user']}")
    if r.get("capping"):
        lines.append(f"- capping config: `{r['capping'].get('path')}`")
    lines.append(f"- sample sizes: {_settings_text(r.get('sizes') or {})}")
    lines.append(f"- settings: {_settings_text(r.get('settings') or {})}")
    if r.get("command"):
        lines.append(f"- command: `{r['command']}`")
    lines.append(
        f"- commit: {_commit_text(r.get('git'))}; created {r.get('created')}; metrics recomputed from the raw "
        f"items: {section.recomputed}; raw answers and labels: [`{section.name}.json`]({section.name}.json)"
    )
    return lines + [""]


def build_results(folder: str | Path, *, relabel: str | None = None) -> Path:
    """Recompute, redraw and write ``FOLDER/README.md`` for every ``<eval>.json`` in the folder.

    ``relabel`` (a judge spec) first labels the stored answers again and rewrites those records with the new labels
    and metrics, without generating anything.
    """
    folder = Path(folder)
    sections = []
    for name in EVAL_NAMES:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        record = read_record(path)
        if relabel is not None and relabel_record(record, relabel):
            metrics = recompute(record)
            assert metrics is not None
            record["metrics"] = metrics
            write_record(record, folder)
        fresh = recompute(record)
        if fresh is None:
            status = "not checked (the sentence encoder is unavailable)"
        elif _same(record["metrics"], fresh):
            status = "match"
        else:
            status = "DIFFER — the page shows the recomputed metrics"
        if fresh is not None:
            record = {**record, "metrics": fresh}
        figure = PLOTS[name](record, folder / f"{name}.png")
        sections.append(Section(name, record, figure, status))
    if not sections:
        raise FileNotFoundError(f"{folder}: no evaluation results (*.json from `personaxis eval ...`) found")
    page = [
        "# personaxis evaluation results",
        "",
        f"Generated by `personaxis eval results --dir {folder}` at commit {_commit_text(git_commit())}. Each "
        "section's numbers are recomputed from the raw labelled answers in its JSON file.",
        "",
        "Figures:",
        "",
    ]
    page += [
        f"- [{TITLES[s.name]}](#{TITLES[s.name].lower().replace(' ', '-').replace(':', '').replace('²', '')}) — "
        f"`{s.figure.name}` ({s.record['model']['name']}, n = {len(s.record['items'])} records)"
        for s in sections
    ]
    page.append("")
    for section in sections:
        page += _section(section)
    target = folder / "README.md"
    atomic_write_bytes(target, "\n".join(page).encode("utf-8"))
    return target
