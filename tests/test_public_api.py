"""The curated public API at the package root."""

from __future__ import annotations

import importlib
import inspect
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


def _public(kind: str) -> dict[str, object]:
    values = {name: getattr(personaxis, name) for name in personaxis.__all__ if name != "__version__"}
    return {name: v for name, v in values.items() if inspect.isclass(v) == (kind == "class")}


def _section(doc: str, title: str) -> list[str] | None:
    """The lines of a Google-style section (``Args:``), or ``None`` when the docstring has none."""
    lines = doc.splitlines()
    if f"{title}:" not in lines:
        return None
    start = lines.index(f"{title}:") + 1
    body = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        body.append(line)
    return body


def test_public_functions_document_args_and_returns() -> None:
    functions = _public("function")
    assert {"load_model", "steering_interventions", "monitor_transcripts"} <= set(functions)
    for name, fn in functions.items():
        doc = inspect.getdoc(fn) or ""
        args, returns = _section(doc, "Args"), _section(doc, "Returns")
        assert args is not None, f"{name}: no 'Args:' section"
        assert returns and any(line.strip() for line in returns), f"{name}: no 'Returns:' section"
        entries = [line.strip() for line in args if line.startswith("    ") and not line.startswith("     ")]
        documented = {entry.split(":", 1)[0] for entry in entries if ":" in entry}
        for param in inspect.signature(fn).parameters.values():
            prefix = {param.VAR_KEYWORD: "**", param.VAR_POSITIONAL: "*"}.get(param.kind, "")
            assert prefix + param.name in documented, f"{name}: parameter {param.name!r} missing from 'Args:'"


def test_public_classes_say_what_they_hold() -> None:
    for name, cls in _public("class").items():
        doc = inspect.getdoc(cls) or ""
        assert doc and not doc.startswith(f"{name}("), f"{name}: no docstring of its own (only the dataclass signature)"
