"""Option parsing shared by the CLI and the evaluations: numbers, names, layers and layer bands from text.

Bands are ``(start, end)`` pairs, end-exclusive, everywhere in personaxis — as in the reference's experiment ids
(``layers_46:54-p0.25`` caps layers 46..53) and on the command line (``--bands 22:26,15:23``).
"""

from __future__ import annotations

Band = tuple[int, int]


def parse_floats(text: str) -> tuple[float, ...]:
    """``"1,25,50"`` → ``(1.0, 25.0, 50.0)``; at least one number."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"expected comma-separated numbers, got {text!r}")
    return values


def parse_names(text: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``; nothing for ``None`` or an empty text."""
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def parse_range(text: str) -> Band:
    """``"22:26"`` → ``(22, 26)``, end-exclusive and not empty."""
    try:
        start, end = (int(x) for x in text.strip().split(":"))
    except ValueError:
        raise ValueError(f"expected a layer range START:END (end-exclusive), got {text!r}") from None
    if end <= start:
        raise ValueError(f"layer range {text!r} is empty (END is exclusive and must exceed START)")
    return start, end


def parse_layers(text: str) -> tuple[int, ...]:
    """``"15"`` → ``(15,)``; ``"12:18"`` → 12..17 (end-exclusive); ``"10,15"`` → ``(10, 15)``; duplicates dropped."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if ":" in part:
            start, end = parse_range(part)
            out.extend(range(start, end))
        elif part:
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(
                    f"expected a layer, a range START:END (end-exclusive) or a list, got {text!r}"
                ) from None
    if not out:
        raise ValueError(f"no layer in {text!r}")
    return tuple(dict.fromkeys(out))


def parse_bands(text: str | None) -> list[Band] | None:
    """``"22:26,15:23"`` → ``[(22, 26), (15, 23)]`` (start, end-exclusive); ``None`` for no text."""
    if not text:
        return None
    return [parse_range(part) for part in text.split(",")]
