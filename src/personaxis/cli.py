"""The ``personaxis`` command. Each module in :mod:`personaxis.commands` registers its subcommands."""

from __future__ import annotations

import importlib
import pkgutil

import typer

import personaxis.commands

app = typer.Typer(
    name="personaxis",
    help=(
        "Find, watch and hold the Assistant persona of a chat model (the Assistant Axis, Lu et al. 2026).\n\n"
        "Start with `personaxis run` (the embedded SmolLM2-135M-Instruct, no network): it writes an axis, vectors, "
        "summary.json and report.html into --out. Then `steer`, `monitor`, `calibrate`, `chat`, `eval` and `serve` "
        "use that axis."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

for module in sorted(pkgutil.iter_modules(personaxis.commands.__path__), key=lambda m: m.name):
    importlib.import_module(f"personaxis.commands.{module.name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
