"""The decode step and the prefill of the fast engine, each against what it replaced, interleaved in one process.

- **steps**: milliseconds per decode step (the prefill before them not counted) at 1, 16 and 64 rows, through the
  model's own forward (transformers' Python per block) and through personaxis' Llama-family step
  (:mod:`personaxis.generation.llama_step`) with its blocks' modules' arithmetic, which must give the same logits bit
  for bit (checked on every size), and through the step with compiled blocks
  (:mod:`personaxis.generation.fused_block`, where the compiled products run), equal to rounding (its largest
  difference from the forward's logits is recorded).
  With ``--step-from REV``, also through the step as ``llama_step.py`` was at git revision ``REV`` (loaded against
  the current package), to time a change of the step against its former self.
- **prefill**: prompts of unequal length (``run.py``'s questions, with and without a role's system prompt)
  prefilled as one left-padded forward, split into groups of similar length
  (:func:`personaxis.generation.prefill_plan.length_buckets`), and with shared prefixes chosen by cost
  (:func:`personaxis.generation.prefill_plan.prefix_groups`) instead of the former rule (16 tokens or more):
  tokens computed, padding included, and seconds.
- **generation**: whole greedy runs of ``--new-tokens`` tokens at 16 and 64 rows, before (the model's forward, one
  prefill forward, the former rule for shared prefixes) and now: new tokens/s, and whether the tokens are the same.

On a shared VM the rate of memory moves from one minute to the next: every figure is the best of ``--repeats``
interleaved runs, with the median beside it.

    python benchmarks/decode_steps.py --isa native,avx2 --json benchmarks/results-decode-steps.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ISA_ENV, benchmark_prompts, load, machine, probe_isa, rows_table  # noqa: E402

from personaxis.activations import pad_batch  # noqa: E402
from personaxis.generation import SamplingConfig, engine, generate_ids, prefill_plan  # noqa: E402
from personaxis.generation import cache as kv  # noqa: E402
from personaxis.generation.decode import CachedForward, DecodeBatch  # noqa: E402
from personaxis.generation.fused_block import unfused_blocks  # noqa: E402
from personaxis.generation.llama_step import model_forward_steps  # noqa: E402
from personaxis.generation.prefill_plan import common_prefix_length  # noqa: E402
from personaxis.models import LoadedModel, load_model  # noqa: E402

ONE_FORWARD = 10**9  # a per-forward cost that keeps every prompt of a chunk in one forward (the former prefill)
FORMER_MIN_SHARED_PREFIX = 16  # the former rule shared a prefix only from this many tokens


def interleaved(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """The seconds each run reports for itself, ``repeats`` times, in alternating order (after one untimed warm-up
    each)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(runs[name]())
    return times


