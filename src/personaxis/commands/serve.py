"""``personaxis serve``: the local web app (chat with a drift meter, persona space, transcripts, OpenAI endpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from personaxis.commands import echo_err, user_errors
from personaxis.commands.model_options import DEFAULT_PLACEMENT, ModelPlacement, model_options
from personaxis.io.run_layout import RunLayout
from personaxis.io.tensor_files import load_axis, load_capping

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_capping_if_given(path: Path | None) -> Any | None:
    if path is None:
        return None

    return load_capping(path)


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def serve(
        run: Path = typer.Option(
            Path("runs/quick"),
            "--run",
            "-r",
            help="Run directory: axis.safetensors, summary.json, rollouts, and a capping config beside them.",
        ),
        axis: Path | None = typer.Option(None, "--axis", help="Axis file (default: RUN/axis.safetensors)."),
        model: str = typer.Option(
            "embedded", help="'embedded' (SmolLM2-135M-Instruct) or a local model folder / cached id."
        ),
        capping: Path | None = typer.Option(
            None, "--capping", help="Capping config (default: RUN/capping.safetensors if present)."
        ),
        cap: str | None = typer.Option(
            None,
            "--cap",
            help="Capping experiment applied by default on /v1 (e.g. "
            "layers_22:26-p0.25), or 'auto': guard mode, capping only while drifting.",
        ),
        guard_experiment: str | None = typer.Option(
            None,
            "--guard-experiment",
            help="Experiment guard mode switches "
            "on (default: --cap if an experiment, else the first one capping "
            "the monitored layer).",
        ),
        guard_window: int = typer.Option(8, "--guard-window", help="Tokens whose mean projection guard mode watches."),
        guard_hysteresis: float | None = typer.Option(
            None,
            "--guard-hysteresis",
            help="Margin above the floor that switches capping off again (default: 5 percent of the residual norm).",
        ),
        max_batch: int = typer.Option(32, "--max-batch", help="Requests decoded side by side (1: one at a time)."),
        max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting for a row; more get 429."),
        kv_budget_mb: float = typer.Option(1024.0, "--kv-budget-mb", help="Key/value cache of the running batch."),
        timeout: float = typer.Option(
            300.0,
            "--request-timeout",
            "--timeout",
            help="Seconds a request may take, waiting included; later it ends with a 504 (an error event when "
            "streamed) and frees its row.",
        ),
        alpha: float = typer.Option(
            0.0, "--alpha", help="Steering coefficient applied by default on /v1 (fraction of the residual norm)."
        ),
        raw: bool = typer.Option(
            False,
            "--raw",
            help="Take every α (--alpha and per request) in the reference's units: α × the stored axis row.",
        ),
        layer: int | None = typer.Option(
            None, "--layer", help="Monitored and steered layer (default: the axis' target)."
        ),
        transcripts: Path | None = typer.Option(
            None, "--transcripts", help="Folder of transcript JSON files to offer (default: RUN/transcripts)."
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback only unless you say so)."),
        port: int = typer.Option(8000, "--port", "-p"),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Longest answer a request may ask for."),
        max_upload_mb: float = typer.Option(2.0, "--max-upload-mb", help="Largest request body (transcript upload)."),
        placement: ModelPlacement = DEFAULT_PLACEMENT,
        max_request_tokens: int = typer.Option(
            32_768,
            "--max-request-tokens",
            help="Tokens one request may make the model read and write (longer requests get 413).",
        ),
    ) -> None:
        """Start the web app: chat with a live drift chart, capping switch and steering slider; the persona space;
        transcripts side by side; an OpenAI-compatible endpoint at /v1/chat/completions. API reference at /docs.

        Example: `personaxis serve --run runs/quick`, then open http://127.0.0.1:8000.
        """
        import uvicorn

        from personaxis.web.app import create_app
        from personaxis.web.limits import Limits

        with user_errors():
            from personaxis.validate import check, check_all

            check_all(port=port, alpha=alpha, max_new_tokens=max_new_tokens, max_upload_mb=max_upload_mb, layer=layer)
            check("max_tokens", max_request_tokens, option="--max-request-tokens")
            axis_path = axis or RunLayout(run).axis
            if not axis_path.is_file():
                raise FileNotFoundError(
                    f"no axis at {axis_path}: run `personaxis run --out {run}` first, or give --axis"
                )
            loaded_axis = load_axis(axis_path)
            capping_path = capping or RunLayout(run).find_capping()
            config = load_capping_if_given(capping_path)
            if cap is not None and config is None:
                raise ValueError(
                    f"--cap {cap}: no capping config (run `personaxis calibrate --run {run}` or give --capping)"
                )
            if max_batch < 1 or max_queue < 0 or kv_budget_mb <= 0 or timeout <= 0 or guard_window < 1:
                raise ValueError(
                    "--max-batch, --kv-budget-mb, --request-timeout and --guard-window must be positive, --max-queue at least 0"
                )
            from personaxis.web.batcher import BatcherConfig

            batcher = BatcherConfig(
                max_batch=max_batch,
                max_queue=max_queue,
                kv_budget_bytes=int(kv_budget_mb * 1024 * 1024),
                timeout_s=timeout,
            )
            echo_err(f"loading model {model}…")
            lm = placement.load(None if model == "embedded" else model, target_layer=loaded_axis.target_layer)
            limits = Limits(
                max_body_bytes=int(max_upload_mb * 1024 * 1024),
                max_new_tokens=max_new_tokens,
                max_request_tokens=max_request_tokens,
            )
            allowed = [*LOOPBACK, "[::1]"] if host in LOOPBACK else None
            web = create_app(
                lm,
                loaded_axis,
                config,
                run if run.is_dir() else None,
                transcripts_dir=transcripts,
                layer=layer,
                default_cap=cap,
                default_alpha=alpha,
                raw_alpha=raw,
                limits=limits,
                allowed_hosts=allowed,
                batcher=batcher,
                guard_experiment=guard_experiment,
                guard_window=guard_window,
                guard_hysteresis=guard_hysteresis,
            )
        if host not in LOOPBACK:
            echo_err(f"warning: serving on {host}: anyone who can reach this address can use the model")
        shown = f"[{host}]" if ":" in host else host
        echo_err(f"axis {axis_path} (layer {web.state.px.service.layer}); capping: {capping_path or 'none'}")
        typer.echo(f"personaxis serving on http://{shown}:{port}  (API reference: http://{shown}:{port}/docs)")
        uvicorn.run(web, host=host, port=port, log_level="warning")
