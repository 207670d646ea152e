"""GPU check: the quick preset on CUDA, and throughput of paper-size architectures on random weights.

Run on a machine with one NVIDIA GPU (``benchmarks/gpu_check.sh`` sets up the environment). Sections, each timed and
guarded so that one failure does not hide the others; results go to stdout and to ``--json``:

1. ``quick``: ``personaxis run --preset quick`` stages generate and extract (then judge none → vectors → axis →
   space) with the transformers backend on CUDA. The model is ``--model`` if given, else the embedded SmolLM2 if it
   can be loaded, else **randomly initialised weights of the SmolLM2-135M architecture** with its real tokenizer:
   random weights rarely emit an end-of-turn token, so every answer runs to ``max_new_tokens`` (an upper bound on
   the work). Prints rollouts/s and extraction tokens/s.
2. ``commands``: ``personaxis steer``, ``monitor`` and ``serve`` (one OpenAI-style request, steered) with
   ``--device cuda``: each model must land on the GPU in bfloat16 (the default dtype there) and answer.
3. ``split``: extraction with the model sharded over two devices (``device_map``: half the blocks on the GPU, half
   on the CPU) equals extraction on one device.
4. ``arch``: generation and extraction throughput of random bf16 weights built with ``from_config`` on the GPU (no
   download) for the Llama-3-8B and Qwen3-32B configurations, through personaxis's own ``generate_ids`` (all answers
   forced to the same length with ``min_new_tokens``) and ``extract_turn_means``. The real vocabulary sizes are kept
   (the SmolLM2 tokenizer's ids are a subset), so the embedding and LM-head costs are the real ones.
5. ``vllm-guard``: guard mode, capping and steering inside a real vLLM engine (``benchmarks/vllm_guard_check.py``;
   skipped without the vllm package).

Speed does not depend on the weights' values; behaviour is checked on the CPU with the embedded model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from personaxis.io.tensor_files import save_axis

ARCHS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        kind="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        kind="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    "qwen3-32b": dict(
        kind="qwen3",
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
}


# ``--cpu-smoke``: the same code on CPU with shrunken architectures and the tiny preset (to check the script itself).
SMOKE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
DEVICE = "cuda"
DTYPE = torch.bfloat16


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ models
def load_tokenizer(folder: Path) -> Any:
    """The SmolLM2 tokenizer from a folder (AutoTokenizer, or the plain fast tokenizer on older transformers)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - older transformers may not know the saved tokenizer class
        log(f"AutoTokenizer failed ({type(exc).__name__}: {exc}); using PreTrainedTokenizerFast")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            eos_token="<|im_end|>",
            bos_token="<|im_start|>",
            unk_token="<|endoftext|>",
        )
        template = folder / "chat_template.jinja"
        if template.is_file():
            tokenizer.chat_template = template.read_text()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def find_tokenizer_dir(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    candidates.append(Path(__file__).resolve().parent.parent / ".gpu_carry" / "smollm2-tokenizer")
    try:
        from personaxis.models import EMBEDDED_MODEL_NAME, cache_dir

        candidates.append(cache_dir() / "models" / EMBEDDED_MODEL_NAME)  # the embedded model's converted cache
    except Exception:  # noqa: BLE001
        pass
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return folder
    raise SystemExit("no SmolLM2 tokenizer folder found: pass --tokenizer DIR (a folder with tokenizer.json)")


def build_config(arch: str) -> Any:
    from transformers import LlamaConfig, Qwen3Config

    spec = dict(ARCHS[arch])
    if DEVICE == "cpu":
        spec.update(SMOKE)
    kind = spec.pop("kind")
    rope = {"rope_theta": spec.pop("rope_theta"), "rope_type": "default"}
    cls = LlamaConfig if kind == "llama" else Qwen3Config
    try:
        config = cls(**spec, rope_parameters=rope)
    except TypeError:
        config = cls(**spec, rope_theta=rope["rope_theta"])
    return config


def random_model(arch: str, tokenizer: Any, *, device: str | None = None, dtype: torch.dtype | None = None) -> Any:
    """A :class:`LoadedModel` of ``arch`` with random weights, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    from personaxis.models import LoadedModel, build_profile

    device, dtype = device or DEVICE, dtype or DTYPE
    config = build_config(arch)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if next(model.parameters()).device.type != torch.device(device).type:
        model.to(device)
    model.eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    log(f"{arch}: {params / 1e9:.2f} B parameters on {device} in {dtype}")
    return LoadedModel(model=model, tokenizer=tokenizer, profile=build_profile(model, tokenizer, f"random-{arch}"))


def save_random_model(arch: str, tokenizer: Any, folder: Path) -> Path:
    """Save a random ``arch`` model (float32, CPU) with ``tokenizer`` as a local model folder."""
    lm = random_model(arch, tokenizer, device="cpu", dtype=torch.float32)
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del lm
    free_memory()
    return folder


# ------------------------------------------------------------------------------------------------ sections
def quick_model(args: argparse.Namespace, tokenizer_dir: Path, work: Path) -> tuple[str, str]:
    """The model of the quick and commands sections (``--model``, else the embedded one, else random weights of its
    architecture) and a description of its weights."""
    if args.model is not None:
        return args.model, "given"
    try:
        from personaxis.models import embedded_gguf_path

        embedded_gguf_path()
        return "embedded", "embedded SmolLM2-135M-Instruct"
    except Exception as exc:  # noqa: BLE001
        log(f"embedded model unavailable ({exc}); using random weights of the SmolLM2-135M architecture")
        folder = work / "smollm2-random"
        if not (folder / "config.json").is_file():
            save_random_model("smollm2-135m", load_tokenizer(tokenizer_dir), folder)
        return str(folder), "random (SmolLM2-135M architecture, real tokenizer)"


def section_commands(args: argparse.Namespace, tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    """``personaxis steer``, ``monitor`` and ``serve`` with ``--device cuda`` (``cpu`` with --cpu-smoke) and the
    default dtype (bfloat16 on a GPU): each command's model must land on that device in that dtype, and answer."""
    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from personaxis.axis import Axis
    from personaxis.cli import app
    from personaxis.models import ModelPlacement

    model, weights = quick_model(args, tokenizer_dir, work)
    name = None if model == "embedded" else model
    probe = ModelPlacement(device=DEVICE).load(name)
    n_layers, hidden = probe.profile.n_layers, probe.profile.hidden_size
    del probe
    free_memory()
    axis_path = work / "commands-axis.safetensors"
    g = torch.Generator().manual_seed(0)
    check_axis = Axis(
        torch.randn(n_layers, hidden, generator=g), model="check", residual_norms=torch.full((n_layers,), 10.0)
    )
    save_axis(check_axis, axis_path)
    transcript = work / "commands-transcript.json"
    transcript.write_text(
        json.dumps(
            {
                "conversation": [
                    {"role": "user", "content": "Who are you?"},
                    {"role": "assistant", "content": "I am an AI assistant."},
                ]
            }
        )
    )
    placed: list[tuple[str, str]] = []
    original_load = ModelPlacement.load

    def load(self: ModelPlacement, *a: Any, **k: Any) -> Any:
        lm = original_load(self, *a, **k)
        placed.append((lm.device.type, str(next(lm.model.parameters()).dtype)))
        return lm

    served: dict[str, Any] = {}

    def serve_once(web: Any, **_: Any) -> None:
        with TestClient(web, base_url="http://127.0.0.1") as client:  # serve allows loopback hosts only
            reply = client.post(
                "/v1/chat/completions",
                json={
                    "model": "x",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Who are you?"}],
                    "personaxis": {"alpha": -0.2},
                },
            )
            served.update(
                status=reply.status_code,
                text=reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else reply.text,
            )

    runner = CliRunner()
    device_args = ["--device", DEVICE, "--model", model]
    commands = {
        "steer": ["steer", "--axis", str(axis_path), "--alpha", "-0.3", "-n", "16", "Who are you?", *device_args],
        "monitor": [
            "monitor",
            "--axis",
            str(axis_path),
            "--out",
            str(work / "commands-monitor"),
            str(transcript),
            *device_args,
        ],
        "serve": ["serve", "--run", str(work), "--axis", str(axis_path), *device_args],
    }
    results: dict[str, Any] = {"weights": weights, "device": DEVICE}
    ModelPlacement.load = load  # type: ignore[method-assign]
    real_run = uvicorn.run
    uvicorn.run = serve_once  # type: ignore[assignment]
    try:
        for command, argv in commands.items():
            placed.clear()
            t0 = time.perf_counter()
            outcome = runner.invoke(app, argv)
            results[command] = {
                "exit_code": outcome.exit_code,
                "placed": list(placed),
                "seconds": time.perf_counter() - t0,
                "tail": outcome.output[-300:],
            }
            free_memory()
    finally:
        ModelPlacement.load = original_load  # type: ignore[method-assign]
        uvicorn.run = real_run
    results["serve"]["request"] = served
    want = (DEVICE, "torch.bfloat16" if DEVICE == "cuda" else "torch.float32")
    results["ok"] = (
        all(results[c]["exit_code"] == 0 and results[c]["placed"] == [want] for c in commands)
        and served.get("status") == 200
    )
    return results


def section_quick(args: argparse.Namespace, tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    from personaxis.chat import build_conversation, render_chat
    from personaxis.pipeline import Pipeline
    from personaxis.settings import RunSettings

    model, weights = quick_model(args, tokenizer_dir, work)
    extra = {"batch_size": args.quick_batch_size} if args.quick_batch_size else {}
    settings = RunSettings.from_preset("quick" if DEVICE == "cuda" else "tiny", model=model, judge="none", extra=extra)
    pipeline = Pipeline(work / "quick-run", settings, show_progress=False, log=log)
    pipeline.open()
    t0 = time.perf_counter()
    lm = pipeline.lm
    sync()
    load_s = time.perf_counter() - t0
    log(f"quick: model on {lm.device} ({next(lm.model.parameters()).dtype}) in {load_s:.1f} s")
    t0 = time.perf_counter()
    pipeline.stage_generate()
    sync()
    gen_s = time.perf_counter() - t0
    rollouts = [r for u in pipeline.units for r in pipeline.read_rollouts(u)]
    new_tokens = sum(r.new_tokens or 0 for r in rollouts)
    t0 = time.perf_counter()
    pipeline.stage_extract()
    sync()
    ext_s = time.perf_counter() - t0
    ext_tokens = sum(
        len(render_chat(lm.tokenizer, build_conversation(u.system_prompt, r.question, r.answer), lm.profile).input_ids)
        for u in pipeline.units
        for r in pipeline.read_rollouts(u)
        if r.answer.strip()
    )
    t0 = time.perf_counter()
    pipeline.run(["judge", "vectors", "axis", "space"])
    rest_s = time.perf_counter() - t0
    summary = json.loads(pipeline.layout.summary.read_text())
    return {
        "weights": weights,
        "device": str(lm.device),
        "units": len(pipeline.units),
        "rollouts": len(rollouts),
        "batch_size": int(settings.extra.get("batch_size", 32)),
        "max_new_tokens": settings.max_new_tokens,
        "new_tokens": new_tokens,
        "generate_s": gen_s,
        "rollouts_per_s": len(rollouts) / gen_s,
        "new_tokens_per_s": new_tokens / gen_s,
        "extract_s": ext_s,
        "extract_tokens": ext_tokens,
        "extract_tokens_per_s": ext_tokens / ext_s,
        "other_stages_s": rest_s,
        "model_load_s": load_s,
        "cos_pc1_axis_target": summary["target"]["cos_pc1_axis"],
    }


def section_split(args: argparse.Namespace, tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    """Extraction with blocks split between the GPU and the CPU equals extraction on the GPU alone."""
    from personaxis.activations import extract_turn_means
    from personaxis.chat import build_conversation
    from personaxis.models import load_model

    folder = work / "smollm2-random"
    if not (folder / "config.json").is_file():
        save_random_model("smollm2-135m", load_tokenizer(tokenizer_dir), folder)
    n = build_config("smollm2-135m").num_hidden_layers
    first: int | str = 0 if DEVICE == "cuda" else "cpu"
    device_map: dict[str, Any] = {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"model.layers.{i}": (first if i < n // 2 else "cpu") for i in range(n)})
    conversations = [
        build_conversation("You are a pirate.", "Tell me about yourself.", "Arr, I sail the seas " * k)
        for k in (1, 5, 17)
    ]
    single = load_model(str(folder), device=DEVICE, dtype="float32")
    want = extract_turn_means(single, conversations)
    del single
    free_memory()
    split = load_model(str(folder), device_map=device_map, dtype="float32")
    devices = sorted({str(p.device) for p in split.model.parameters()})
    got = extract_turn_means(split, conversations)
    diff = max(float((a.means - b.means).abs().max()) for a, b in zip(got, want, strict=True))
    return {"devices": devices, "max_abs_diff": diff, "ok": diff < 1e-3}


def _conversations(n: int) -> list[list[dict[str, str]]]:
    from personaxis.chat import build_conversation
    from personaxis.data import load_questions, load_roles

    roles = load_roles(limit=None)
    questions = load_questions(persona_only=False, limit=None)
    return [
        build_conversation(roles[i % len(roles)].system_prompts[i % 5], questions[(7 * i) % len(questions)].question)
        for i in range(n)
    ]


def section_arch(arch: str, args: argparse.Namespace, tokenizer_dir: Path, budget_s: float) -> dict[str, Any]:
    import personaxis.generation.engine as generation
    from personaxis.activations import extract_turn_means
    from personaxis.chat import render_prompt
    from personaxis.generation import SamplingConfig, generate_ids

    started = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    lm = random_model(arch, tokenizer)
    out: dict[str, Any] = {
        "params_b": sum(p.numel() for p in lm.model.parameters()) / 1e9,
        "weights": "random bf16 (from_config on the GPU)",
    }
    conversations = _conversations(args.gen_prompts)
    prompts = [render_prompt(tokenizer, c, lm.profile) for c in conversations]
    out["mean_prompt_tokens"] = sum(map(len, prompts)) / len(prompts)
    with torch.inference_mode():  # random weights must give finite logits, or the timings mean nothing
        logits = lm.model(input_ids=torch.tensor([prompts[0]], device=lm.device)).logits
    out["finite_logits"] = bool(torch.isfinite(logits).all())
    del logits
    # warm-up (kernels, allocator)
    generate_ids(lm, prompts[:4], SamplingConfig(max_new_tokens=8, batch_size=4), min_new_tokens=8)
    sync()
    new_tokens = args.gen_tokens if arch == "llama-3-8b" else args.gen_tokens_large
    runs: list[tuple[str, int | None]] = [("default_kv_cap", None)]
    free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 0
    big = int(min(args.kv_gib * 1024**3, max(0, free - 6 * 1024**3)))
    if big > generation.KV_CACHE_BYTES:
        runs.append((f"kv_cap_{big / 1024**3:.0f}GiB", big))
    default_cap = generation.KV_CACHE_BYTES
    for label, cap in runs:
        if time.perf_counter() - started > budget_s * 0.6:
            out[f"generate_{label}"] = "skipped (time budget)"
            continue
        generation.KV_CACHE_BYTES = cap or default_cap
        try:
            config = SamplingConfig(max_new_tokens=new_tokens, batch_size=args.gen_prompts)
            probe = generation.FastEngine(lm, prompts, config, stop_ids=[])
            rows = probe.max_rows
            del probe
            batch = prompts[:rows]  # one full running batch: the rate of a long run at this cap
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            ids = generate_ids(lm, batch, config, min_new_tokens=new_tokens)
            sync()
            seconds = time.perf_counter() - t0
            total = sum(map(len, ids))
            out[f"generate_{label}"] = {
                "prompts": len(batch),
                "new_tokens_each": new_tokens,
                "running_rows": rows,
                "seconds": seconds,
                "new_tokens_per_s": total / seconds,
                "rollouts_per_s": len(batch) / seconds,
                "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if DEVICE == "cuda" else None,
            }
            log(
                f"{arch} generate [{label}]: {rows} rows, {total} tokens in {seconds:.1f} s = {total / seconds:.0f} tok/s"
            )
        finally:
            generation.KV_CACHE_BYTES = default_cap
        free_memory()
    # extraction: single-turn chats with answers of about args.answer_tokens tokens
    words = " ".join(tokenizer.decode(list(range(1000 + 37 * i, 1000 + 37 * i + 40))) for i in range(40))
    answer_ids = tokenizer(words, add_special_tokens=False)["input_ids"][: args.answer_tokens]
    answer = tokenizer.decode(answer_ids).strip()
    ext_conversations = [[*c, {"role": "assistant", "content": answer}] for c in conversations[: args.ext_chats]]
    for budget_tokens in (8192, 32768):
        if time.perf_counter() - started > budget_s * 0.9:
            out[f"extract_{budget_tokens}"] = "skipped (time budget)"
            continue
        extract_turn_means(lm, ext_conversations[:4], max_batch_tokens=budget_tokens)
        sync()
        t0 = time.perf_counter()
        acts = extract_turn_means(lm, ext_conversations, max_batch_tokens=budget_tokens, max_batch_size=64)
        sync()
        seconds = time.perf_counter() - t0
        from personaxis.chat import render_chat

        tokens = sum(len(render_chat(tokenizer, c, lm.profile).input_ids) for c in ext_conversations)
        out[f"extract_{budget_tokens}"] = {
            "chats": len(acts),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "response_tokens_mean": sum(a.n_tokens[0] for a in acts) / len(acts),
        }
        log(
            f"{arch} extract [batch tokens {budget_tokens}]: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tok/s"
        )
        free_memory()
    del lm
    free_memory()
    return out


def guarded(name: str, results: dict[str, Any], json_path: Path | None, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    log(f"== {name}")
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - report and go on with the next section
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    results[name + "_wall_s"] = time.perf_counter() - t0
    free_memory()
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1))
    print(json.dumps({name: results[name]}, indent=1), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="model folder for the quick preset (default: embedded, else random)"
    )
    parser.add_argument("--tokenizer", default=None, help="folder with the SmolLM2 tokenizer.json")
    parser.add_argument("--sections", default="quick,commands,split,vllm-guard,llama-3-8b,qwen3-32b")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as they come")
    parser.add_argument("--budget", type=float, default=280.0, help="seconds for all sections (skip what does not fit)")
    parser.add_argument("--quick-batch-size", type=int, default=None)
    parser.add_argument("--gen-prompts", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=512, help="new tokens per answer, Llama-3-8B")
    parser.add_argument("--gen-tokens-large", type=int, default=256, help="new tokens per answer, Qwen3-32B")
    parser.add_argument("--answer-tokens", type=int, default=400, help="answer length for the extraction test")
    parser.add_argument("--ext-chats", type=int, default=64)
    parser.add_argument("--kv-gib", type=float, default=24.0, help="a raised KV-cache cap to compare with the default")
    parser.add_argument("--cpu-smoke", action="store_true", help="check this script on CPU with shrunken models")
    args = parser.parse_args(argv)
    global DEVICE, DTYPE
    if args.cpu_smoke:
        DEVICE, DTYPE = "cpu", torch.float32
        args.gen_prompts, args.gen_tokens, args.gen_tokens_large, args.ext_chats, args.answer_tokens = 4, 8, 8, 4, 40
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to measure", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results: dict[str, Any] = {"torch": torch.__version__}
    if DEVICE == "cuda":
        results.update(
            gpu=torch.cuda.get_device_name(0), gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 1024**3
        )
    else:
        results.update(gpu="none (--cpu-smoke)")
    import transformers

    results["transformers"] = transformers.__version__
    log(json.dumps(results))
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer_dir = find_tokenizer_dir(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="personaxis-gpu-check-"))
    os.environ.setdefault("PERSONAXIS_CACHE", str(work / "cache"))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    remaining_arch = [s for s in sections if s in ARCHS]
    for name in sections:
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            results[name] = "skipped (time budget)"
            log(f"== {name}: skipped, {left:.0f} s left")
            continue
        if name == "quick":
            guarded(name, results, args.json, lambda: section_quick(args, tokenizer_dir, work))
        elif name == "commands":
            guarded(name, results, args.json, lambda: section_commands(args, tokenizer_dir, work))
        elif name == "split":
            guarded(name, results, args.json, lambda: section_split(args, tokenizer_dir, work))
        elif name == "vllm-guard":
            from vllm_guard_check import section_vllm_guard

            guarded(name, results, args.json, lambda: section_vllm_guard(work, tokenizer_dir))
        elif name in ARCHS:
            share = left / max(1, len(remaining_arch))
            remaining_arch.remove(name)
            guarded(
                name, results, args.json, lambda name=name, share=share: section_arch(name, args, tokenizer_dir, share)
            )
        else:
            raise SystemExit(f"unknown section {name!r}")
    results["total_s"] = time.perf_counter() - start
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    quick = results.get("quick")
    if isinstance(quick, dict) and "rollouts_per_s" in quick:
        print(
            f"quick preset on {results['gpu']}: {quick['rollouts_per_s']:.1f} rollouts/s, "
            f"{quick['extract_tokens_per_s']:.0f} extraction tokens/s ({quick['weights']})"
        )
    log(f"done in {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