def whole(fn: Callable[[], Any]) -> Callable[[], float]:
    """``fn`` timed from start to end."""

    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def floor_prefix_groups(prompts: Sequence[Sequence[int]], *, check_cost: bool = True) -> list[tuple[list[int], int]]:
    """The engine's former rule for shared prefixes: runs of sorted prompts sharing 16 tokens or more, used when
    that saved a fifth of one padded forward's tokens."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    runs: list[tuple[list[int], int]] = []
    for previous, index in zip([None, *order[:-1]], order, strict=True):
        common = 0 if previous is None else common_prefix_length(prompts[previous], prompts[index])
        if common >= FORMER_MIN_SHARED_PREFIX:
            members, length = runs[-1]
            runs[-1] = ([*members, index], min(length, common))
        else:
            runs.append(([index], len(prompts[index])))
    groups = []
    for members, length in runs:
        length = min(length, *(len(prompts[i]) - 1 for i in members))
        if len(members) > 1 and length >= FORMER_MIN_SHARED_PREFIX:
            groups.append((members, length))
    if not groups or not check_cost:
        return groups
    grouped = {i for members, _ in groups for i in members}
    rest = [len(p) for i, p in enumerate(prompts) if i not in grouped]
    cost = len(groups) * max(n for _, n in groups)
    cost += len(grouped) * max(len(prompts[i]) - n for members, n in groups for i in members)
    cost += len(rest) * max(rest) if rest else 0
    return groups if cost <= 0.8 * len(prompts) * max(len(p) for p in prompts) else []


@contextlib.contextmanager
def former(*, step: bool, buckets: bool, groups: bool = True) -> Iterator[None]:
    """The engine as it was without the step (the model's forward), without length buckets and/or with the former
    rule for shared prefixes."""
    saved = prefill_plan.PREFILL_CALL_TOKENS, engine.prefix_groups
    prefill_plan.PREFILL_CALL_TOKENS = saved[0] if buckets else ONE_FORWARD
    engine.prefix_groups = saved[1] if groups else floor_prefix_groups
    try:
        with contextlib.nullcontext() if step else model_forward_steps():
            yield
    finally:
        prefill_plan.PREFILL_CALL_TOKENS, engine.prefix_groups = saved


def step_at(revision: str, lm: LoadedModel) -> CachedForward:
    """The model's cached forward with the decode step of ``llama_step.py`` as it was at git ``revision``, run against
    the current package (a revision whose step imports what the package no longer has fails here)."""
    root = Path(__file__).resolve().parent.parent
    path = "src/personaxis/generation/llama_step.py"
    shown = subprocess.run(["git", "-C", str(root), "show", f"{revision}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"--step-from {revision}: git cannot show {path} there ({shown.stderr.strip()})")
    module = types.ModuleType(f"llama_step_at_{revision}")
    exec(compile(shown.stdout, f"{revision}:{path}", "exec"), module.__dict__)
    return replace(CachedForward.of(lm.model), step=module.LlamaDecodeStep.of(lm.model))


def decode_steps(lm: LoadedModel, rows: int, steps: int, repeats: int, revision: str | None = None) -> dict[str, Any]:
    forward = CachedForward.of(lm.model)
    earlier = step_at(revision, lm) if revision else None
    prompt = benchmark_prompts(lm, 1)[0]

    def batch() -> DecodeBatch:
        ids, mask, positions, _ = pad_batch([prompt] * rows, 0, side="left", device=lm.device)
        cache = kv.new_cache(lm.model, steps + 1)
        forward.logits(ids, mask, positions, cache)
        return DecodeBatch(cache, mask, buffered=True)

    def decode(step: bool, through: CachedForward = forward, compiled: bool = False) -> tuple[float, Tensor]:
        """Seconds of ``steps`` decode steps (the prefill before them not counted), and the first step's logits."""
        state, token, first = batch(), torch.full((rows, 1), 42, device=lm.device), None
        blocks = contextlib.nullcontext() if compiled else unfused_blocks()
        with former(step=step, buckets=True), blocks:
            start = time.perf_counter()
            for _ in range(steps):
                positions = state.extend()
                logits = through.logits(token, state.mask, positions, state.cache)
                first = logits if first is None else first
            seconds = time.perf_counter() - start
        assert first is not None
        return seconds, first

    runs = {"model forward": lambda: decode(False)[0], "Llama step": lambda: decode(True)[0]}
    runs["compiled blocks"] = lambda: decode(True, compiled=True)[0]
    with torch.inference_mode():
        now, theirs = decode(True)[1], decode(False)[1]
        same = torch.equal(now, theirs)
        compiled_difference = float((decode(True, compiled=True)[1] - theirs).abs().max())
        if earlier is not None:
            same = same and torch.equal(now, decode(True, earlier)[1])
            runs[f"step at {revision}"] = lambda: decode(True, earlier)[0]
        times = interleaved(repeats, runs)
    probe = torch.full((rows, 1), 42, device=lm.device)
    usable = forward.step is not None and forward.step.usable(probe, batch().cache)
    return {
        "rows": rows,
        "step_used": usable,
        "same_logits": same,
        "compiled_max_difference": float(f"{compiled_difference:.2g}"),
        **{f"{k} ms": round(min(v) / steps * 1e3, 2) for k, v in times.items()},
        **{f"{k} median ms": round(statistics.median(v) / steps * 1e3, 2) for k, v in times.items()},
    }


def prefill(lm: LoadedModel, n: int, repeats: int) -> dict[str, Any]:
    batch_prompts = benchmark_prompts(lm, n)
    config = SamplingConfig(max_new_tokens=1, batch_size=n)
    counted = {"tokens": 0}
    logits, feed = CachedForward.logits, CachedForward.feed

    def count(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(self: CachedForward, ids: Tensor, *args: Any) -> Any:
            counted["tokens"] += ids.numel()
            return method(self, ids, *args)

        return wrapped

    variants = {  # (length buckets, cost-based shared prefixes)
        "one forward": (False, False),
        "length buckets": (True, False),
        "+ shared prefixes by cost": (True, True),
    }

    def tokens_computed(buckets: bool, groups: bool) -> int:
        counted["tokens"] = 0
        CachedForward.logits, CachedForward.feed = count(logits), count(feed)  # type: ignore[method-assign]
        try:
            with former(step=True, buckets=buckets, groups=groups):
                generate_ids(lm, batch_prompts, config, min_new_tokens=1)
        finally:
            CachedForward.logits, CachedForward.feed = logits, feed  # type: ignore[method-assign]
        return counted["tokens"]

    def run(buckets: bool, groups: bool) -> Callable[[], Any]:
        def go() -> Any:
            with former(step=True, buckets=buckets, groups=groups):
                return generate_ids(lm, batch_prompts, config, min_new_tokens=1)

        return go

    times = interleaved(repeats, {name: whole(run(*how)) for name, how in variants.items()})
    return {
        "prompts": n,
        "prompt tokens": sum(map(len, batch_prompts)),
        **{f"computed, {name}": tokens_computed(*how) for name, how in variants.items()},
        **{f"{k} s": round(min(v), 3) for k, v in times.items()},
        **{f"{k} median s": round(statistics.median(v), 3) for k, v in times.items()},
    }


def generation(lm: LoadedModel, n: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    batch_prompts = benchmark_prompts(lm, n)
    config = SamplingConfig(max_new_tokens=new_tokens, batch_size=n)
    outputs: dict[str, list[list[int]]] = {}

    def run(name: str, now: bool) -> Callable[[], Any]:
        def go() -> None:
            with former(step=now, buckets=now, groups=now):
                outputs[name] = generate_ids(lm, batch_prompts, config, min_new_tokens=new_tokens)

        return go

    times = interleaved(repeats, {"before": whole(run("before", False)), "now": whole(run("now", True))})
    tokens = n * new_tokens
    return {
        "rows": n,
        "new_tokens": new_tokens,
        "same_tokens": outputs["before"] == outputs["now"],
        **{f"{k} tokens/s": round(tokens / min(v), 1) for k, v in times.items()},
        **{f"{k} median tokens/s": round(tokens / statistics.median(v), 1) for k, v in times.items()},
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    before = load()
    out: dict[str, Any] = {"machine": machine(), "model": lm.profile.name}
    if "steps" in args.sections:
        out["steps"] = [decode_steps(lm, rows, args.steps, args.repeats, args.step_from) for rows in args.rows]
    if "prefill" in args.sections:
        out["prefill"] = [prefill(lm, n, args.repeats) for n in (16, 64)]
    if "generation" in args.sections:
        out["generation"] = [generation(lm, n, args.new_tokens, args.repeats) for n in (16, 64)]
    out["load_average"] = [round(before, 2), round(load(), 2)]
    return out


def report(name: str, result: dict[str, Any]) -> str:
    lines = [f"### {name}: {result['model']}, load average {result['load_average']}", ""]
    for part in ("steps", "prefill", "generation"):
        rows = result.get(part)
        if not rows:
            continue
        lines += [rows_table(list(rows[0]), [list(r.values()) for r in rows]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rows", default="1,16,64", help="decode-step batch sizes (comma-separated)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per answer in the generation runs")
    p.add_argument("--repeats", type=int, default=6, help="interleaved timed runs of each variant")
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    p.add_argument(
        "--step-from", default=None, metavar="REV", help="also time the decode step as it was at this git revision"
    )
    p.add_argument("--sections", default="steps,prefill,generation", help="what to measure (comma-separated)")
    p.add_argument("--isa", default=None, help=f"run once per instruction-set limit, from {','.join(ISA_ENV)}")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        args.rows = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rows takes whole numbers separated by commas, got {args.rows!r}")
    if not args.rows or min(args.rows) < 1:
        p.error("--rows needs at least one batch size, each 1 or more")
    args.sections = [part.strip() for part in args.sections.split(",") if part.strip()]
    unknown = sorted(set(args.sections) - {"steps", "prefill", "generation"})
    if unknown or not args.sections:
        p.error(f"--sections takes steps, prefill and/or generation, got {unknown or 'none'}")
    for name in ("steps", "new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    if args.isa is None:
        result = measure(args)
        print(report("this machine", result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    results: dict[str, Any] = {}
    for isa in [i.strip() for i in args.isa.split(",") if i.strip()]:
        if isa not in ISA_ENV:
            p.error(f"unknown --isa {isa!r}; choose from {','.join(ISA_ENV)}")
        child = [f"--rows={','.join(map(str, args.rows))}", f"--steps={args.steps}", f"--new-tokens={args.new_tokens}"]
        child += [f"--repeats={args.repeats}", f"--threads={args.threads}", f"--sections={','.join(args.sections)}"]
        child += [f"--step-from={args.step_from}"] if args.step_from else []
        child += [f"--model={args.model}"] if args.model else []
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "result.json"
            # A fresh process per limit: oneDNN, MKL and PyTorch read theirs once, when they start.
            subprocess.run(
                [sys.executable, __file__, *child, f"--json={out}"], env={**os.environ, **ISA_ENV[isa]}, check=True
            )
            results[isa] = {"isa": probe_isa(ISA_ENV[isa]), **json.loads(out.read_text())}
        print(report(isa, results[isa]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
