"""SECURITY.md names the test behind each claim: every test and bad-input case it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_named_in_security_md_exists() -> None:
    text = " ".join((REPO / "SECURITY.md").read_text(encoding="utf-8").split())
    named = 0
    current: str | None = None
    for match in re.finditer(r"`(?:(?:tests/)?(test_\w+\.py))?(?:::(test_\w+))?`", text):
        file, test = match.groups()
        if file:
            current = file
            assert (REPO / "tests" / file).is_file(), file
        if test:
            assert current is not None, test
            assert re.search(rf"^(async )?def {test}\(", (REPO / "tests" / current).read_text(), re.M), (
                f"{current}::{test}"
            )
            named += 1
    assert named >= 30
    cases = re.findall(r"cases? ((?:`[\w-]+`(?:, | and )?)+)", text)
    ids = [i for group in cases for i in re.findall(r"`([\w-]+)`", group)]
    sources = (REPO / "tests" / "test_bad_inputs.py").read_text()
    for case in ids:
        assert f'"{case}"' in sources, case
    assert len(ids) >= 30
