"""``personaxis run`` and the pipeline stages one by one."""

from __future__ import annotations

from pathlib import Path

import typer

from personaxis.commands import echo_err, user_errors
from personaxis.commands.model_options import DEFAULT_PLACEMENT, ModelPlacement, model_options
from personaxis.io.records import SummaryRecord
from personaxis.io.run_layout import RunLayout
from personaxis.store import read_record

STAGE_HELP = {
    "generate": "Generate role, default and trait rollouts (creates the run directory).",
    "extract": "Extract mean response activations (all layers) for every rollout.",
    "judge": "Score each role rollout 0-3 for role adherence.",
    "vectors": "Compute role vectors (per judge category), the default vector and trait vectors.",
    "axis": "Compute the Assistant Axis per layer: default minus mean role vector.",
    "space": "PCA of the role vectors, summary.json and report.html.",
}


def _settings(
    preset: str,
    model: str,
    roles: int | None,
    role: list[str] | None,
    prompts: int | None,
    questions: int | None,
    traits: int | None,
    max_new_tokens: int | None,
    judge: str | None,
    min_count: int | None,
    layer: int | None,
    roles_dir: Path | None,
    questions_file: Path | None,
    temperature: float | None,
    seed: int | None,
    batch_size: int | None,
    backend: str = "transformers",
    data: Path | None = None,
    vectors: str | None = None,
    top_p: float | None = None,
    judge_traits: bool | None = None,
    extract: str = "capture",
    rollout_weights: str = "float32",
):
    from personaxis.backends import backend_extra
    from personaxis.capture import extract_extra
    from personaxis.int8_linears import rollout_weights_extra
    from personaxis.settings import RunSettings

    extra = {"batch_size": batch_size} if batch_size is not None else {}
    extra.update(backend_extra(backend))
    extra.update(rollout_weights_extra(rollout_weights))
    if rollout_weights != "float32":
        extract = "teacher-forced"  # activations come from the float32 model, in a pass after generation
    extra.update(extract_extra(extract))
    return RunSettings.from_preset(
        preset,
        model=model,
        n_roles=roles,
        role_names=tuple(role) if role else None,
        prompts_per_role=prompts,
        n_questions=questions,
        n_traits=traits,
        max_new_tokens=max_new_tokens,
        judge=judge,
        min_count=min_count,
        target_layer=layer,
        roles_dir=str(roles_dir) if roles_dir else None,
        questions_path=str(questions_file) if questions_file else None,
        temperature=temperature,
        seed=seed,
        persona_questions_only=False if questions_file else None,
        extra=extra or None,
        data_dir=str(data) if data else None,
        vectors=vectors,
        top_p=top_p,
        judge_traits=judge_traits,
    )


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def run(
        out: Path = typer.Option(Path("runs/quick"), "--out", "-o", help="Run directory (created, or resumed)."),
        preset: str = typer.Option(
            "quick",
            help="quick (CPU, minutes; whole 64-token answers), quick-openings (8-token openings), paper (275+ roles x 5 prompts x 240 questions), tiny.",
        ),
        model: str = typer.Option(
            "embedded", help="'embedded' (SmolLM2-135M-Instruct) or a local model folder / cached id."
        ),
        roles: int | None = typer.Option(None, help="Number of roles (spread over categories)."),
        role: list[str] | None = typer.Option(None, help="Use these roles by name (repeat the flag)."),
        prompts: int | None = typer.Option(None, help="System prompts per role (1-5)."),
        questions: int | None = typer.Option(None, help="Questions per prompt."),
        traits: int | None = typer.Option(None, help="Traits to build vectors for (0 to skip)."),
        max_new_tokens: int | None = typer.Option(None, help="Answer length cap in tokens."),
        judge: str | None = typer.Option(
            None, help="'offline' (no network), 'openai:MODEL', or 'none' (keep every rollout)."
        ),
        min_count: int | None = typer.Option(None, help="Rollouts a judge category needs to make a role vector."),
        layer: int | None = typer.Option(None, help="Target layer (default: n_layers // 2)."),
        data: Path | None = typer.Option(
            None,
            "--data",
            help="The reference's data/ folder as published: roles/instructions/ "
            "(with default.json), extraction_questions.jsonl, traits/instructions/.",
        ),
        roles_dir: Path | None = typer.Option(
            None, help="Folder of role definitions (ours, or the reference <role>.json layout)."
        ),
        questions_file: Path | None = typer.Option(
            None, "--questions-file", help="JSONL of {question, id} to use instead of ours."
        ),
        vectors: str | None = typer.Option(
            None,
            "--vectors",
            help="Role vector recipe: reference (score 3 only, >= 50 "
            "rollouts; the presets' default, with the quick preset's own count), paper (score "
            "3 and score 2 vectors separately, >= 10 each; axis from score 3), pooled "
            "(score 3, else 2+3).",
        ),
        judge_traits: bool | None = typer.Option(
            None,
            "--judge-traits/--no-judge-traits",
            help="Judge trait answers 0-100 and keep pairs that differ by >= 50, >= 10 per trait (paper preset: on).",
        ),
        temperature: float | None = typer.Option(None, help="0 = greedy."),
        top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass (with temperature > 0)."),
        seed: int | None = typer.Option(None),
        batch_size: int | None = typer.Option(
            None,
            help="Rows generated together (default 64; 32 takes about 300 MB less memory and 15 % longer on a CPU).",
        ),
        backend: str = typer.Option(
            "transformers",
            help="Generation backend: transformers, or vllm (CUDA GPUs; needs the vllm extra of personaxis).",
        ),
        extract: str = typer.Option(
            "capture",
            help="Activations: 'capture' them while generating (transformers backend; other backends' rollouts are extracted afterwards), or 'teacher-forced' (a second pass over every rollout).",
        ),
        rollout_weights: str = typer.Option(
            "float32",
            help="Weights the rollouts are generated with: float32, or int8 (CPU, opt-in: 1.5-1.8x faster generation "
            "on AVX2 and AVX-512 CPUs, different tokens; activations are then extracted teacher-forced in float32, "
            "and the run's manifest records the choice).",
        ),
        ray: str | None = typer.Option(
            None,
            "--ray",
            help="Shard generation and extraction over a Ray cluster: its ADDRESS, or 'local' (needs the ray extra of personaxis).",
        ),
        gpus_per_worker: float | None = typer.Option(
            None, help="GPUs per Ray worker (default 1 when the cluster has GPUs; more for models that need several)."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        placement: ModelPlacement = DEFAULT_PLACEMENT,
    ) -> None:
        """Run the whole method: generate → extract → judge → vectors → axis → space.

        Stopped at any point (Ctrl-C, kill -9, a crash), the same command on the same --out resumes where it stopped.
        Example: `personaxis run --out runs/quick` (about 4 minutes on 2 busy CPU cores).
        """
        from personaxis.pipeline import Pipeline

        with user_errors():
            settings = _settings(
                preset,
                model,
                roles,
                role,
                prompts,
                questions,
                traits,
                max_new_tokens,
                judge,
                min_count,
                layer,
                roles_dir,
                questions_file,
                temperature,
                seed,
                batch_size,
                backend,
                data,
                vectors,
                top_p,
                judge_traits,
                extract,
                rollout_weights,
            )
            executor = None
            if ray is not None:
                from personaxis.distributed import RayExecutor

                executor = RayExecutor(ray, gpus_per_worker=gpus_per_worker, log=echo_err)
            try:
                pipeline = Pipeline(
                    out, settings, log=echo_err, show_progress=not quiet, executor=executor, placement=placement
                )
                done = pipeline.run()
            finally:
                if executor is not None:
                    executor.shutdown()
        layout = RunLayout(out)
        summary = read_record(layout.summary, SummaryRecord).to_json()
        target = summary["target"]
        echo_err(f"work done this call: {done}")
        traits = summary.get("trait_space")
        trait_line = (
            (
                f"; traits at the Assistant end: {', '.join(traits['assistant_end'][:3]) or '—'}, "
                f"at the far end: {', '.join(traits['far_end'][:3]) or '—'}"
            )
            if traits
            else ""
        )
        if settings.judge == "none":
            kept = f"{summary['n_roles_kept']} roles kept (no judge: every rollout counts; {summary['n_roles_dropped']} dropped)"
        else:
            kept = (
                f"{summary['n_roles_kept']} roles kept ({summary.get('n_roles_fell_back', 0)} fell back to scores "
                f"2+3, {summary['n_roles_dropped']} dropped; recipe {summary.get('vector_recipe', 'pooled')})"
            )
        typer.echo(
            f"{summary['model']}: {kept}; "
            f"layer {summary['target_layer']}: cos(PC1, axis) = {target['cos_pc1_axis']:.3f}, "
            f"PC1 explains {target['pc1_explained_variance']:.1%}; default at {summary['default_position']['pc1_fraction']:.2f} "
            f"of the role range along PC1{trait_line}"
        )
        typer.echo(f"wrote {layout.axis}, {layout.summary}, {layout.report}")

    for stage, help_text in STAGE_HELP.items():
        _register_stage(app, stage, help_text)


def _register_stage(app: typer.Typer, stage: str, help_text: str) -> None:
    def command(
        out: Path = typer.Option(..., "--out", "-o", help="Run directory made by `personaxis run` or `generate`."),
        preset: str = typer.Option("quick", help="Preset for a new run directory (generate only)."),
        model: str = typer.Option("embedded", help="Model for a new run directory (generate only)."),
        judge: str | None = typer.Option(None, help="Judge for a new run directory (generate only)."),
        quiet: bool = typer.Option(False, "--quiet", "-q"),
        placement: ModelPlacement = DEFAULT_PLACEMENT,
    ) -> None:
        from personaxis.pipeline import Pipeline, open_existing

        with user_errors():
            if stage == "generate" and not RunLayout(out).manifest.exists():
                settings = _settings(
                    preset, model, None, None, None, None, None, None, judge, None, None, None, None, None, None, None
                )
                pipeline = Pipeline(out, settings, log=echo_err, show_progress=not quiet, placement=placement)
            else:
                pipeline = open_existing(out, log=echo_err, show_progress=not quiet, placement=placement)
            done = pipeline.run([stage])
        typer.echo(f"{stage}: {done[stage]} unit(s) done in this call; run directory {out}")

    command.__doc__ = help_text
    app.command(name=stage)(model_options(command))
