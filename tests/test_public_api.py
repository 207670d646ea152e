"""The curated public API at the package root."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import personaxis


def test_every_exported_name_resolves_to_its_module() -> None:
    assert set(personaxis.__all__) == {"__version__", *personaxis._EXPORTS}
    for name in personaxis.__all__:
        value = getattr(personaxis, name)
        if name == "__version__":
            assert isinstance(value, str) and value.count(".") == 2
            continue
        module = importlib.import_module(personaxis._EXPORTS[name])
        assert value is getattr(module, name), name


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        personaxis.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_package_import_does_not_load_torch() -> None:
    code = "import sys, personaxis; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_package_is_typed() -> None:
    assert (Path(personaxis.__file__).parent / "py.typed").is_file()
