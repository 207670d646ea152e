"""Subcommands of ``personaxis``: each module defines ``register(app: typer.Typer) -> None``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer


# Errors that mean "bad input or state", shown as one clear line instead of a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from personaxis.axis import AxisError
    from personaxis.chat import ConversationError
    from personaxis.data import CatalogueError
    from personaxis.interventions import VectorError
    from personaxis.judges.client import JudgeRequestError
    from personaxis.models import ModelLoadError
    from personaxis.store import RunDirError

    return (
        AxisError,
        ConversationError,
        CatalogueError,
        VectorError,
        ModelLoadError,
        RunDirError,
        ValueError,
        IndexError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        FileExistsError,
        JudgeRequestError,
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:1999] + "…"


def _close_progress_bars() -> None:
    """Close the progress bars an error left open, so that the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn known input errors into one ``error: …`` line on stderr and exit code 2."""
    try:
        yield
    except RecursionError:
        _close_progress_bars()
        typer.echo(
            "error: the input is nested too deeply to read (a JSON file or value nested thousands of levels)", err=True
        )
        raise typer.Exit(2) from None
    except _user_errors() as exc:
        _close_progress_bars()
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(2) from None


def echo_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
