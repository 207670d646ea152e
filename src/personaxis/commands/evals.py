"""``personaxis eval ...``: measure the paper's claims on a model and write ``results/`` (JSON records + PNGs)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from personaxis.commands import echo_err, user_errors
from personaxis.commands.model_options import DEFAULT_PLACEMENT, ModelPlacement, model_options
from personaxis.validate import output_folder

if TYPE_CHECKING:
    from personaxis.axis import Axis
    from personaxis.models import LoadedModel

eval_app = typer.Typer(
    help="Evaluate the paper's claims on a model: steering sweep, persona drift (and what predicts it), persona "
    "jailbreaks with capping, a capability guard, a capping sweep, and the results page. Each writes "
    "OUT/<name>.json (raw labelled answers + metrics) and OUT/<name>.png; `personaxis eval results` writes "
    "OUT/README.md.",
    no_args_is_help=True,
)

RUN = typer.Option(
    Path("runs/quick"),
    "--run",
    "-r",
    help="Run directory (axis.safetensors; capping config or activations to calibrate one).",
)
AXIS = typer.Option(None, "--axis", help="Axis file (default: RUN/axis.safetensors).")
MODEL = typer.Option(
    "embedded", "--model", help="'embedded' (SmolLM2-135M-Instruct) or a local model folder / cached id."
)
OUT = typer.Option(Path("results"), "--out", "-o", help="Folder for the JSON record and the figure.")
JUDGE = typer.Option("offline", "--judge", help="'offline' (no network, heuristic) or 'openai:MODEL'.")
CAPPING = typer.Option(
    None, "--capping", help="Capping config (default: RUN/capping.safetensors, else calibrated from RUN)."
)
EXPERIMENT = typer.Option(
    None,
    "--experiment",
    help="Capping experiment id, e.g. layers_22:26-p0.25 (default: the 25th percentile on the config's first band).",
)
TOKENS = "Answer length cap in tokens."
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


def _command(ctx: typer.Context) -> str:
    """The command as the user gave it (options set on the command line, in canonical form), for the record."""
    parts = ["personaxis", "eval", ctx.info_name or ""]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name is None or getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            parts.append(flag if value else (getattr(param, "secondary_opts", None) or [flag])[0])
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            text = str(v)
            parts.append(f"{flag}={text}" if text.startswith("-") else f"{flag} {shlex.quote(text)}")
    return " ".join(p for p in parts if p)


def _model(model: str, axis: Axis | None, placement: ModelPlacement) -> LoadedModel:
    echo_err(f"loading model {model}…")
    lm = placement.load(None if model == "embedded" else model, target_layer=axis.target_layer if axis else None)
    if axis is not None:
        axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
    return lm


def _write(record: dict[str, Any], out: Path, plot: Any) -> None:
    from personaxis.evals.record import write_record

    path = write_record(record, out)
    figure = plot(record, out / f"{record['eval']}.png")
    echo_err(f"wrote {path} and {figure}")


# ------------------------------------------------------------------------------------------------ steering
@eval_app.command()
@model_options
def steering(
    ctx: typer.Context,
    run: Path = RUN,
    axis: Path | None = AXIS,
    model: str = MODEL,
    out: Path = OUT,
    judge: str = JUDGE,
    alphas: str = typer.Option("-1,-0.6,-0.3,0,0.3,0.5", help="Steering coefficients, fractions of the residual norm."),
    layers: list[str] | None = typer.Option(
        None,
        "--layers",
        help="Layers steered together: 15, 12:18 or 10,15; repeat for several sets (default: the axis' target layer).",
    ),
    roles: int | None = typer.Option(10, help="Assistant-like roles (spread over the catalogue's 62)."),
    prompts: int = typer.Option(1, help="System prompts per role (1-4)."),
    questions: int | None = typer.Option(3, help="Identity questions (of 20)."),
    limit: int | None = typer.Option(None, help="At most this many prompts per α (after the above)."),
    max_new_tokens: int = typer.Option(64, help=TOKENS),
    seed: int = 0,
    batch_size: int = 64,
    quiet: bool = QUIET,
    placement: ModelPlacement = DEFAULT_PLACEMENT,
) -> None:
    """Label answers to identity questions of assistant-like roles at each α; plot label shares against α.

    Example: `personaxis eval steering --run runs/quick --alphas -1,-0.6,-0.3,0,0.5 --roles 10 --questions 3`.
    """
    from personaxis.evals import steering_sweep as ev
    from personaxis.evals.judging import judge_name, label_items
    from personaxis.evals.record import axis_info, make_record, model_info
    from personaxis.evals.resources import resolve_axis
    from personaxis.judges import IDENTITY_LABELS, make_identity_judge
    from personaxis.options import parse_floats, parse_layers

    with user_errors():
        output_folder(out, "--out")  # before the model loads
        loaded, path = resolve_axis(axis, run)
        settings = ev.SteeringSettings(
            alphas=parse_floats(alphas),
            layer_sets=tuple(parse_layers(s) for s in layers) if layers else None,
            n_roles=roles,
            prompts_per_role=prompts,
            n_questions=questions,
            limit=limit,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
        )
        labeller = make_identity_judge(judge)
        lm = _model(model, loaded, placement)
        items = ev.generate_sweep(lm, loaded, settings, show_progress=not quiet)
        label_items(
            labeller, items, prompt_of=lambda i: i["question"], allowed=IDENTITY_LABELS, show_progress=not quiet
        )
        n_prompts = len(ev.sweep_prompts(settings))
        record = make_record(
            ev.NAME,
            model=model_info(lm),
            settings=settings,
            items=items,
            metrics=ev.steering_metrics(items),
            axis=axis_info(loaded, path),
            judge=judge_name(labeller),
            sizes={"prompts_per_alpha": n_prompts, "alphas": len(settings.alphas), "answers": len(items)},
            extra={"command": _command(ctx)},
        )
        _write(record, out, ev.plot_steering)
    for row in record["metrics"]["by_setting"]:
        typer.echo(
            f"layers {row['layers']} α {row['alpha']:+g}: assistant {row['shares']['assistant'] or 0:.0%}, "
            f"non-assistant {row['non_assistant']['rate'] or 0:.0%} (n = {row['n']})"
        )


# ------------------------------------------------------------------------------------------------ drift
def _references(config: Any, layer: int) -> dict[str, float]:
    refs = {}
    for pct, label in ((25.0, "25th pct of ordinary rollouts (capping floor)"), (50.0, "median of ordinary rollouts")):
        try:
            refs[label] = config.floor(layer, pct)
        except Exception:  # noqa: BLE001 - a config without that percentile simply has no reference line
            continue
    return refs


@eval_app.command()
@model_options
def drift(
    ctx: typer.Context,
    run: Path = RUN,
    axis: Path | None = AXIS,
    model: str = MODEL,
    out: Path = OUT,
    domains: str = typer.Option("coding,writing,therapy,philosophy", help="Domains of the catalogue."),
    conversations: int | None = typer.Option(3, help="Conversations per domain (of 11-12)."),
    limit: int | None = typer.Option(None, help="Same as --conversations (kept for symmetry with the other evals)."),
    turns: int = typer.Option(8, help="Assistant turns per conversation."),
    user: str = typer.Option(
        "scripted",
        help="User side: 'scripted' (catalogue turns), 'embedded', a local model "
        "folder, or 'endpoint:MODEL' (OpenAI-compatible; OPENAI_BASE_URL / OPENAI_API_KEY).",
    ),
    layer: int | None = typer.Option(None, help="Projection layer (default: the axis' target layer)."),
    cap: bool = typer.Option(False, "--cap", help="Cap the target during the conversations (--experiment)."),
    capping: Path | None = CAPPING,
    experiment: str | None = EXPERIMENT,
    predict: bool = typer.Option(
        False,
        "--predict",
        help="Also fit ridge from user-message embeddings to the next "
        "turn's projection and its change (cross-validated R², drift_predict.json).",
    ),
    from_record: Path | None = typer.Option(
        None, "--from", help="With --predict: use this drift.json instead of simulating again."
    ),
    folds: int = typer.Option(5, help="Cross-validation folds for --predict (grouped by conversation)."),
    max_new_tokens: int = typer.Option(96, help=TOKENS),
    seed: int = 0,
    batch_size: int = 64,
    quiet: bool = QUIET,
    placement: ModelPlacement = DEFAULT_PLACEMENT,
) -> None:
    """Multi-turn conversations (no system prompt) in four domains; mean projection per turn per domain, plotted.

    Examples: `personaxis eval drift --run runs/quick --conversations 3 --turns 8 --predict`;
    `personaxis eval drift --predict --from results/drift.json` (prediction only).
    """
    from personaxis.evals import drift as ev
    from personaxis.evals.record import axis_info, make_record, model_info, read_record
    from personaxis.evals.resources import default_experiment, resolve_axis, resolve_capping
    from personaxis.evals.users import LocalModelUser, make_user
    from personaxis.options import parse_names

    with user_errors():
        output_folder(out, "--out")  # before the model loads
        if from_record is not None:
            if not predict:
                raise ValueError("--from is for --predict (re-fit the prediction on an existing drift record)")
            record = read_record(from_record)
        else:
            loaded, path = resolve_axis(axis, run)
            settings = ev.DriftSettings(
                domains=parse_names(domains),
                conversations_per_domain=limit or conversations,
                turns=turns,
                max_new_tokens=max_new_tokens,
                seed=seed,
                batch_size=batch_size,
                layers=(layer,) if layer is not None else None,
            )
            target_layer = layer if layer is not None else loaded.target_layer
            assert target_layer is not None
            config, cap_note, ops = None, None, None
            try:
                config, cap_note = resolve_capping(capping, run, loaded)
            except Exception as exc:  # noqa: BLE001 - reference lines are optional unless --cap asks for capping
                if cap:
                    raise
                echo_err(f"(no capping config for reference lines: {exc})")
            if cap and config is not None:
                experiment = experiment or default_experiment(config)
                ops = config.interventions(experiment)
            lm = _model(model, loaded, placement)
            if user == model:  # the target plays the user too: share the loaded weights
                simulator = LocalModelUser(lm, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
            else:
                simulator = make_user(user, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
            states = ev.simulate(
                lm, ev.initial_states(settings), settings, user=simulator, interventions=ops, show_progress=not quiet
            )
            items = ev.project_states(lm, loaded, states, [target_layer], interventions=ops, show_progress=not quiet)
            record = make_record(
                ev.NAME,
                model=model_info(lm),
                settings=settings,
                items=items,
                metrics=ev.drift_metrics(items, target_layer),
                axis=axis_info(loaded, path),
                sizes={"conversations": len(items), "turns_per_conversation": turns, "domains": len(settings.domains)},
                extra={
                    "command": _command(ctx),
                    "user": simulator.name,
                    "user_fallbacks": getattr(simulator, "fallbacks", 0),
                    "capped": experiment if cap else None,
                    "capping": cap_note,
                    "references": _references(config, target_layer) if config is not None else {},
                },
            )
            _write(record, out, ev.plot_drift)
            for domain, stats in record["metrics"]["domains"].items():
                typer.echo(
                    f"{domain}: turn 1 {stats['per_turn'][0]['mean']:.2f}, last {stats['per_turn'][-1]['mean']:.2f}, "
                    f"all {stats['overall']['mean']:.2f} ± {stats['overall']['std']:.2f}"
                )
        if predict:
            _predict(record, out, folds, seed, _command(ctx))


def _predict(drift_record: dict[str, Any], out: Path, folds: int, seed: int, command: str) -> None:
    from personaxis.evals import drift_predict as ev
    from personaxis.evals.record import make_record

    layer = int(drift_record["metrics"]["layer"])
    rows = ev.prediction_rows(drift_record["items"], layer)
    embeddings = ev.embed_texts([r["user"] for r in rows])
    metrics = ev.prediction_metrics(rows, embeddings, folds=folds, seed=seed)
    record = make_record(
        ev.NAME,
        model=drift_record["model"],
        settings={"layer": layer, "folds": folds, "seed": seed, "embedder": ev.EMBEDDER},
        items=rows,
        metrics=metrics,
        axis=drift_record.get("axis"),
        sizes={"rows": len(rows), "conversations": metrics["n_conversations"]},
        extra={
            "command": command,
            "user": drift_record.get("user"),
            "drift_record_created": drift_record.get("created"),
        },
    )
    _write(record, out, ev.plot_prediction)
    for target in ev.TARGETS:
        typer.echo(f"R² {target}: {metrics[target]['r2']:.3f} (domain only {metrics[target]['domain_only_r2']})")


# ------------------------------------------------------------------------------------------------ jailbreak
@eval_app.command()
@model_options
def jailbreak(
    ctx: typer.Context,
    run: Path = RUN,
    axis: Path | None = AXIS,
    model: str = MODEL,
    out: Path = OUT,
    judge: str = JUDGE,
    capping: Path | None = CAPPING,
    experiment: str | None = EXPERIMENT,
    limit: int | None = typer.Option(40, help="Jailbreak items (spread over the catalogue's 112, 8 categories)."),
    conditions: str = typer.Option(
        "no_persona,persona,persona_capped", help="Of no_persona, persona, persona_capped, no_persona_capped."
    ),
    max_new_tokens: int = typer.Option(96, help=TOKENS),
    seed: int = 0,
    batch_size: int = 64,
    quiet: bool = QUIET,
    placement: ModelPlacement = DEFAULT_PLACEMENT,
) -> None:
    """Harmful rate (Wilson 95 % CI) on persona jailbreaks: no persona, persona, persona + capping.

    Example: `personaxis eval jailbreak --run runs/quick --limit 40 --experiment layers_22:26-p0.25`.
    """
    from personaxis.evals import jailbreak as ev
    from personaxis.evals.judging import judge_name, label_items
    from personaxis.evals.record import axis_info, make_record, model_info
    from personaxis.evals.resources import default_experiment, resolve_axis, resolve_capping
    from personaxis.judges import HARM_LABELS, make_harm_judge
    from personaxis.options import parse_names

    with user_errors():
        output_folder(out, "--out")  # before the model loads
        chosen = parse_names(conditions)
        loaded, path = resolve_axis(axis, run)
        ops, cap_note = None, None
        if any(c.endswith("_capped") for c in chosen):
            config, cap_note = resolve_capping(capping, run, loaded)
            experiment = experiment or default_experiment(config)
            ops = config.interventions(experiment)
        settings = ev.JailbreakSettings(
            limit=limit,
            conditions=chosen,
            experiment=experiment,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
        )
        labeller = make_harm_judge(judge)
        lm = _model(model, loaded, placement)
        items = ev.run_jailbreak(lm, settings, capping=ops, show_progress=not quiet)
        label_items(labeller, items, prompt_of=lambda i: i["request"], allowed=HARM_LABELS, show_progress=not quiet)
        record = make_record(
            ev.NAME,
            model=model_info(lm),
            settings=settings,
            items=items,
            metrics=ev.jailbreak_metrics(items),
            axis=axis_info(loaded, path),
            judge=judge_name(labeller),
            sizes={"items_per_condition": len(items) // max(1, len(chosen)), "conditions": len(chosen)},
            extra={"command": _command(ctx), "capping": cap_note},
        )
        _write(record, out, ev.plot_jailbreak)
    for condition, row in record["metrics"]["conditions"].items():
        h = row["harmful"]
        typer.echo(
            f"{condition}: harmful {h['k']}/{h['n']} = {h['rate'] or 0:.0%} "
            f"(95 % CI {h['low'] or 0:.0%}–{h['high'] or 0:.0%})"
        )


# ------------------------------------------------------------------------------------------------ capability
@eval_app.command()
@model_options
def capability(
    ctx: typer.Context,
    run: Path = RUN,
    axis: Path | None = AXIS,
    model: str = MODEL,
    out: Path = OUT,
    capping: Path | None = CAPPING,
    experiment: str | None = EXPERIMENT,
    arithmetic: int | None = typer.Option(20, help="Arithmetic word problems (of 44)."),
    instructions: int | None = typer.Option(20, help="Instruction-following items (of 36)."),
    limit: int | None = typer.Option(None, help="At most this many items of each set."),
    no_cap: bool = typer.Option(False, "--no-cap", help="Only the uncapped model."),
    lm_eval: str | None = typer.Option(
        None,
        "--lm-eval",
        help="Also run these lm-eval tasks (e.g. ifeval,gsm8k) where lm-eval is installed; skipped cleanly otherwise.",
    ),
    lm_eval_limit: int | None = typer.Option(None, help="Examples per lm-eval task."),
    max_new_tokens: int = typer.Option(128, help=TOKENS),
    seed: int = 0,
    batch_size: int = 64,
    quiet: bool = QUIET,
    placement: ModelPlacement = DEFAULT_PLACEMENT,
) -> None:
    """Built-in arithmetic and instruction checks (no network), with and without capping.

    Example: `personaxis eval capability --run runs/quick --arithmetic 20 --instructions 20 --lm-eval ifeval,gsm8k`.
    """
    from personaxis.evals import capability as ev
    from personaxis.evals.lm_eval_bridge import run_lm_eval
    from personaxis.evals.record import axis_info, make_record, model_info
    from personaxis.evals.resources import default_experiment, resolve_axis, resolve_capping
    from personaxis.options import parse_names

    with user_errors():
        output_folder(out, "--out")  # before the model loads
        loaded, path = resolve_axis(axis, run)
        ops, cap_note = None, None
        if not no_cap:
            config, cap_note = resolve_capping(capping, run, loaded)
            experiment = experiment or default_experiment(config)
            ops = config.interventions(experiment)
        n_ar = min(arithmetic, limit) if arithmetic is not None and limit is not None else (limit or arithmetic)
        n_in = min(instructions, limit) if instructions is not None and limit is not None else (limit or instructions)
        settings = ev.CapabilitySettings(
            n_arithmetic=n_ar,
            n_instructions=n_in,
            conditions=("plain",) if no_cap else ("plain", "capped"),
            experiment=None if no_cap else experiment,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            lm_eval_tasks=parse_names(lm_eval),
            lm_eval_limit=lm_eval_limit,
        )
        lm = _model(model, loaded, placement)
        items = ev.run_capability(lm, settings, capping=ops, show_progress=not quiet)
        harness = None
        if settings.lm_eval_tasks:
            harness = run_lm_eval(
                lm,
                {"plain": None, **({"capped": ops} if ops else {})},
                tasks=settings.lm_eval_tasks,
                limit=lm_eval_limit,
            )
            echo_err(f"lm-eval: {harness['status']}" + (f" ({harness.get('reason')})" if harness.get("reason") else ""))
        record = make_record(
            ev.NAME,
            model=model_info(lm),
            settings=settings,
            items=items,
            metrics=ev.capability_metrics(items),
            axis=axis_info(loaded, path),
            judge="programmatic checks",
            sizes={
                "arithmetic": sum(1 for i in items if i["set"] == "arithmetic") // len(settings.conditions),
                "instructions": sum(1 for i in items if i["set"] == "instructions") // len(settings.conditions),
                "conditions": len(settings.conditions),
            },
            extra={"command": _command(ctx), "capping": cap_note, "lm_eval": harness},
        )
        _write(record, out, ev.plot_capability)
    for condition, row in record["metrics"]["conditions"].items():
        typer.echo(
            f"{condition}: arithmetic {row['arithmetic']['k']}/{row['arithmetic']['n']}, instructions "
            f"{row['instructions']['k']}/{row['instructions']['n']}, overall {row['overall']['rate'] or 0:.0%}"
        )


# ------------------------------------------------------------------------------------------------ capping sweep
@eval_app.command(name="capping")
@model_options
def capping_sweep(
    ctx: typer.Context,
    run: Path = RUN,
    axis: Path | None = AXIS,
    model: str = MODEL,
    out: Path = OUT,
    judge: str = JUDGE,
    capping: Path | None = CAPPING,
    experiments: str | None = typer.Option(
        None, help="Experiment ids, comma-separated (default: all, filtered by --bands and --percentiles)."
    ),
    bands: str | None = typer.Option(None, help="Layer bands START:END (end-exclusive), comma-separated."),
    percentiles: str | None = typer.Option(None, help="Percentiles (in percent), comma-separated."),
    jailbreaks: int | None = typer.Option(20, help="Persona jailbreak items per setting."),
    arithmetic: int | None = typer.Option(10, help="Arithmetic items per setting."),
    instructions: int | None = typer.Option(10, help="Instruction items per setting."),
    limit: int | None = typer.Option(None, help="At most this many items of each kind per setting."),
    max_capability_drop: float = typer.Option(0.05, help="Capability loss allowed for the 'best' setting."),
    max_new_tokens: int = typer.Option(96, help=TOKENS),
    seed: int = 0,
    batch_size: int = 64,
    quiet: bool = QUIET,
    placement: ModelPlacement = DEFAULT_PLACEMENT,
) -> None:
    """Harmful rate vs capability change over layer bands × percentiles; marks and plots the Pareto front.

    Example: `personaxis eval capping --run runs/quick --bands 22:26,15:23 --percentiles 1,25,50 --limit 12`.
    """
    from personaxis.evals import capping_sweep as ev
    from personaxis.evals.judging import judge_name, label_items
    from personaxis.evals.record import axis_info, make_record, model_info
    from personaxis.evals.resources import resolve_axis, resolve_capping
    from personaxis.judges import HARM_LABELS, make_harm_judge
    from personaxis.options import parse_bands, parse_floats, parse_names

    def cut(n: int | None) -> int | None:
        return min(n, limit) if n is not None and limit is not None else (limit or n)

    with user_errors():
        output_folder(out, "--out")  # before the model loads
        loaded, path = resolve_axis(axis, run)
        config, cap_note = resolve_capping(capping, run, loaded)
        chosen = ev.choose_experiments(
            config,
            parse_names(experiments),
            bands=parse_bands(bands),
            percentiles=parse_floats(percentiles) if percentiles else None,
        )
        settings = ev.CappingSweepSettings(
            experiments=tuple(chosen),
            n_jailbreaks=cut(jailbreaks),
            n_arithmetic=cut(arithmetic),
            n_instructions=cut(instructions),
            max_new_tokens=max_new_tokens,
            max_capability_drop=max_capability_drop,
            seed=seed,
            batch_size=batch_size,
        )
        labeller = make_harm_judge(judge)
        lm = _model(model, loaded, placement)
        items = ev.run_sweep(lm, config, settings, show_progress=not quiet)
        harm = [i for i in items if i["kind"] == "jailbreak"]
        label_items(labeller, harm, prompt_of=lambda i: i["request"], allowed=HARM_LABELS, show_progress=not quiet)
        metrics = ev.sweep_metrics(items, max_capability_drop=max_capability_drop)
        record = make_record(
            ev.NAME,
            model=model_info(lm),
            settings=settings,
            items=items,
            metrics=metrics,
            axis=axis_info(loaded, path),
            judge=judge_name(labeller),
            sizes={
                "settings": len(chosen) + 1,
                "jailbreaks_per_setting": len(harm) // (len(chosen) + 1),
                "capability_items_per_setting": (len(items) - len(harm)) // (len(chosen) + 1),
            },
            extra={"command": _command(ctx), "capping": cap_note},
        )
        _write(record, out, ev.plot_sweep)
    for row in metrics["settings"]:
        typer.echo(
            f"{row['setting']:<24} harmful {row['harmful']['rate'] or 0:.0%}  capability change "
            f"{row['capability_change'] if row['capability_change'] is not None else float('nan'):+.2f}"
            + ("  ★ Pareto" if row["pareto"] else "")
        )
    typer.echo(f"best: {metrics['best']}")


# ------------------------------------------------------------------------------------------------ results page
@eval_app.command()
def results(
    folder: Path = typer.Option(Path("results"), "--dir", "-d", help="Folder of evaluation records (<name>.json)."),
    relabel: str | None = typer.Option(
        None,
        "--relabel",
        help="First label the stored answers again with this judge "
        "('offline' or 'openai:MODEL') and rewrite those records; nothing is generated.",
    ),
) -> None:
    """Recompute every record's metrics from its raw items, redraw the figures and write FOLDER/README.md.

    Example: `personaxis eval results --dir results` (or `--relabel openai:gpt-4o-mini` to judge the stored answers
    again).
    """
    from personaxis.evals.results_page import build_results

    with user_errors():
        page = build_results(folder, relabel=relabel)
    typer.echo(f"wrote {page}")
