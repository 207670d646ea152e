"""``personaxis steer``, ``personaxis monitor`` and ``personaxis chat``: use an axis on a model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from personaxis.commands import echo_err, user_errors
from personaxis.commands.model_options import DEFAULT_PLACEMENT, ModelPlacement, model_options

if TYPE_CHECKING:
    from rich.console import Console

    from personaxis.axis import Axis
    from personaxis.interventions import Interventions
    from personaxis.models import LoadedModel

from personaxis.io.run_layout import CAPPING_NAMES, RunLayout, find_capping_beside
from personaxis.io.tensor_files import load_axis, load_capping

SPARKS = "▁▂▃▄▅▆▇█"
AXIS_HELP = "Axis file (.safetensors, or a reference .pt), or a run directory holding axis.safetensors."
RAW_HELP = (
    "Take --alpha in the reference implementation's units: α × the stored axis row (as `export --raw` and "
    "reference notebooks), not a fraction of the residual norm."
)
MODEL_HELP = "'embedded' (SmolLM2-135M-Instruct) or a local model folder / cached id (default: the run's model)."


# ------------------------------------------------------------------------------------------------ shared helpers
@dataclass
class _Setup:
    lm: LoadedModel
    axis: Axis
    run_dir: Path | None


def _axis_file(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        file = RunLayout(path).axis
        if not file.is_file():
            raise FileNotFoundError(
                f"{path}: no axis.safetensors in this folder (make one with `personaxis run --out {path}`)"
            )
        return file, path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such axis file or run directory")
    return path, None


def _setup(axis_path: Path, model: str | None, placement: ModelPlacement) -> _Setup:

    file, run_dir = _axis_file(axis_path)
    axis = load_axis(file)
    if model is None and run_dir is not None and RunLayout(run_dir).manifest.is_file():
        model = json.loads(RunLayout(run_dir).manifest.read_text()).get("settings", {}).get("model")
    name = model or "embedded"
    echo_err(f"loading model {name}…")
    lm = placement.load(None if name == "embedded" else name, target_layer=axis.target_layer)
    axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
    return _Setup(lm, axis, run_dir)


def _capping(path: Path | None, run_dir: Path | None) -> Any | None:
    """A CappingConfig from ``path`` (a file or a run directory), else the one beside the run's axis, else None."""
    folder = path if path is not None and path.is_dir() else (run_dir if path is None else None)
    if folder is not None:
        found = find_capping_beside(folder)
        if found is None and path is not None:
            raise FileNotFoundError(
                f"{path}: no capping config in this folder ({', '.join(CAPPING_NAMES)}); make one "
                f"with `personaxis calibrate --run {path}`"
            )
        path = found
    if path is None:
        return None
    return load_capping(path)


def _floor(config: Any | None, layer: int, experiment: str | None = None) -> float | None:
    """The calibrated floor at ``layer``: the experiment's percentile, else the 25th (the paper's best)."""
    if config is None:
        return None
    percentile = 25.0
    if experiment:
        from personaxis.capping import parse_experiment_id

        parsed = parse_experiment_id(experiment)
        if parsed:
            percentile = parsed[2]
    try:
        return float(config.floor(layer, percentile))
    except (ValueError, TypeError, IndexError):
        return None


def sparkline(values: Sequence[float | None], floor: float | None = None) -> str:
    """One block character per value, scaled between the smallest and largest (and the floor, when given)."""
    known = [v for v in values if v is not None] + ([floor] if floor is not None else [])
    if not known:
        return ""
    low, high = min(known), max(known)
    span = (high - low) or 1.0
    return "".join("·" if v is None else SPARKS[min(7, int((v - low) / span * 8))] for v in values)


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


