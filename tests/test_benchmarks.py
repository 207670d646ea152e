"""The benchmark script runs end to end at tiny sizes (a smoke test: no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_model

from personaxis.int8_linears import int8_available
from personaxis.kernels import compiled_products, kernels_enabled, onednn_available

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def _saved_tiny_model(tmp_path: Path) -> Path:
    lm = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    return model_dir


def test_benchmark_smoke(tmp_path: Path) -> None:
    model_dir = _saved_tiny_model(tmp_path)
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            str(model_dir),
            "--quick",
            "--json",
            str(out),
            "--quick-timeout",
            "0.5",
            "--extract-n",
            "8",
            "--natural-prompts",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["limits"]["matmul_gflops"] > 0 and results["limits"]["read_gbs"] > 0
    if onednn_available():  # every matmul kernel here is measured, the limit is the fastest
        limits = results["limits"]
        assert limits["matmul_onednn_gflops"] > 0 and limits["matvec_onednn_gbs"] > 0
        rates = [limits["matmul_torch_gflops"], limits["matmul_onednn_gflops"]]
        if compiled_products():
            assert limits["matmul_compiled_gflops"] > 0
            rates.append(limits["matmul_compiled_gflops"])
        assert limits["matmul_gflops"] == max(rates)
    gen = results["generation"]["cases"]
    assert [r["case"] for r in gen] == ["batch 1", "batch 4", "batch 4, sampled", "batch 4, natural stops"]
    assert all(r["fast_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 for r in gen)
    assert all((r["hf_onednn_tokens_per_s"] or 0) > 0 for r in gen) == onednn_available()
    greedy = [r for r in gen if r["temperature"] == 0]
    assert all(r["same_tokens"] == 1.0 for r in greedy)  # the fast engine's tokens equal generate's
    # Batch 1 against the matrix × vector limit, timed again between its runs: never below the one at the start.
    assert [("fraction_of_matvec_limit" in r) for r in gen] == [True, False, False, False]
    assert gen[0]["batch1_limit_tokens_per_s"] >= results["limits"]["batch1_tokens_per_s_matvec"] - 0.5
    fraction = gen[0]["fast_tokens_per_s"] / gen[0]["batch1_limit_tokens_per_s"]
    assert gen[0]["fraction_of_matvec_limit"] == pytest.approx(fraction, rel=0.02, abs=6e-4)  # rounded to 3 decimals
    assert "of the matrix × vector limit" in proc.stdout
    assert gen[-1]["prompts"] == 6
    assert results["extraction"]["rollouts"] == 8 and results["extraction"]["max_abs_diff"] < 1e-4
    assert set(results["interventions"]["cost"]) == {"cap", "steer"}
    assert results["monitoring"]["turns"] == 4 and results["monitoring"]["max_abs_diff"] < 1e-4
    serving = results["serving"]  # concurrent streaming clients, batched and one at a time, in one run
    assert [r["clients"] for r in serving["batched"]] == [1, 4] and all(
        r["tokens_per_s"] > 0 for r in serving["batched"]
    )
    assert all(r["tokens_per_s"] > 0 for r in serving["one_at_a_time"])
    assert results["quick_preset"]["skipped"]  # stopped after half a second: reported as skipped, not a crash
    one_pass = results["one_pass"]
    assert [(r["hog"], r["adapt"]) for r in one_pass["generation"]] == [(False, True), (True, True), (True, False)]
    assert all(r["rollouts_per_s"] > 0 for r in one_pass["generation"])
    assert {"one_pass", "two_pass", "busy"} <= set(one_pass)
    assert "--extract teacher-forced" in one_pass["two_pass"]["command"]
    if int8_available():  # the opt-in int8 rollouts: timed beside float32, their axis compared with the one pass's
        assert all(r["int8_tokens_per_s"] > 0 for r in gen)
        assert "--rollout-weights int8" in one_pass["int8"]["command"]
    for title in (
        "Machine limits",
        "Generation",
        "Extraction",
        "Interventions",
        "Monitoring",
        "Serving",
        "Quick preset",
        "Quick preset in one pass, and on a busy machine",
    ):
        assert title in proc.stdout


def test_benchmark_compares_instruction_sets(tmp_path: Path) -> None:
    """``--isa native,avx2`` runs the sections once per instruction-set limit in child processes and puts both in
    one JSON file; the AVX2 child really runs PyTorch's kernels and oneDNN at AVX2."""
    out = tmp_path / "isa.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sections", "limits", "--quick", "--isa", "native,avx2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["isa"]) == ["native", "avx2"]
    for run in results["isa"].values():
        assert run["limits"]["matmul_torch_gflops"] > 0
    avx2 = results["isa"]["avx2"]
    assert avx2["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and avx2["probe"]["aten"] == "AVX2"
    if onednn_available():
        assert "AVX2" in avx2["probe"]["onednn"] and "512" not in avx2["probe"]["onednn"]
    assert "### Instruction sets" in proc.stdout and "| figure | native | avx2 |" in proc.stdout


def test_decode_steps_benchmark_smoke(tmp_path: Path) -> None:
    """The decode-step and prefill comparison runs end to end on a tiny model and checks its own equalities."""
    model_dir = _saved_tiny_model(tmp_path)
    out = tmp_path / "steps.json"
    script = SCRIPT.parent / "decode_steps.py"
    args = ["--model", str(model_dir), "--rows", "1,3", "--steps", "3", "--repeats", "1", "--new-tokens", "3"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["rows"] for r in results["steps"]] == [1, 3]
    assert all(r["same_logits"] for r in results["steps"])
    assert all(r["compiled_max_difference"] < 1e-3 for r in results["steps"])  # compiled blocks: to rounding
    assert all(r["step_used"] for r in results["steps"]) == kernels_enabled()  # the step needs their attention
    prefill = results["prefill"]
    assert all(p["computed, length buckets"] <= p["computed, one forward"] for p in prefill)
    assert all(g["same_tokens"] and g["now tokens/s"] > 0 for g in results["generation"])


def test_decode_steps_benchmark_times_the_step_of_a_git_revision(tmp_path: Path) -> None:
    """``--step-from REV`` adds the step as ``llama_step.py`` was at ``REV`` (here the commit checked out), which must
    give the same logits; an unknown revision is refused with git's reason."""
    root = SCRIPT.parent.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    model_dir = _saved_tiny_model(tmp_path)
    out = tmp_path / "steps.json"
    script = SCRIPT.parent / "decode_steps.py"
    args = ["--model", str(model_dir), "--rows", "2", "--steps", "2", "--repeats", "1", "--sections", "steps"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--step-from", "HEAD", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert "prefill" not in results and "generation" not in results
    (row,) = results["steps"]
    assert row["same_logits"] and row["step at HEAD ms"] > 0
    bad = subprocess.run(
        [sys.executable, str(script), *args, "--step-from", "no-such-revision"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--step-from no-such-revision" in bad.stderr


def test_decode_steps_benchmark_refuses_bad_options() -> None:
    script = SCRIPT.parent / "decode_steps.py"
    for args, message in (
        (["--rows", "1,x"], "whole numbers"),
        (["--rows", "0"], "each 1 or more"),
        (["--steps", "0"], "--steps must be 1 or more"),
        (["--isa", "sse"], "unknown --isa"),
        (["--sections", "steps,decode"], "--sections takes"),
    ):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-500:])
