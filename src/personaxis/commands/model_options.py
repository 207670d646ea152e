"""The options of every command that loads a model, defined once: ``--device``, ``--dtype``, ``--allow-download``
and ``--trust-remote-code``.

A command takes them by declaring a keyword parameter ``placement: ModelPlacement`` and the decorator
:func:`model_options`: the decorator replaces that parameter with the four options on the command line and hands the
command one :class:`personaxis.models.ModelPlacement` built from them (checked when the model is loaded).

    @app.command()
    @model_options
    def steer(..., placement: ModelPlacement) -> None:
        lm = placement.load(model_name)
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from personaxis.models import ModelPlacement

F = TypeVar("F", bound=Callable[..., Any])

DEVICE_HELP = "Where to run the model: auto (CUDA if present, else MPS, else CPU), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "Model weights' dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16."
DOWNLOAD_HELP = "Fetch a model id missing from the local cache from the Hugging Face Hub (off: nothing is downloaded)."
REMOTE_CODE_HELP = "Run the Python code a model repository ships (transformers' trust_remote_code; off by default)."

_OPTIONS: dict[str, tuple[Any, Any]] = {
    "device": (Annotated[str | None, typer.Option("--device", help=DEVICE_HELP, rich_help_panel="Model")], None),
    "dtype": (Annotated[str | None, typer.Option("--dtype", help=DTYPE_HELP, rich_help_panel="Model")], None),
    "allow_download": (
        Annotated[bool, typer.Option("--allow-download", help=DOWNLOAD_HELP, rich_help_panel="Model")],
        False,
    ),
    "trust_remote_code": (
        Annotated[bool, typer.Option("--trust-remote-code", help=REMOTE_CODE_HELP, rich_help_panel="Model")],
        False,
    ),
}


def model_options(command: F) -> F:
    """Give ``command`` the shared model options in place of its ``placement: ModelPlacement`` parameter."""
    hints = typing.get_type_hints(command, include_extras=True)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(command).parameters.values()
        if p.name != "placement"
    ]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in _OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        placement = ModelPlacement(**{name: kwargs.pop(name) for name in _OPTIONS})
        return command(*args, placement=placement, **kwargs)

    wrapper.__signature__ = inspect.Signature([*params, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, **{n: a for n, (a, _) in _OPTIONS.items()}}
    return wrapper  # type: ignore[return-value]


# The default of a command's ``placement`` parameter (the decorator always passes one built from the options).
DEFAULT_PLACEMENT = ModelPlacement()