# ------------------------------------------------------------------------------------------------ steer
def _steer(
    prompts: list[str],
    axis_path: Path,
    layers: list[int] | None,
    alpha: float,
    raw: bool,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    system: str | None,
    model: str | None,
    json_out: Path | None,
    placement: ModelPlacement,
) -> None:
    from rich.table import Table

    from personaxis.generation import SamplingConfig
    from personaxis.steering import describe, resolve_layers, steer
    from personaxis.validate import check_all, output_file

    check_all(alpha=alpha, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    output_file(json_out, "--json")
    setup = _setup(axis_path, model, placement)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=16)
    label = describe(setup.axis, layers, alpha, raw=raw)
    answers = steer(
        setup.lm, setup.axis, prompts, layers, alpha, config, raw=raw, system_prompt=system, show_progress=True
    )
    table = Table(title=f"Steering {label}", show_lines=True, expand=True)
    table.add_column("prompt", ratio=1, style="bold")
    table.add_column("unsteered", ratio=3)
    table.add_column(f"steered (α = {alpha:+g})", ratio=3)
    for answer in answers:
        table.add_row(answer.prompt, answer.unsteered.text, answer.steered.text)
    _console().print(table)
    if json_out is not None:
        from personaxis.store import atomic_write_json

        atomic_write_json(
            json_out,
            {
                "axis": str(axis_path),
                "layers": resolve_layers(setup.axis, layers),
                "alpha": alpha,
                "raw": raw,
                "description": label,
                "answers": [
                    {"prompt": a.prompt, "unsteered": a.unsteered.text, "steered": a.steered.text} for a in answers
                ],
            },
        )
        echo_err(f"wrote {json_out}")


# ------------------------------------------------------------------------------------------------ monitor
def _monitor(
    paths: list[Path],
    axis_path: Path,
    layers: list[int] | None,
    all_layers: bool,
    capping: Path | None,
    out: Path,
    model: str | None,
    max_tokens: int | None,
    placement: ModelPlacement,
    windows: str = "chunked",
) -> None:
    from rich.table import Table

    from personaxis.io.projection_files import plot_trajectories, write_table
    from personaxis.monitor import load_transcripts, monitor_transcripts
    from personaxis.validate import check, output_folder

    if layers and all_layers:
        raise ValueError("give --layer or --all-layers, not both")
    check("max_tokens", max_tokens)
    if windows not in ("chunked", "longest"):
        raise ValueError(f"--windows {windows!r}: choose chunked or longest")
    output_folder(out, "--out")
    transcripts = load_transcripts(paths)  # fail on bad input before loading the model
    setup = _setup(axis_path, model, placement)
    axis = setup.axis
    requested: Any = "all" if all_layers else (layers or None)
    rows = monitor_transcripts(
        setup.lm, axis, transcripts, layers=requested, max_tokens=max_tokens, show_progress=True, windows=windows
    )  # type: ignore[arg-type]
    plotted = layers[0] if layers and len(layers) == 1 else axis.target_layer
    assert plotted is not None
    if plotted not in rows[0].projections:
        plotted = next(iter(rows[0].projections))
    config = _capping(capping, setup.run_dir)
    floor = _floor(config, plotted)
    if capping is not None and floor is None:
        echo_err(f"note: the capping config has no calibrated floor at layer {plotted}; none drawn")
    info = {
        "axis": str(axis_path),
        "model": setup.lm.profile.name,
        "target_layer": axis.target_layer,
        "layers": list(rows[0].projections),
        "plotted_layer": plotted,
        "floor": floor,
        "context": max_tokens or setup.lm.profile.max_context,
        "windows": windows,
        "transcripts": [{"name": t.name, "source": t.source, **t.meta} for t in transcripts],
    }
    json_path, csv_path = write_table(rows, out, info)
    png = plot_trajectories(rows, out / "trajectory.png", layer=plotted, floor=floor)
    table = Table(title=f"Projection on the Assistant Axis at layer {plotted} (higher = more Assistant)")
    for column in ("transcript", "turns", "first", "last", "min", "trajectory", "truncated"):
        table.add_column(column, justify="left" if column in ("transcript", "trajectory") else "right")
    for t in transcripts:
        values = [r.projections[plotted] for r in rows if r.transcript == t.name]
        cut = sum(r.truncated for r in rows if r.transcript == t.name)
        table.add_row(
            t.name,
            str(len(values)),
            f"{values[0]:.2f}",
            f"{values[-1]:.2f}",
            f"{min(values):.2f}",
            sparkline(values, floor),
            str(cut),
        )
    _console().print(table)
    if floor is not None:
        typer.echo(f"capping floor at layer {plotted}: {floor:.3f}")
    typer.echo(f"wrote {json_path}, {csv_path}, {png}")


# ------------------------------------------------------------------------------------------------ chat
CHAT_HELP = "commands: /reset (new conversation), /save FILE (transcript JSON), /quit"


