"""``personaxis serve``: the local web app (chat with a drift meter, persona space, transcripts, OpenAI endpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from personaxis.capping import CAPPING_NAMES
from personaxis.commands import echo_err, user_errors

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def find_capping(run_dir: Path) -> Path | None:
    """The capping config that `personaxis calibrate` left beside the run's axis, if any."""
    for name in CAPPING_NAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def load_capping(path: Path | None) -> Any | None:
    if path is None:
        return None
    from personaxis.capping import CappingConfig

    return CappingConfig.load(path)


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        run: Path = typer.Option(Path("runs/quick"), "--run", "-r", help="Run directory: axis.safetensors, summary.json, "
                                 "rollouts, and a capping config beside them."),
        axis: Path | None = typer.Option(None, "--axis", help="Axis file (default: RUN/axis.safetensors)."),
        model: str = typer.Option("embedded", help="'embedded' (SmolLM2-135M-Instruct) or a local model folder / cached id."),
        capping: Path | None = typer.Option(None, "--capping", help="Capping config (default: RUN/capping.safetensors "
                                            "if present)."),
        cap: str | None = typer.Option(None, "--cap", help="Capping experiment applied by default on /v1 (e.g. "
                                       "layers_22:26-p0.25), or 'auto': guard mode, capping only while drifting."),
        guard_experiment: str | None = typer.Option(None, "--guard-experiment", help="Experiment guard mode switches "
                                                    "on (default: --cap if an experiment, else the first one capping "
                                                    "the monitored layer)."),
        guard_window: int = typer.Option(8, "--guard-window", help="Tokens whose mean projection guard mode watches."),
        guard_hysteresis: float | None = typer.Option(None, "--guard-hysteresis", help="Margin above the floor that "
                                                      "switches capping off again (default: 5 percent of the residual norm)."),
        max_batch: int = typer.Option(32, "--max-batch", help="Requests decoded side by side (1: one at a time)."),
        max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting for a row; more get 429."),
        kv_budget_mb: float = typer.Option(1024.0, "--kv-budget-mb", help="Key/value cache of the running batch."),
        timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may take, waiting included."),
        alpha: float = typer.Option(0.0, "--alpha", help="Steering coefficient applied by default on /v1 (fraction of "
                                    "the residual norm)."),
        layer: int | None = typer.Option(None, "--layer", help="Monitored and steered layer (default: the axis' target)."),
        transcripts: Path | None = typer.Option(None, "--transcripts", help="Folder of transcript JSON files to offer "
                                                "(default: RUN/transcripts)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback only unless you say so)."),
        port: int = typer.Option(8000, "--port", "-p"),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Longest answer a request may ask for."),
        max_upload_mb: float = typer.Option(2.0, "--max-upload-mb", help="Largest request body (transcript upload)."),
    ) -> None:
        """Start the web app: chat with a live drift chart, capping switch and steering slider; the persona space;
        transcripts side by side; an OpenAI-compatible endpoint at /v1/chat/completions. API reference at /docs.

        Example: `personaxis serve --run runs/quick`, then open http://127.0.0.1:8000.
        """
        import uvicorn

        from personaxis.axis import Axis
        from personaxis.models import load_model
        from personaxis.web.app import create_app
        from personaxis.web.limits import Limits

        with user_errors():
            axis_path = axis or run / "axis.safetensors"
            if not axis_path.is_file():
                raise FileNotFoundError(f"no axis at {axis_path}: run `personaxis run --out {run}` first, or give --axis")
            loaded_axis = Axis.load(axis_path)
            capping_path = capping or find_capping(run)
            config = load_capping(capping_path)
            if cap is not None and config is None:
                raise ValueError(f"--cap {cap}: no capping config (run `personaxis calibrate --run {run}` or give --capping)")
            if max_new_tokens < 1 or max_upload_mb <= 0:
                raise ValueError("--max-new-tokens and --max-upload-mb must be positive")
            if max_batch < 1 or max_queue < 0 or kv_budget_mb <= 0 or timeout <= 0 or guard_window < 1:
                raise ValueError("--max-batch, --kv-budget-mb, --timeout and --guard-window must be positive, "
                                 "--max-queue at least 0")
            from personaxis.web.batcher import BatcherConfig

            batcher = BatcherConfig(max_batch=max_batch, max_queue=max_queue,
                                    kv_budget_bytes=int(kv_budget_mb * 1024 * 1024), timeout_s=timeout)
            echo_err(f"loading model {model}…")
            lm = load_model(None if model == "embedded" else model, target_layer=loaded_axis.target_layer)
            limits = Limits(max_body_bytes=int(max_upload_mb * 1024 * 1024), max_new_tokens=max_new_tokens)
            allowed = [*LOOPBACK, "[::1]"] if host in LOOPBACK else None
            web = create_app(lm, loaded_axis, config, run if run.is_dir() else None, transcripts_dir=transcripts,
                             layer=layer, default_cap=cap, default_alpha=alpha, limits=limits, allowed_hosts=allowed,
                             batcher=batcher, guard_experiment=guard_experiment, guard_window=guard_window,
                             guard_hysteresis=guard_hysteresis)
        if host not in LOOPBACK:
            echo_err(f"warning: serving on {host}: anyone who can reach this address can use the model")
        shown = f"[{host}]" if ":" in host else host
        echo_err(f"axis {axis_path} (layer {web.state.px.service.layer}); capping: {capping_path or 'none'}")
        typer.echo(f"personaxis serving on http://{shown}:{port}  (API reference: http://{shown}:{port}/docs)")
        uvicorn.run(web, host=host, port=port, log_level="warning")
