"""Label evaluation answers with a harm or identity judge, in one batch, keyed by each item's ``key``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from personaxis.judges import LabelItem


class Labeller(Protocol):
    name: str

    def label(self, items: Sequence[LabelItem], *, show_progress: bool = False) -> dict[str, str | None]: ...


def label_items(
    judge: Labeller,
    items: list[dict[str, Any]],
    *,
    prompt_of: Callable[[dict[str, Any]], str],
    allowed: Sequence[str],
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Set ``item["label"]`` for every item (``None`` when the judge could not label it); returns the items.

    A label outside ``allowed`` is a judge bug and raises ``ValueError``.
    """
    batch = [
        LabelItem(key=str(item["key"]), prompt=prompt_of(item), answer=str(item.get("answer", ""))) for item in items
    ]
    labels = judge.label(batch, show_progress=show_progress) if batch else {}
    for item in items:
        label = labels.get(str(item["key"]))
        if label is not None and label not in allowed:
            raise ValueError(
                f"judge {judge.name!r} returned {label!r} for {item['key']!r}; expected one of {list(allowed)}"
            )
        item["label"] = label
    return items


def judge_name(judge: Any) -> str:
    return str(getattr(judge, "name", type(judge).__name__))


# Which items of each evaluation a judge labels, and what it is shown as the prompt.
_RELABEL: dict[str, tuple[str, str, Callable[[dict[str, Any]], bool]]] = {
    "steering": ("identity", "question", lambda item: True),
    "jailbreak": ("harm", "request", lambda item: True),
    "capping": ("harm", "request", lambda item: item.get("kind") == "jailbreak"),
}


def relabel_record(record: dict[str, Any], spec: str, *, show_progress: bool = False) -> bool:
    """Label a record's stored answers again with the judge ``spec`` (in place); ``False`` if it has no judged items.

    The caller recomputes the metrics; ``record["judge"]`` becomes the new judge and ``relabelled`` notes it.
    """
    import datetime as _dt

    from personaxis.judges import HARM_LABELS, IDENTITY_LABELS, make_harm_judge, make_identity_judge

    if record.get("eval") not in _RELABEL:
        return False
    kind, field, wanted = _RELABEL[record["eval"]]
    judge = make_identity_judge(spec) if kind == "identity" else make_harm_judge(spec)
    allowed = IDENTITY_LABELS if kind == "identity" else HARM_LABELS
    items = [item for item in record["items"] if wanted(item)]
    label_items(judge, items, prompt_of=lambda item: str(item[field]), allowed=allowed, show_progress=show_progress)
    record["relabelled"] = {
        "from": record.get("judge"),
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    record["judge"] = judge_name(judge)
    return True