def _chat(
    axis_path: Path,
    model: str | None,
    layer: int | None,
    cap: str | None,
    capping: Path | None,
    alpha: float,
    steer_layers: list[int] | None,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    system: str | None,
    raw: bool,
    placement: ModelPlacement,
) -> None:
    from personaxis.generation import SamplingConfig, generate
    from personaxis.interventions import merge_interventions
    from personaxis.monitor import monitor_conversation
    from personaxis.validate import check_all

    check_all(alpha=alpha, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    setup = _setup(axis_path, model, placement)
    lm, axis = setup.lm, setup.axis
    monitored = layer if layer is not None else axis.target_layer
    assert monitored is not None
    axis.layer(monitored)
    config = _capping(capping, setup.run_dir)
    parts: list[Interventions] = []
    if cap is not None:
        if config is None:
            raise ValueError(
                f"--cap {cap}: no capping config (make one with `personaxis calibrate`, or give --capping)"
            )
        config.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
        parts.append(config.interventions(cap))
    if alpha:
        from personaxis.steering import steering_interventions

        parts.append(steering_interventions(axis, steer_layers, alpha, raw=raw))
    ops = merge_interventions(*parts)
    floor = _floor(config, monitored, cap)
    console = _console()
    steering = f"α = {alpha:+g}" + (" × axis row" if raw else "") if alpha else ""
    setting = ", ".join(x for x in (f"cap {cap}" if cap else "", steering) if x) or "no intervention"
    console.print(
        f"[bold]{lm.profile.name}[/bold] · axis layer {monitored} · {setting}"
        + (f" · floor {floor:.2f}" if floor is not None else "")
    )
    console.print(f"[dim]{CHAT_HELP}[/dim]")
    base = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = list(base)
    projections: list[float | None] = []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit", "/q"):
                break
            if command == "/reset":
                history, projections = list(base), []
                console.print("[dim](new conversation)[/dim]")
            elif command == "/save":
                if not arg.strip():
                    console.print("usage: /save FILE")
                    continue
                from personaxis.store import atomic_write_json

                target = Path(arg.strip()).expanduser()
                try:
                    atomic_write_json(
                        target,
                        {
                            "model": lm.profile.name,
                            "axis": str(axis_path),
                            "layer": monitored,
                            "cap": cap,
                            "alpha": alpha,
                            "projections": projections,
                            "conversation": history,
                        },
                    )
                except (OSError, RuntimeError) as exc:
                    console.print(f"[red]cannot save: {exc}[/red]")
                    continue
                console.print(f"[dim]saved {len(projections)} turns to {target}[/dim]")
            else:
                console.print(f"unknown command {command}; {CHAT_HELP}")
            continue
        conversation = [*history, {"role": "user", "content": line}]
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + len(projections), batch_size=1
        )
        try:
            with console.status("thinking…"):
                answer = generate(lm, [conversation], sampling, interventions=ops)[0].text
        except ValueError as exc:
            console.print(f"[red]{exc}[/red] (try /reset)")
            continue
        if not answer.strip():
            console.print("[dim](the model gave an empty answer; not added to the conversation)[/dim]")
            continue
        history = [*conversation, {"role": "assistant", "content": answer}]
        rows = monitor_conversation(lm, axis, history, layers=[monitored], interventions=ops)
        value = rows[-1].projections[monitored]
        projections.append(value)
        console.print(f"[bold cyan]assistant>[/bold cyan] {answer}", soft_wrap=True)
        below = floor is not None and value < floor
        note = " [red](below the floor)[/red]" if below else ""
        cut = " [dim](history truncated)[/dim]" if rows[-1].truncated else ""
        console.print(
            f"[dim]projection[/dim] {value:+.2f}{note}{cut}  [dim]turns[/dim] {sparkline(projections, floor)}"
        )


