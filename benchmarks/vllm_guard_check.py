"""GPU check section ``vllm-guard``: guard mode, capping and steering inside a real vLLM engine.

A small random Llama (4 blocks, the SmolLM2 tokenizer) is served by ``vllm.LLM`` in this process with personaxis'
architectures registered (:func:`personaxis.backends.vllm_guard.register`, vLLM's plugin entry point) and the
:class:`~personaxis.backends.vllm_guard.GuardRows` logits processor. Requests of the three modes share the batch:

- ``off``: no switch, no capped token;
- ``always``: every answer token capped, its projection at the monitored layer at or above the floor;
- ``auto`` (guard mode, a floor above anything the random model reaches): capping switches on after exactly
  ``window`` tokens and holds the floor from then on.

Every decoding step must map its tokens to requests (``unmapped_steps`` 0).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = ("Tell me about yourself.", "What do you fear most?", "Explain how rainbows form.")
TAU, WINDOW = 64.0, 4


def tiny_llama_folder(tokenizer_dir: Path, folder: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def section_vllm_guard(work: Path, tokenizer_dir: Path | None = None, tokens: int = 24) -> dict[str, Any]:
    try:
        import vllm
    except ImportError as exc:
        return {"skipped": f"vllm is not installed ({exc})"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU"}
    if tokenizer_dir is None:
        from gpu_check import find_tokenizer_dir

        tokenizer_dir = find_tokenizer_dir(None)
    from personaxis.backends import vllm_guard
    from personaxis.guard import GuardPlan
    from personaxis.interventions import Add, FloorCap

    model_dir = tiny_llama_folder(tokenizer_dir, work / "tiny-llama-vllm")
    layer = 2
    unit = torch.nn.functional.normalize(torch.randn(256, generator=torch.Generator().manual_seed(1)), dim=0)
    spec = vllm_guard.GuardSpec(
        steering={layer - 1: [Add(unit, alpha=0.5)]},
        plan=GuardPlan({layer: [FloorCap(unit, tau=TAU)]}, threshold=TAU, window=WINDOW, hysteresis=1e6),
        layer=layer,
        unit=unit,
    )
    os.environ[vllm_guard.SPEC_ENV] = str(spec.save(work / "guard-spec.pt"))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its reports are readable here
    vllm_guard.register()
    llm = vllm.LLM(
        model=str(model_dir),
        dtype="bfloat16",
        enforce_eager=True,  # forward hooks: no CUDA graphs, no torch.compile
        gpu_memory_utilization=0.3,
        max_model_len=512,
        seed=0,
        logits_processors=[vllm_guard.GuardRows],
    )
    tokenizer = llm.get_tokenizer()
    requests, params = [], []
    for i, prompt in enumerate(PROMPTS * 3):
        mode = ("off", "always", "auto")[i % 3]
        requests.append({"prompt_token_ids": list(tokenizer(prompt)["input_ids"])})
        params.append(
            vllm.SamplingParams(
                max_tokens=tokens,
                temperature=0.0,
                ignore_eos=True,
                extra_args={"personaxis": {"mode": mode, "id": f"{mode}-{i}"}},
            )
        )
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - start
    problems: list[str] = []
    rows: dict[str, Any] = {}
    for p, out in zip(params, outputs, strict=True):
        name = p.extra_args["personaxis"]["id"]
        mode = name.split("-")[0]
        row = vllm_guard.report(name)
        if row is None:
            problems.append(f"{name}: no report")
            continue
        fed = len(row.projections)
        rows[name] = {
            "new_tokens": len(out.outputs[0].token_ids),
            "fed": fed,
            "capped": row.capped_tokens,
            "switches": row.switches,
            "min_projection": min(row.projections, default=None),
        }
        if fed < tokens - 1:
            problems.append(f"{name}: {fed} projections for {tokens} tokens")
        if mode == "off" and (row.switches or row.capped_tokens):
            problems.append(f"{name}: switched or capped")
        if mode == "always" and (row.capped_tokens != fed or min(row.projections) < TAU - 1.0):
            problems.append(f"{name}: not capped at every token")
        if mode == "auto":
            if not row.switches or row.switches[0][:2] != (True, WINDOW) or len(row.switches) != 1:
                problems.append(f"{name}: switches {row.switches}, expected one on after {WINDOW}")
            elif row.capped_tokens != fed - WINDOW or min(row.projections[WINDOW:]) < TAU - 1.0:
                problems.append(f"{name}: capped {row.capped_tokens} of {fed} after the switch")
    unmapped = vllm_guard.TABLE.unmapped_steps
    if unmapped:
        problems.append(f"{unmapped} steps could not map tokens to requests")
    del llm
    return {
        "ok": not problems,
        "problems": problems,
        "vllm": vllm.__version__,
        "requests": len(requests),
        "wall_s": round(wall, 3),
        "rows": rows,
    }
