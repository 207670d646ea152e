"""``personaxis calibrate``, ``personaxis export`` and ``personaxis import``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from personaxis.commands import echo_err, user_errors
from personaxis.commands.model_options import DEFAULT_PLACEMENT, ModelPlacement, model_options
from personaxis.io.run_layout import RunLayout
from personaxis.io.tensor_files import load_axis, save_axis, save_capping
from personaxis.options import parse_bands, parse_floats, parse_range

if TYPE_CHECKING:
    from personaxis.axis import Axis
    from personaxis.capping import CappingConfig


def _print_thresholds(config: CappingConfig) -> None:
    from personaxis.capping import parse_experiment_id

    assert config.thresholds is not None and config.percentiles is not None
    pcts = list(config.percentiles)
    header = "".join(f"{f'p{p:g}':>10}" for p in pcts)
    bands = []
    for exp_id in config.experiment_ids:
        parsed = parse_experiment_id(exp_id)
        if parsed and (parsed[0], parsed[1]) not in bands:
            bands.append((parsed[0], parsed[1]))
    typer.echo(f"{'band':<14}{header}   (mean τ over the band's layers)")
    for start, end in bands:
        means = config.thresholds[:, start:end].mean(dim=1)
        typer.echo(f"{f'layers {start}:{end}':<14}" + "".join(f"{float(m):>10.3f}" for m in means))
    layers = sorted({cv.layer for cv in config.vectors.values()})
    typer.echo(f"\n{'layer':<14}{header}")
    for layer in layers:
        typer.echo(f"{layer:<14}" + "".join(f"{float(config.thresholds[i, layer]):>10.3f}" for i in range(len(pcts))))


def _with_measured_norms(axis: Axis, model: str | None, placement: ModelPlacement) -> Axis:
    """The axis with the residual norms of ``model`` (the embedded one when ``model`` is None or 'embedded')."""
    from dataclasses import replace

    from personaxis.steering import measure_residual_norms

    name = model or "embedded"
    echo_err(f"loading model {name}…")
    lm = placement.load(None if name == "embedded" else name, target_layer=axis.target_layer)
    axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
    norms = measure_residual_norms(lm, show_progress=True)
    echo_err(f"residual norms measured on {lm.profile.name}: {float(norms.min()):.3g}..{float(norms.max()):.3g}")
    return replace(axis, residual_norms=norms, metadata={**axis.metadata, "residual_norms_from": lm.profile.name})


def register(app: typer.Typer) -> None:
    @app.command()
    def calibrate(
        run: Path = typer.Option(..., "--run", help="Run directory made by `personaxis run` (needs its activations)."),
        axis: Path | None = typer.Option(
            None, "--axis", help="Axis file (default: RUN/axis.safetensors); ours or a reference .pt."
        ),
        percentiles: str = typer.Option(
            "1,25,50,75", help="Percentiles (in percent) of the projections to use as floors."
        ),
        bands: str | None = typer.Option(
            None,
            help="Layer bands START:END (end-exclusive), comma-separated; default: "
            "the paper's bands scaled to the model, plus a few widths.",
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Capping config to write (default: RUN/capping.safetensors)."
        ),
        reference_out: Path | None = typer.Option(
            None, "--reference-out", help="Also write the reference torch format (.pt)."
        ),
    ) -> None:
        """Per-layer capping thresholds from a run's ordinary rollouts, and one experiment per band and percentile.

        τ_l is a percentile of the projections onto the axis of the mean response activations of the run's role, trait and default rollouts. Experiments are named like the reference configs: `layers_22:26-p0.25` floors layers 22..25 at their 25th percentile (the paper's best percentile).

        Example: `personaxis calibrate --run runs/quick --reference-out runs/quick/capping.pt`, then `personaxis chat --cap layers_22:26-p0.25`.
        """
        from personaxis.calibration import calibrate as run_calibration
        from personaxis.store import all_or_nothing
        from personaxis.validate import check, output_file

        with user_errors():
            output_file(out, "--out")
            output_file(reference_out, "--reference-out")
            for value in parse_floats(percentiles):
                check("percentile", value, option="--percentiles")
            config = run_calibration(run, axis, parse_floats(percentiles), parse_bands(bands))
            with all_or_nothing():  # both files, or neither
                target = save_capping(config, out or RunLayout(run).capping)
                written = [target]
                if reference_out is not None:
                    from personaxis.interop import save_reference_capping

                    written.append(save_reference_capping(config, reference_out))
        _print_thresholds(config)
        typer.echo(
            f"\n{len(config.experiment_ids)} experiments over {config.metadata['n_rollouts']} rollouts, e.g. "
            f"{', '.join(config.experiment_ids[:3])}"
        )
        typer.echo("wrote " + ", ".join(str(p) for p in written))

    @app.command()
    def export(
        axis: Path = typer.Option(..., "--axis", help="Axis file (ours, or a reference .pt)."),
        fmt: str = typer.Option(
            ..., "--format", help="reference (torch .pt of the whole axis) or gguf (llama.cpp control vector)."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="File to write."),
        layer: int | None = typer.Option(None, "--layer", help="gguf: one layer (default: the axis's target layer)."),
        layers: str | None = typer.Option(None, "--layers", help="gguf: a layer range START:END, end-exclusive."),
        scale: float = typer.Option(
            1.0,
            "--scale",
            help="gguf: coefficient in units of the layer's mean residual norm "
            "(as `steer --alpha`); raw units with --raw.",
        ),
        raw: bool = typer.Option(
            False,
            "--raw",
            help="gguf: write scale × the stored axis row instead (the reference's units, as `steer --raw`).",
        ),
        model_hint: str | None = typer.Option(
            None, "--model-hint", help="gguf: controlvector.model_hint (default: the axis's model)."
        ),
    ) -> None:
        """Write an axis in another format: the reference torch file, or a llama.cpp control vector.

        llama.cpp adds the vector at every token: `llama-cli -m model.gguf --control-vector axis.gguf` (or `--control-vector-scaled axis.gguf 0.5`). Layer 0 cannot be addressed by llama.cpp.

        Examples: `personaxis export --axis runs/quick/axis.safetensors --format gguf --layers 12:18 --scale 0.3 --out toward.gguf`; `personaxis export --axis runs/quick/axis.safetensors --format reference --out assistant_axis.pt`.
        """
        from personaxis.validate import check_all, output_file

        with user_errors():
            check_all(scale=scale, layer=layer)
            output_file(out, "--out")
            loaded = load_axis(axis)
            if fmt == "reference":
                if layer is not None or layers is not None:
                    raise ValueError("--layer/--layers apply to --format gguf; the reference format holds every layer")
                from personaxis.interop import save_reference_axis

                save_reference_axis(loaded, out)
                typer.echo(f"wrote {out}: axis [{loaded.n_layers}, {loaded.hidden_size}] of {loaded.model}")
            elif fmt == "gguf":
                if layer is not None and layers is not None:
                    raise ValueError("give --layer or --layers, not both")
                chosen = (
                    list(range(*parse_range(layers)))
                    if layers
                    else [layer if layer is not None else loaded.target_layer]
                )
                from personaxis.interop import export_gguf

                export_gguf(loaded, out, chosen, scale=scale, raw=raw, model_hint=model_hint)
                unit = "raw units" if raw else "× mean residual norm"
                typer.echo(
                    f"wrote {out}: control vector for layer(s) {chosen[0]}..{chosen[-1]}, scale {scale:g} ({unit})"
                )
            else:
                raise ValueError(f"unknown format {fmt!r}; choose reference or gguf")

    @model_options
    def import_(
        source: Path = typer.Option(
            ..., "--from", help="Reference torch file (.pt), or a folder of them for --kind vectors."
        ),
        kind: str = typer.Option(
            ...,
            "--kind",
            help="axis, vectors, capping, or reference-run (the reference pipeline's "
            "output folder with activations/, scores/ and vectors/, into a run directory --out).",
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Our file (.safetensors), or a folder for a folder of vectors."
        ),
        model: str | None = typer.Option(
            None,
            "--model",
            help="Model name to record in the axis (and, with "
            "--measure-norms, the model to measure on: a local folder or cached id).",
        ),
        measure_norms: bool = typer.Option(
            False,
            "--measure-norms",
            help="axis: measure the model's mean residual norm "
            "per layer on ordinary answers and store it, so `steer --alpha` (norm-"
            "relative) works with the imported axis.",
        ),
        placement: ModelPlacement = DEFAULT_PLACEMENT,
    ) -> None:
        """Read a published reference file (torch pickle of tensors, loaded with weights_only=True only) into ours.

        A file that holds anything but tensors and plain containers is refused without running any of it.

        Examples: `personaxis import --from qwen-3-32b/assistant_axis.pt --kind axis --out axis.safetensors`; `personaxis import --from qwen-3-32b/capping_config.pt --kind capping --out capping.safetensors`; `personaxis import --from qwen-3-32b/role_vectors --kind vectors --out vectors/`.
        """
        from personaxis import interop
        from personaxis.store import all_or_nothing
        from personaxis.validate import output_file, output_folder, output_suffix

        with user_errors():
            if measure_norms and kind != "axis":
                raise ValueError("--measure-norms applies to --kind axis")
            if kind in ("axis", "capping") or (kind == "vectors" and not source.is_dir()):
                output_file(out, "--out")
                output_suffix(out, (".safetensors",), "--out")
            elif kind == "vectors":
                output_folder(out, "--out")
            if kind == "axis":
                loaded = interop.load_reference_axis(source, model=model)
                if measure_norms:
                    loaded = _with_measured_norms(loaded, model, placement)
                save_axis(loaded, out)
                typer.echo(f"wrote {out}: axis [{loaded.n_layers}, {loaded.hidden_size}]")
            elif kind == "capping":
                if out.suffix != ".safetensors":
                    raise ValueError(f"--out {out}: our capping configs are .safetensors files")
                config = interop.load_reference_capping(source)
                save_capping(config, out)
                typer.echo(
                    f"wrote {out}: {len(config.experiment_ids)} experiments, {len(config.vectors)} vectors "
                    f"(reference ceilings on −axis read as floors on +axis)"
                )
            elif kind == "vectors":
                files = sorted(source.glob("*.pt")) if source.is_dir() else [source]
                if not files:
                    raise FileNotFoundError(f"{source}: no .pt files")
                with all_or_nothing():  # every file of the folder, or none
                    for file in files:
                        target = out / f"{file.stem}.safetensors" if source.is_dir() else out
                        interop.import_vectors(file, target)
                typer.echo(f"wrote {len(files)} vector file(s) to {out}")
            elif kind == "reference-run":
                from personaxis.reference_run import import_reference_run

                done = import_reference_run(source, out, model=model or "unknown")
                left = f"; left out {len(done['left_out'])} role(s) without scores" if done["left_out"] else ""
                typer.echo(
                    f"wrote run directory {out}: {len(done['roles'])} roles, {done['n_units']} units{left}; next: "
                    + (
                        f"`personaxis axis --out {out}` and `personaxis space --out {out}`"
                        if done["vectors_only"]
                        else f"`personaxis vectors --out {out}` (then axis, space, calibrate)"
                    )
                )
            else:
                raise ValueError(f"unknown kind {kind!r}; choose axis, vectors, capping or reference-run")

    app.command(name="import")(import_)