# ------------------------------------------------------------------------------------------------ registration
def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def steer(
        prompts: list[str] = typer.Argument(..., help="User prompts (each answered without and with steering)."),
        axis: Path = typer.Option(..., "--axis", "-x", help=AXIS_HELP),
        layer: list[int] | None = typer.Option(
            None, "--layer", "-l", help="Layer to steer at (repeat for several; default: the axis' target layer)."
        ),
        alpha: float = typer.Option(
            ...,
            "--alpha",
            "-a",
            help="Coefficient: a fraction of the layer's mean residual "
            "norm (< 0 away from the Assistant, > 0 toward it); raw units with --raw.",
        ),
        raw: bool = typer.Option(False, "--raw", help=RAW_HELP),
        max_new_tokens: int = typer.Option(96, "--max-new-tokens", "-n", help="Answer length cap in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (the default)."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed (both answers use the same one)."),
        system: str | None = typer.Option(None, "--system", help="System prompt before each user prompt."),
        model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
        json_out: Path | None = typer.Option(None, "--json", help="Also write the answers to this JSON file."),
        placement: ModelPlacement = DEFAULT_PLACEMENT,
    ) -> None:
        """Answer prompts with and without steering along the axis, side by side.

        Steering adds α · r_l · â_l to the residual stream at every token, where r_l is the layer's mean residual norm;
        with --raw it adds α times the stored axis row of that layer (the reference implementation's coefficient).

        Example: `personaxis steer --axis runs/quick --alpha -0.3 "Who are you?" "What is your name?"`
        (away from the Assistant at the target layer); `--layer 12 --layer 15 --alpha 0.2` steers at two layers.
        """
        with user_errors():
            _steer(
                prompts, axis, layer, alpha, raw, max_new_tokens, temperature, seed, system, model, json_out, placement
            )

    @app.command()
    @model_options
    def monitor(
        transcripts: list[Path] = typer.Argument(
            ..., help='Transcript JSON files ({"conversation": [{role, content}]}) or folders of them.'
        ),
        axis: Path = typer.Option(..., "--axis", "-x", help=AXIS_HELP),
        layer: list[int] | None = typer.Option(
            None, "--layer", "-l", help="Layer(s) to project at (default: the axis' target layer)."
        ),
        all_layers: bool = typer.Option(False, "--all-layers", help="Project at every layer."),
        capping: Path | None = typer.Option(
            None,
            "--capping",
            help="Capping config (or run directory) whose calibrated "
            "floor is drawn on the plot (default: the one beside a run's axis).",
        ),
        out: Path = typer.Option(
            Path("monitor"), "--out", "-o", help="Folder for projections.json, projections.csv and trajectory.png."
        ),
        model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
        max_tokens: int | None = typer.Option(
            None, "--max-tokens", help="Context to fit each pass in (default: the model's)."
        ),
        placement: ModelPlacement = DEFAULT_PLACEMENT,
        windows: str = typer.Option(
            "chunked",
            "--windows",
            help="Conversations longer than the context: 'chunked' "
            "(each turn keeps at least half a context of history; cost proportional to the "
            "transcript) or 'longest' (every turn its longest history; up to a context of "
            "re-read history per turn).",
        ),
    ) -> None:
        """Persona drift: project every assistant turn of each transcript onto the axis, in one pass per transcript.

        Conversations longer than the model's context are cut at user turns: each turn keeps as much history as fits,
        and the table flags the turns that lost some (truncated).

        Example: `personaxis monitor --axis runs/quick --out drift transcripts/*.json` writes drift/projections.csv
        and drift/trajectory.png.
        """
        with user_errors():
            _monitor(transcripts, axis, layer, all_layers, capping, out, model, max_tokens, placement, windows)

    @app.command()
    @model_options
    def chat(
        axis: Path = typer.Option(..., "--axis", "-x", help=AXIS_HELP),
        model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
        layer: int | None = typer.Option(
            None, "--layer", "-l", help="Layer whose projection is shown (default: the axis' target layer)."
        ),
        cap: str | None = typer.Option(None, "--cap", help="Capping experiment to apply, e.g. layers_12:18-p0.25."),
        capping: Path | None = typer.Option(
            None, "--capping", help="Capping config (default: the one beside a run's axis)."
        ),
        alpha: float = typer.Option(0.0, "--alpha", "-a", help="Steer by this fraction of the residual norm."),
        steer_layer: list[int] | None = typer.Option(
            None, "--steer-layer", help="Layer(s) to steer at (default: the axis' target layer)."
        ),
        max_new_tokens: int = typer.Option(160, "--max-new-tokens", "-n", help="Answer length cap in tokens."),
        temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        system: str | None = typer.Option(None, "--system", help="System prompt."),
        raw: bool = typer.Option(False, "--raw", help=RAW_HELP),
        placement: ModelPlacement = DEFAULT_PLACEMENT,
    ) -> None:
        """Chat with the model in the terminal and watch each answer's projection on the axis, turn by turn.

        Projections are measured with the same cap and steering applied. Commands: /reset, /save FILE, /quit.
        Reads standard input, so it also takes piped input.

        Example: `personaxis chat --axis runs/quick --cap layers_12:18-p0.25`; compare with `--alpha -0.3`.
        """
        with user_errors():
            _chat(
                axis,
                model,
                layer,
                cap,
                capping,
                alpha,
                steer_layer,
                max_new_tokens,
                temperature,
                seed,
                system,
                raw,
                placement,
            )
