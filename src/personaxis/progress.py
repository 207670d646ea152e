"""Progress bars for long work: counts, rate and time left, on stderr; silent when disabled."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(*, total: int | None, desc: str, unit: str = "it", disable: bool = False, **kwargs: Any) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=False, **kwargs)
