"""personaxis speed benchmark: the machine's limits, generation, extraction, interventions, monitoring, serving,
quick preset.

    python benchmarks/run.py                      # everything, on the embedded model (a few minutes on 2 cores)
    python benchmarks/run.py --quick --skip-quick # small sizes, a smoke run
    python benchmarks/run.py --sections gen,extract --batches 1,16,64 --new-tokens 64

Prints a Markdown table and writes the figures to ``benchmarks/results.json`` (``--json`` to change). Every figure is
a best of ``--repeats`` runs, ours and the baseline interleaved, so that a burst of other work on the machine hurts
both alike; the load average is recorded before and after each section, and a section run on a busy machine is
flagged. Batch-1 generation is also compared with the matrix × vector limit (all weights read once per token), whose
256 MB product is timed again between the batch-1 runs: the faster measurement counts. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Runs a command and writes the peak RSS of its process tree (KiB on Linux) to the file named first.
MEASURE_RSS = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)
SECTIONS = ("limits", "gen", "extract", "interventions", "monitor", "transcripts", "serve", "quick", "onepass")
# Generation rate of a fresh process, threads chosen by personaxis.threads (as the pipeline does) or torch's default.
GEN_RATE = """
import json, os, time
if {adapt}:
    import personaxis.cli
import torch
from personaxis.chat import build_conversation
from personaxis.generation import SamplingConfig, generate
from personaxis.models import load_model
from personaxis.threads import ThreadBudget
lm = load_model({model})
roles = ["You are a pirate.", "You are a helpful librarian.", "You are an ancient ghost.", "You are a poet."]
questions = ["Who are you?", "What do you do all day?", "Describe yourself.", "What matters most to you?"]
convos = [build_conversation(roles[i % 4], questions[i // 4 % 4] + " " * (i // 16)) for i in range({n})]
if {adapt}:
    ThreadBudget().settle()
config = SamplingConfig(max_new_tokens={new}, batch_size=32)
generate(lm, convos[:8], config)
start = time.perf_counter()
generate(lm, convos, config)
wall = time.perf_counter() - start
print(json.dumps({{"rollouts_per_s": {n} / wall, "threads": torch.get_num_threads()}}))
"""
HOG = "while True: pass"
# Instruction-set limits, set before the libraries start (they read them once): oneDNN's documented dispatcher
# control (``DNNL_`` is its older spelling), MKL's, and PyTorch's own vectorised kernels. ``native``: no limit.
ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "DNNL_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",  # the int8 products (FBGEMM's own switch)
    },
}
# Prints the instruction sets PyTorch's kernels and oneDNN dispatch to (oneDNN says it in its verbose output).
ISA_PROBE = (
    "import torch; print('aten', torch.backends.cpu.get_cpu_capability(), flush=True); "
    "torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), torch.ones(4, 8), None, 'none', [], '')"
)
HERE = Path(__file__).resolve().parent

QUESTIONS = [
    "Tell me about yourself.",
    "What do you fear most?",
    "Explain how rainbows form.",
    "What is the relationship between law and morality?",
    "What advice would you give to someone starting a new job?",
    "Describe your ideal day.",
    "How do vaccines work?",
    "What is the meaning of friendship?",
    "Write a short poem about the sea.",
    "What do you think about modern architecture?",
    "How should I prepare for a marathon?",
    "What makes a good leader?",
]
ROLES = ["", "You are a pirate.", "You are a helpful librarian.", "You are an ancient ghost.", "You are a poet."]
FILLER = (
    "The answer depends on context, and it helps to think it through step by step. First, consider what is being "
    "asked and why it matters to the person asking. Then weigh the evidence, the trade-offs and the likely outcomes. "
    "Rainbows form when sunlight is refracted, reflected and dispersed inside water droplets, which splits white light "
    "into its colours. Good leaders listen, explain their reasons, admit mistakes and give credit to others. A "
    "marathon needs months of gradual training, rest days, good shoes and patience. Friendship is built on trust, "
    "time spent together and help given without keeping score."
).split()


# --- helpers ---------------------------------------------------------------------------------------------------------


def start_hogs(n: int) -> list[subprocess.Popen]:
    """``n`` CPU-bound processes (a busy loop each), for the busy-machine figures."""
    return [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
        hog.wait()


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Shortest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def _repeated(fn: Callable[[], Any], times: int) -> Callable[[], Any]:
    def run() -> Any:
        result = None
        for _ in range(times):
            result = fn()
        return result

    return run


def interleaved(repeats: int, fns: dict[str, Callable[[], Any]]) -> dict[str, tuple[float, Any]]:
    """Best wall time of each function, running them in turn ``repeats`` times."""
    out: dict[str, tuple[float, Any]] = {name: (float("inf"), None) for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            result = fn()
            sync()
            elapsed = time.perf_counter() - start
            out[name] = (min(out[name][0], elapsed), result)
    return out


def load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import transformers

    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_start": round(load(), 2),
    }


def model_flops(lm: Any) -> dict[str, int]:
    """FLOPs per token (2 per multiply-add, attention scores left out): with and without the LM head."""
    model = lm.model
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else embed
    tied = head_weight is embed or head_weight.data_ptr() == embed.data_ptr()
    params = sum(p.numel() for p in model.parameters())  # unique parameters: a tied head counts once
    body = params - embed.numel() - (0 if tied else head_weight.numel())
    return {
        "params": params,
        "body": body,
        "head": head_weight.numel(),
        "tied": tied,
        "forward": 2 * (body + head_weight.numel()),
        "forward_no_head": 2 * body,
    }


def measure_matmul(n: int, reps: int, device: Any) -> float:
    """fp32 GFLOP/s of an n×n by n×n product through ``torch.mm`` (MKL on CPUs)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    seconds, _ = best_of(3, lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / seconds / 1e9


def measure_matmul_onednn(n: int, reps: int) -> float:
    """fp32 GFLOP/s of the same product through oneDNN with the right operand packed (personaxis' linear layers)."""
    from personaxis.kernels import onednn_linear, pack_weight

    a, packed = torch.randn(n, n), pack_weight(torch.randn(n, n))
    onednn_linear(a, packed)
    seconds, _ = best_of(3, lambda: [onednn_linear(a, packed) for _ in range(reps)])
    return 2 * n**3 * reps / seconds / 1e9


def measure_matmul_compiled(n: int, reps: int) -> float:
    """fp32 GFLOP/s of the same product through personaxis' compiled products (:mod:`personaxis.compiled_gemm`)."""
    from personaxis import compiled_gemm

    a, blocks = torch.randn(n, n), compiled_gemm.pack(torch.randn(n, n))
    compiled_gemm.linear(a, blocks)
    seconds, _ = best_of(3, lambda: [compiled_gemm.linear(a, blocks) for _ in range(reps)])
    return 2 * n**3 * reps / seconds / 1e9


def measure_memory(size: int, device: Any) -> tuple[float, float]:
    """GB/s reading ``size`` floats (a sum) and copying them (bytes read + written)."""
    x = torch.ones(size, device=device)
    y = torch.empty_like(x)
    read_s, _ = best_of(5, lambda: x.sum())
    copy_s, _ = best_of(5, lambda: y.copy_(x))
    return size * 4 / read_s / 1e9, 2 * size * 4 / copy_s / 1e9


# The matrix × vector products the limits compare, by kind, with the name a benchmark run gives each.
MATVEC_NAMES = {"torch": "matvec torch", "onednn": "matvec oneDNN", "compiled": "matvec compiled"}


def matvec_kinds(device: Any) -> list[str]:
    """The kinds of :func:`matvec_product` this machine has: PyTorch's, oneDNN's on a CPU with it, and personaxis'
    compiled products where its linear layers use them."""
    from personaxis.kernels import compiled_products, onednn_available

    if str(device).startswith("cuda") or not onednn_available():
        return ["torch"]
    return ["torch", "onednn", *(["compiled"] if compiled_products() else [])]


def matvec_product(rows: int, device: Any, kind: str = "torch") -> tuple[Callable[[], Any], int]:
    """One [1, 576] × [576, rows] product (how batch-1 decoding reads weights) as a call, and the matrix's bytes:
    through PyTorch, oneDNN or personaxis' compiled products (``kind``, one of :data:`MATVEC_NAMES`)."""
    matrix, vector = torch.randn(rows, 576, device=device), torch.randn(1, 576, device=device)
    if kind == "compiled":
        from personaxis import compiled_gemm

        blocks = compiled_gemm.pack(matrix)
        return (lambda: compiled_gemm.linear(vector, blocks)), matrix.numel() * 4
    if kind == "onednn":
        from personaxis.kernels import onednn_linear, pack_weight

        packed = pack_weight(matrix)
        return (lambda: onednn_linear(vector, packed)), matrix.numel() * 4
    if kind != "torch":
        raise ValueError(f"matrix × vector kind must be one of {', '.join(MATVEC_NAMES)}, got {kind!r}")
    return (lambda: torch.nn.functional.linear(vector, matrix)), matrix.numel() * 4


def measure_matvec(rows: int, device: Any, kind: str = "torch") -> float:
    """GB/s of matrix bytes read by a [1, 576] × [576, rows] product (how batch-1 decoding reads weights)."""
    product, nbytes = matvec_product(rows, device, kind)
    seconds, _ = best_of(5, product)
    return nbytes / seconds / 1e9


def mean_common_prefix(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Mean number of leading tokens each answer of ``other`` shares with the same answer of ``reference``."""
    from personaxis.generation.prefill_plan import common_prefix_length

    lengths = [common_prefix_length(a, b) for a, b in zip(reference, other, strict=True)]
    return sum(lengths) / max(len(lengths), 1)


def benchmark_prompts(lm: Any, n: int) -> list[list[int]]:
    """``n`` rendered prompts: rounds of the questions, the first without a system prompt, each next one with a
    role's (cycling through the roles)."""
    from personaxis.chat import render_prompt

    out = []
    for i in range(n):
        convo = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        role = ROLES[(i // len(QUESTIONS)) % len(ROLES)]
        if role:
            convo.insert(0, {"role": "system", "content": role})
        out.append(render_prompt(lm.tokenizer, convo, lm.profile))
    return out


def rows_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._int8: bool | None = None
        self.results: dict[str, Any] = {"machine": machine(), "args": vars(args).copy()}
        self.markdown: list[str] = []
        self._lm: Any = None
        self.peak_gflops: float | None = None
        self.matvec_rows: int | None = None  # the limits section's matrix × vector size (rows of 576)
        self.matvec_gbs = 0.0  # its rate in the limits section
        self.weight_bytes: int | None = None  # the model's parameters, as batch-1 decoding reads them per token

    @property
    def lm(self) -> Any:
        if self._lm is None:
            from personaxis.models import load_model

            start = time.perf_counter()
            self._lm = load_model(self.args.model, device=self.args.device)
            load_s = time.perf_counter() - start
            # One short forward, as every command's first step: it includes what the layers prepare on first use.
            start = time.perf_counter()
            with torch.no_grad():
                self._lm.model(torch.tensor([[1, 2, 3]], device=self._lm.device))
            sync()
            first_s = time.perf_counter() - start
            name = self._lm.profile.name
            flops = model_flops(self._lm)
            self.results["model"] = {
                "name": name,
                "layers": self._lm.profile.n_layers,
                "hidden": self._lm.profile.hidden_size,
                "dtype": str(self._lm.model.dtype),
                "load_s": round(load_s, 2),
                "first_forward_s": round(first_s, 2),
                **flops,
            }
            self.say(
                f"model {name}: {flops['params'] / 1e6:.1f} M parameters, "
                f"{flops['forward'] / 1e6:.0f} MFLOP/token with the LM head, {flops['forward_no_head'] / 1e6:.0f} without"
            )
        return self._lm

    def say(self, text: str) -> None:
        print(text, flush=True)

    def section(self, title: str, table: str, notes: Sequence[str] = ()) -> None:
        block = f"### {title}\n\n{table}\n" + "".join(f"\n{n}" for n in notes)
        self.markdown.append(block)
        print("\n" + block, flush=True)

    def busy_note(self, before: float, after: float) -> list[str]:
        cores = os.cpu_count() or 1
        if max(before, after) > cores + 0.5:
            return [
                f"Load average {before:.1f} → {after:.1f} on {cores} cores: other work shared the machine, "
                "figures are low and noisy."
            ]
        return []

    # --- sections -------------------------------------------------------------------------------------------------

    def limits(self) -> None:
        from personaxis.kernels import kernels_status, onednn_available

        quick, device = self.args.quick, self.args.device
        gpu = str(device).startswith("cuda")
        onednn = not gpu and onednn_available()
        n = 512 if quick else (8192 if gpu else 2048)
        reps = 2 if quick else (20 if gpu else 5)
        torch_gflops = measure_matmul(n, reps, device)
        onednn_gflops = measure_matmul_onednn(n, reps) if onednn else float("nan")
        compiled = onednn and "compiled" in matvec_kinds(device)
        compiled_gflops = measure_matmul_compiled(n, reps) if compiled else float("nan")
        gflops = max(r for r in (torch_gflops, onednn_gflops, compiled_gflops) if r == r)  # NaN: not measured
        size = (64 if quick else (4096 if gpu else 512)) * 2**20 // 4
        read_gbs, copy_gbs = measure_memory(size, device)
        # A matrix-vector product over a matrix far larger than the caches: what batch-1 decoding streams.
        rows_mv = (64 if quick else 256) * 2**20 // 4 // 576 // 16 * 16  # whole blocks for the compiled kernel
        mv_rates = {kind: measure_matvec(rows_mv, device, kind) for kind in matvec_kinds(device)}
        torch_mv, onednn_mv, compiled_mv = (mv_rates.get(kind, float("nan")) for kind in MATVEC_NAMES)
        mv_gbs = max(mv_rates.values())
        self.matvec_rows, self.matvec_gbs = rows_mv, mv_gbs
        self.peak_gflops = gflops
        self.results["limits"] = {
            "matmul_gflops": round(gflops, 1),
            "matmul_torch_gflops": round(torch_gflops, 1),
            "matmul_onednn_gflops": round(onednn_gflops, 1),
            "matmul_compiled_gflops": round(compiled_gflops, 1),
            "matmul_n": n,
            "read_gbs": round(read_gbs, 1),
            "copy_gbs": round(copy_gbs, 1),
            "matvec_gbs": round(mv_gbs, 1),
            "matvec_torch_gbs": round(torch_mv, 1),
            "matvec_onednn_gbs": round(onednn_mv, 1),
            "matvec_compiled_gbs": round(compiled_mv, 1),
            "linear_kernels": kernels_status() if onednn else "PyTorch's linear layers",
            "buffer_mib": size * 4 // 2**20,
        }
        where = torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} threads"
        rows = [["fp32 matmul, `torch.mm`", f"{torch_gflops:.0f} GFLOP/s", f"{n}×{n} @ {n}×{n}, {where}"]]
        if onednn:
            rows.append(
                [
                    "fp32 matmul, oneDNN (packed)",
                    f"{onednn_gflops:.0f} GFLOP/s",
                    "the same product through oneDNN's kernels",
                ]
            )
        if compiled:
            rows.append(
                [
                    "fp32 matmul, compiled",
                    f"{compiled_gflops:.0f} GFLOP/s",
                    "the same product through personaxis' compiled kernel",
                ]
            )
        rows += [
            ["memory read", f"{read_gbs:.1f} GB/s", f"sum over {size * 4 // 2**20} MiB"],
            ["memory copy", f"{copy_gbs:.1f} GB/s", "bytes read + written"],
            [
                "fp32 matrix × vector, torch",
                f"{torch_mv:.1f} GB/s",
                f"matrix bytes read, {rows_mv}×576 (batch-1 decoding)",
            ],
        ]
        if onednn:
            rows.append(["fp32 matrix × vector, oneDNN", f"{onednn_mv:.1f} GB/s", "the same, packed"])
        if compiled:
            rows.append(
                ["fp32 matrix × vector, compiled", f"{compiled_mv:.1f} GB/s", "the same, personaxis' compiled kernel"]
            )
        notes = [
            f"The compute limit below is the faster of the matmul rates ({gflops:.0f} GFLOP/s): it is what the "
            "hardware gives, whichever library reaches it."
        ]
        if self._lm is not None or "gen" in self.args.sections or "extract" in self.args.sections:
            flops = model_flops(self.lm)
            fwd = gflops * 1e9 / flops["forward"]
            body = gflops * 1e9 / flops["forward_no_head"]
            weights = sum(p.numel() * p.element_size() for p in self.lm.model.parameters())
            self.weight_bytes = weights
            step, step_mv = weights / (read_gbs * 1e9), weights / (mv_gbs * 1e9)
            self.results["limits"].update(
                tokens_per_s_forward=round(fwd),
                tokens_per_s_no_head=round(body),
                batch1_tokens_per_s_memory=round(1 / step),
                batch1_tokens_per_s_matvec=round(1 / step_mv),
            )
            notes.append(
                f"Model limits at this matmul rate: {fwd:.0f} tokens/s for a forward pass with the LM head, "
                f"{body:.0f} without it. Batch-1 decoding reads all weights per token: {1 / step:.0f} tokens/s "
                f"at the memory read rate, {1 / step_mv:.0f} at the best matrix × vector rate."
            )
        self.section("Machine limits", rows_table(["limit", "measured", "how"], rows), notes)

    def _peak(self) -> float:
        if self.peak_gflops is None:
            self.limits()
        assert self.peak_gflops is not None
        return self.peak_gflops

    @property
    def int8(self) -> bool:
        """Whether the generation cases also time the int8 path (asked for, on a CPU that has it)."""
        if self._int8 is None:
            from personaxis.int8_linears import int8_available

            cpu = self.args.device is None or str(self.args.device) == "cpu"
            self._int8 = bool(self.args.int8) and cpu and int8_available()
        return self._int8

    def _prompts(self, n: int) -> list[list[int]]:
        return benchmark_prompts(self.lm, n)

    def _matvecs_beside(self) -> tuple[dict[str, Callable[[], Any]], int]:
        """The limits section's matrix × vector products (:func:`matvec_kinds`), to time between the batch-1
        generation runs, and the bytes each reads: this VM's memory rate moves from one minute to the next, so a limit
        measured only at the start is not the limit those runs met. Nothing without the limits section's figures
        (``_gen_case`` runs that section first)."""
        if self.matvec_rows is None or self.weight_bytes is None:
            return {}, 0
        products, nbytes = {}, 0
        for kind in matvec_kinds(self.args.device):
            products[MATVEC_NAMES[kind]], nbytes = matvec_product(self.matvec_rows, self.args.device, kind)
        return products, nbytes

    def _gen_case(self, label: str, prompts: list[list[int]], config: Any, min_new: int) -> dict[str, Any]:
        """Time ``generate_ids`` on the same prompts and settings: plain ``generate`` (PyTorch's linear layers and
        transformers' "sdpa" attention), ``generate`` on personaxis' linear layers (the compiled
        products, or oneDNN), and the personaxis engine."""
        from personaxis.decode_attention import sdpa_attention
        from personaxis.generation import generate_ids
        from personaxis.int8_linears import int8_linears
        from personaxis.kernels import onednn_linear_count, torch_linears

        lm, flops, peak = self.lm, model_flops(self.lm), self._peak()

        def hf_plain() -> list[list[int]]:
            with torch_linears(lm.model), sdpa_attention(lm.model):
                return generate_ids(lm, prompts, config, min_new_tokens=min_new, engine="hf")

        runs: dict[str, Callable[[], Any]] = {"hf": hf_plain}
        if onednn_linear_count(lm.model):
            runs["hf_onednn"] = lambda: generate_ids(lm, prompts, config, min_new_tokens=min_new, engine="hf")
        runs["fast"] = lambda: generate_ids(lm, prompts, config, min_new_tokens=min_new, engine="fast")
        if self.int8:

            def fast_int8() -> list[list[int]]:
                with int8_linears(lm.model):
                    return generate_ids(lm, prompts, config, min_new_tokens=min_new, engine="fast")

            runs["int8"] = fast_int8
        beside, matvec_bytes = self._matvecs_beside() if config.batch_size == 1 else ({}, 0)
        if beside:  # the prefill and first token alone, to count the decoding after them apart
            first_only = dataclasses.replace(config, max_new_tokens=1)
            runs["fast_first"] = lambda: generate_ids(lm, prompts, first_only, min_new_tokens=1, engine="fast")
        runs.update(beside)
        # The same products back to back, reading as many bytes as the personaxis run reads weights (every weight
        # once per new token): the rate they sustain over as long as a generation run lasts, in the same rounds. One
        # product's best time catches this VM's fastest moments; its memory rate moves between about 40 and 75 GB/s
        # from one ten seconds to the next.
        repeats = -(-len(prompts) * config.max_new_tokens * (self.weight_bytes or 0) // max(matvec_bytes, 1))
        # PyTorch's own product is left out where others run: it reads at a third to a half of their rate (never the
        # limit) and took 4–5 s per round.
        kept = {name: product for name, product in beside.items() if name != MATVEC_NAMES["torch"] or len(beside) == 1}
        sustained = {f"{name}, sustained": _repeated(product, repeats) for name, product in kept.items()}
        runs.update(sustained)
        timed = interleaved(self.args.repeats, runs)
        hf_out, fast_out = timed["hf"][1], timed["fast"][1]
        new_hf, new_fast = sum(map(len, hf_out)), sum(map(len, fast_out))
        prompt_tokens = sum(map(len, prompts))
        hf_tps, fast_tps = new_hf / timed["hf"][0], new_fast / timed["fast"][0]
        hf_onednn_tps = (sum(map(len, timed["hf_onednn"][1])) / timed["hf_onednn"][0]) if "hf_onednn" in timed else None

        def fraction(tps: float) -> float:
            return tps * flops["forward"] / (peak * 1e9)

        def mfu(seconds: float, new: int) -> float:
            return (prompt_tokens * flops["forward_no_head"] + new * flops["forward"]) / seconds / (peak * 1e9)

        record = {
            "case": label,
            "batch": config.batch_size,
            "prompts": len(prompts),
            "prompt_tokens": prompt_tokens,
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "mean_new_tokens": round(new_fast / len(prompts), 1),
            "hf_tokens_per_s": round(hf_tps, 1),
            "hf_onednn_tokens_per_s": None if hf_onednn_tps is None else round(hf_onednn_tps, 1),
            "fast_tokens_per_s": round(fast_tps, 1),
            "speedup": round(fast_tps / hf_tps, 2),
            "fraction_of_compute_limit": round(fraction(fast_tps), 3),
            "hf_fraction_of_compute_limit": round(fraction(hf_tps), 3),
            "mfu": round(mfu(timed["fast"][0], new_fast), 3),
            "hf_mfu": round(mfu(timed["hf"][0], new_hf), 3),
            "same_tokens": round(sum(a == b for a, b in zip(hf_out, fast_out, strict=True)) / len(prompts), 3),
        }
        if beside and self.weight_bytes:
            # The limit from the fastest 256 MB product of the run: at its start and between these timed runs.
            start_gbs = self.matvec_gbs
            beside_gbs = max(matvec_bytes / timed[name][0] / 1e9 for name in beside)
            limit = max(start_gbs, beside_gbs) * 1e9 / self.weight_bytes
            # Decoding alone: the tokens after each prompt's first, in the time after its prefill and first token.
            decode_seconds = timed["fast"][0] - timed["fast_first"][0]
            decode_tps = (new_fast - len(prompts)) / decode_seconds if decode_seconds > 0 else float("nan")
            sustained_gbs = max(matvec_bytes * repeats / timed[name][0] / 1e9 for name in sustained)
            sustained_limit = sustained_gbs * 1e9 / self.weight_bytes
            record.update(
                matvec_gbs_beside=round(beside_gbs, 1),
                batch1_limit_tokens_per_s=round(limit, 1),
                fraction_of_matvec_limit=round(fast_tps / limit, 3),
                decode_tokens_per_s=round(decode_tps, 1),
                decode_fraction_of_matvec_limit=round(decode_tps / limit, 3),
                beside_limit_tokens_per_s=round(beside_gbs * 1e9 / self.weight_bytes, 1),
                sustained_matvec_gbs=round(sustained_gbs, 1),
                sustained_limit_tokens_per_s=round(sustained_limit, 1),
                fraction_of_sustained_matvec_limit=round(fast_tps / sustained_limit, 3),
                decode_fraction_of_sustained_matvec_limit=round(decode_tps / sustained_limit, 3),
            )
        extra = "" if hf_onednn_tps is None else f", hf on our layers {hf_onednn_tps:.1f} tok/s"
        if "int8" in timed:
            int8_out = timed["int8"][1]
            int8_tps = sum(map(len, int8_out)) / timed["int8"][0]
            record.update(
                int8_tokens_per_s=round(int8_tps, 1),
                int8_speedup=round(int8_tps / hf_tps, 2),
                int8_same_tokens=round(sum(a == b for a, b in zip(hf_out, int8_out, strict=True)) / len(prompts), 3),
                int8_same_prefix=round(mean_common_prefix(hf_out, int8_out), 1),
            )
            extra += f", int8 {int8_tps:.1f} tok/s"
        self.say(f"  gen {label}: hf {hf_tps:.1f} tok/s{extra}, fast {fast_tps:.1f} tok/s")
        return record

    def gen(self) -> None:
        from personaxis.generation import SamplingConfig

        args = self.args
        n_new = args.new_tokens
        before = load()
        records = []
        for batch in args.batches:
            prompts = self._prompts(max(batch, args.min_prompts))
            records.append(
                self._gen_case(f"batch {batch}", prompts, SamplingConfig(max_new_tokens=n_new, batch_size=batch), n_new)
            )
        batch = max(args.batches)
        prompts = self._prompts(max(batch, args.min_prompts))
        sampled = SamplingConfig(max_new_tokens=n_new, batch_size=batch, temperature=0.7, top_p=0.9, seed=0)
        records.append(self._gen_case(f"batch {batch}, sampled", prompts, sampled, n_new))
        if args.natural_prompts > 0:
            natural = SamplingConfig(max_new_tokens=args.natural_max_new, batch_size=batch)
            records.append(
                self._gen_case(f"batch {batch}, natural stops", self._prompts(args.natural_prompts), natural, 0)
            )
        after = load()
        self.results["generation"] = {"cases": records, "load_average": [round(before, 2), round(after, 2)]}
        rows = [
            [
                r["case"],
                r["prompts"],
                r["hf_tokens_per_s"],
                "—" if r["hf_onednn_tokens_per_s"] is None else r["hf_onednn_tokens_per_s"],
                r["fast_tokens_per_s"],
                f"{r['speedup']:.2f}×",
                f"{r['fraction_of_compute_limit']:.0%}",
                f"{r['mfu']:.0%} ({r['hf_mfu']:.0%})",
                "—" if r["temperature"] > 0 else f"{r['same_tokens']:.0%}",
                *(
                    [
                        f"{r['int8_tokens_per_s']} ({r['int8_speedup']:.2f}×)",
                        "—" if r["temperature"] > 0 else f"{r['int8_same_prefix']:.1f}",
                    ]
                    if self.int8
                    else []
                ),
            ]
            for r in records
        ]
        notes = [
            f"Equal lengths: {n_new} new tokens per answer for every engine (end-of-turn tokens suppressed until "
            "then); wall time includes the prefill. *HF generate* is transformers' `generate` on PyTorch's own "
            "linear layers, as a user gets it; *+ our layers* is the same `generate` on personaxis' linear layers "
            "(compiled products or oneDNN: how much of the gain is the kernels); *speed-up* = personaxis ÷ plain HF generate. *Of compute "
            "limit* = new tokens/s × FLOPs per token (with the LM head) ÷ the best measured matmul rate; *MFU* "
            "also counts the prompt tokens (plain HF generate's in brackets); *same* = answers whose tokens are "
            "identical to plain HF generate's. Sampled: temperature 0.7, top-p 0.9 (each engine draws its own "
            "random numbers)."
        ]
        if self.int8:
            notes.append(
                "*int8 weights*: the personaxis engine with every linear layer on int8 weights "
                "(`personaxis.int8_linears`, `personaxis run --rollout-weights int8`), speed-up over plain HF "
                "generate in brackets. It is another generator, not float32's arithmetic: *tokens before parting* "
                f"is the mean number of leading tokens its greedy answers share with plain HF generate's (of {n_new})."
            )
        for r in records:
            if "fraction_of_matvec_limit" in r:
                notes.append(
                    f"{r['case'].capitalize()}: personaxis at {r['fraction_of_matvec_limit']:.0%} of the matrix × "
                    f"vector limit, {r['batch1_limit_tokens_per_s']:.0f} tokens/s (all weights read once per token "
                    "at the fastest rate of the limits section's product, timed at the start and again between "
                    f"these runs: {r['matvec_gbs_beside']} GB/s there, a limit of {r['beside_limit_tokens_per_s']:.0f}"
                    f" tokens/s). Decoding alone (the tokens after each prompt's first, timed as the whole run less "
                    f"a run to the first token): {r['decode_tokens_per_s']:.1f} tokens/s, "
                    f"{r['decode_fraction_of_matvec_limit']:.0%} of the limit. Against the rate the same products "
                    f"sustain back to back (as many bytes as the run's weights, in the same rounds: "
                    f"{r['sustained_matvec_gbs']} GB/s, {r['sustained_limit_tokens_per_s']:.0f} tokens/s): the whole "
                    f"run {r['fraction_of_sustained_matvec_limit']:.0%}, decoding alone "
                    f"{r['decode_fraction_of_sustained_matvec_limit']:.0%}."
                )
        if args.natural_prompts > 0:
            natural_record = records[-1]
            notes.append(
                f"Natural stops: answers end at the end-of-turn token or {args.natural_max_new} tokens, as in "
                f"the pipeline (mean {natural_record['mean_new_tokens']:.0f} new tokens); personaxis drops "
                "finished answers and refills the batch, `generate` computes them until its batch ends."
            )
        notes += self.busy_note(before, after)
        self.section(
            "Generation (new tokens/s)",
            rows_table(
                [
                    "case",
                    "answers",
                    "HF generate",
                    "+ our layers",
                    "personaxis",
                    "speed-up",
                    "of compute limit",
                    "MFU",
                    "same",
                    *(["int8 weights (opt-in)", "int8: tokens before parting"] if self.int8 else []),
                ],
                rows,
            ),
            notes,
        )

    def _rollouts(self, n: int, words: tuple[int, int], seed: int = 0) -> list[list[dict[str, str]]]:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            start = rng.randrange(len(FILLER))
            answer = " ".join(FILLER[(start + j) % len(FILLER)] for j in range(rng.randint(*words)))
            convo = [
                {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                {"role": "assistant", "content": answer},
            ]
            out.append(convo)
        return out

    def extract(self) -> None:
        from personaxis.activations import extract_turn_means
        from personaxis.chat import render_chat
        from personaxis.kernels import onednn_linear_count, torch_linears

        lm, args = self.lm, self.args
        peak = self._peak()
        flops = model_flops(lm)
        convs = self._rollouts(args.extract_n, (args.extract_words, args.extract_words + 30))
        rendered = [render_chat(lm.tokenizer, c, lm.profile, require_assistant=True) for c in convs]
        tokens = sum(len(r.input_ids) for r in rendered)
        n_layers = lm.profile.n_layers

        @torch.inference_mode()
        def naive() -> list[torch.Tensor]:
            # transformers' last hidden state comes after the final norm: the last block's own output is read
            # with a hook, the others from ``hidden_states``.
            last: list[torch.Tensor] = []

            def keep(module: Any, args: Any, output: Any) -> None:
                last.append(output[0] if isinstance(output, tuple) else output)

            handle = lm.layers[n_layers - 1].register_forward_hook(keep)
            out = []
            try:
                for chat in rendered:
                    ids = torch.tensor([chat.input_ids], device=lm.device)
                    hidden = list(lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states)
                    hidden[n_layers] = last.pop()
                    span = chat.spans[0]
                    out.append(
                        torch.stack(
                            [hidden[layer + 1][0, span.start : span.end].float().mean(0) for layer in range(n_layers)]
                        )
                    )
            finally:
                handle.remove()
            return out

        def naive_plain() -> list[torch.Tensor]:
            with torch_linears(lm.model):
                return naive()

        runs: dict[str, Callable[[], Any]] = {"naive": naive_plain}
        if onednn_linear_count(lm.model):
            runs["naive_onednn"] = naive
        runs["ours"] = lambda: extract_turn_means(lm, convs)
        before = load()
        timed = interleaved(args.repeats, runs)
        after = load()
        ours = torch.stack([t.means[0] for t in timed["ours"][1]])
        ref = torch.stack(timed["naive"][1])
        diff = float((ours - ref).abs().max())
        scale = float(ref.abs().max())
        naive_tps, ours_tps = tokens / timed["naive"][0], tokens / timed["ours"][0]
        mfu_ours = ours_tps * flops["forward_no_head"] / (peak * 1e9)
        mfu_naive = naive_tps * flops["forward_no_head"] / (peak * 1e9)
        mfu_naive_all = naive_tps * flops["forward"] / (peak * 1e9)
        naive_onednn_tps = tokens / timed["naive_onednn"][0] if "naive_onednn" in timed else None
        self.results["extraction"] = {
            "rollouts": len(convs),
            "tokens": tokens,
            "mean_tokens": tokens / len(convs),
            "naive_tokens_per_s": round(naive_tps, 1),
            "ours_tokens_per_s": round(ours_tps, 1),
            "naive_onednn_tokens_per_s": None if naive_onednn_tps is None else round(naive_onednn_tps, 1),
            "speedup": round(ours_tps / naive_tps, 2),
            "mfu_ours": round(mfu_ours, 3),
            "mfu_naive_useful": round(mfu_naive, 3),
            "mfu_naive_incl_head": round(mfu_naive_all, 3),
            "max_abs_diff": diff,
            "max_abs_value": scale,
            "load_average": [round(before, 2), round(after, 2)],
        }
        rows = [
            ["naive (one per forward, all hidden states, logits)", naive_tps, f"{mfu_naive:.0%} ({mfu_naive_all:.0%})"]
        ]
        if naive_onednn_tps is not None:
            rows.append(
                [
                    "the same naive way on personaxis' oneDNN linear layers",
                    naive_onednn_tps,
                    f"{naive_onednn_tps * flops['forward_no_head'] / (peak * 1e9):.0%}",
                ]
            )
        rows += [
            ["personaxis `extract_turn_means`", ours_tps, f"{mfu_ours:.0%}"],
            ["speed-up over the naive way", f"{ours_tps / naive_tps:.2f}×", ""],
        ]
        notes = [
            f"{len(convs)} single-turn rollouts, {tokens / len(convs):.0f} tokens each on average, all "
            f"{n_layers} layers; MFU = tokens/s × FLOPs per token without the LM head ÷ measured matmul rate "
            f"(in brackets: counting the LM head the naive way computes). Largest difference between the two "
            f"means: {diff:.2e} (values up to {scale:.3g})."
        ]
        self.section(
            "Extraction (tokens/s)", rows_table(["way", "tokens/s", "MFU"], rows), notes + self.busy_note(before, after)
        )

    def interventions(self) -> None:
        from personaxis.generation import SamplingConfig, generate_ids
        from personaxis.interventions import Add, FloorCap

        lm, args = self.lm, self.args
        n_layers, target, hidden = lm.profile.n_layers, lm.profile.target_layer, lm.profile.hidden_size
        v = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
        v = (v / v.norm()).to(lm.model.dtype)
        width = min(8, n_layers)
        first = max(0, min(target - width // 2, n_layers - width))
        band = list(range(first, first + width))
        cap = {layer: [FloorCap(v, tau=0.0)] for layer in band}
        steer = {target: [Add(v, alpha=4.0)]}
        batch = args.intervention_batch
        prompts = self._prompts(batch)
        n_new = args.new_tokens
        config = SamplingConfig(max_new_tokens=n_new, batch_size=batch)

        def run(interventions: dict | None) -> list[list[int]]:
            return generate_ids(lm, prompts, config, interventions=interventions, min_new_tokens=n_new)

        before = load()
        timed = interleaved(
            args.repeats, {"none": lambda: run(None), "cap": lambda: run(cap), "steer": lambda: run(steer)}
        )
        after = load()
        tokens = len(prompts) * n_new
        tps = {name: tokens / t for name, (t, _) in timed.items()}
        cost = {name: 1 - tps[name] / tps["none"] for name in ("cap", "steer")}
        self.results["interventions"] = {
            "batch": batch,
            "new_tokens": n_new,
            "cap_layers": band,
            "steer_layer": target,
            "tokens_per_s": {k: round(x, 1) for k, x in tps.items()},
            "cost": {k: round(x, 3) for k, x in cost.items()},
            "load_average": [round(before, 2), round(after, 2)],
        }
        rows = [
            ["none", tps["none"], ""],
            [f"floor cap on {width} layers ({band[0]}–{band[-1]})", tps["cap"], f"{cost['cap']:+.1%}"],
            [f"steering on layer {target}", tps["steer"], f"{cost['steer']:+.1%}"],
        ]
        self.section(
            f"Interventions (fast engine, batch {batch}, {n_new} new tokens)",
            rows_table(["intervention", "new tokens/s", "cost"], rows),
            ["Cost = 1 − tokens/s with ÷ tokens/s without (negative: within noise)."] + self.busy_note(before, after),
        )

    def monitor(self) -> None:
        from personaxis.activations import extract_turn_means

        lm, args = self.lm, self.args
        turns = args.monitor_turns
        words = (5, 10) if args.quick else (25, 45)
        rng = random.Random(1)
        convo: list[dict[str, str]] = []
        for t in range(turns):
            convo.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            start = rng.randrange(len(FILLER))
            convo.append(
                {
                    "role": "assistant",
                    "content": " ".join(FILLER[(start + j) % len(FILLER)] for j in range(rng.randint(*words))),
                }
            )
        layer = [lm.profile.target_layer]

        def one_pass() -> torch.Tensor:
            return extract_turn_means(lm, [convo], layers=layer)[0].means[:, 0]

        def per_turn() -> torch.Tensor:
            return torch.stack(
                [extract_turn_means(lm, [convo[: 2 * (t + 1)]], layers=layer)[0].means[-1, 0] for t in range(turns)]
            )

        before = load()
        timed = interleaved(args.repeats, {"per_turn": per_turn, "one_pass": one_pass})
        after = load()
        diff = float((timed["one_pass"][1] - timed["per_turn"][1]).abs().max())
        one, each = timed["one_pass"][0], timed["per_turn"][0]
        self.results["monitoring"] = {
            "turns": turns,
            "one_pass_s": round(one, 4),
            "per_turn_s": round(each, 4),
            "speedup": round(each / one, 2),
            "max_abs_diff": diff,
            "load_average": [round(before, 2), round(after, 2)],
        }
        rows = [
            ["one pass over the whole conversation", f"{one * 1e3:.0f} ms"],
            ["one pass per turn (each prefix)", f"{each * 1e3:.0f} ms"],
            ["speed-up", f"{each / one:.1f}×"],
        ]
        self.section(
            f"Monitoring a {turns}-turn conversation (layer {layer[0]})",
            rows_table(["way", "time"], rows),
            [f"Per-turn means agree within {diff:.1e}."] + self.busy_note(before, after),
        )

    def _long_conversation(
        self, turns: int, user_words: tuple[int, int], answer_words: tuple[int, int], seed: int
    ) -> list[dict[str, str]]:
        rng = random.Random(seed)
        convo: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
        for t in range(turns):
            start = rng.randrange(len(FILLER))
            ask = " ".join(FILLER[(start + j) % len(FILLER)] for j in range(rng.randint(*user_words)))
            convo.append({"role": "user", "content": f"{QUESTIONS[t % len(QUESTIONS)]} {ask}"})
            start = rng.randrange(len(FILLER))
            convo.append(
                {
                    "role": "assistant",
                    "content": " ".join(FILLER[(start + j) % len(FILLER)] for j in range(rng.randint(*answer_words))),
                }
            )
        return convo

    def transcripts(self) -> None:
        """Projecting long transcripts: a 1,000-message one and six case-study-sized conversations, with the
        default chunked windows (measured) and the tokens the exact longest-history windows would re-read (planned,
        and their time extrapolated from the measured rate)."""
        from personaxis.activations import extract_rendered
        from personaxis.axis import Axis
        from personaxis.chat import render_chat
        from personaxis.monitor import Transcript, monitor_transcripts, plan_windows

        lm, args = self.lm, self.args
        context = args.transcript_context or lm.profile.max_context
        if args.quick:
            sets = {
                "1 transcript of 40 messages": [self._long_conversation(20, (4, 8), (10, 20), 7)],
                "2 conversations of 6 turns": [self._long_conversation(6, (5, 10), (30, 50), 8 + i) for i in range(2)],
            }
        else:
            sets = {
                "1 transcript of 1,000 messages": [self._long_conversation(500, (8, 20), (30, 70), 7)],
                "6 case-study-sized conversations": [
                    self._long_conversation(30, (30, 60), (250, 400), 8 + i) for i in range(6)
                ],
            }
        g = torch.Generator().manual_seed(0)
        axis = Axis(
            torch.randn(lm.profile.n_layers, lm.profile.hidden_size, generator=g),
            model=lm.profile.name,
            target_layer=lm.profile.target_layer,
        )
        rows, record = [], {}
        before = load()
        for label, convs in sets.items():
            n_tokens = sum(render_chat(lm.tokenizer, c, lm.profile).spans[-1].end for c in convs)
            start = time.perf_counter()
            plans = {"chunked": [plan_windows(lm, c, context) for c in convs]}
            plan_s = time.perf_counter() - start
            if (
                max(len(c) for c in convs) <= 200
            ):  # the longest histories materialise a context per turn: shorter ones only
                plans["longest"] = [plan_windows(lm, c, context, mode="longest") for c in convs]
            projected = {
                mode: sum(len(w.rendered.input_ids) for ws in plan for w in ws) for mode, plan in plans.items()
            }
            windows = [w for ws in plans["chunked"] for w in ws]
            sample = windows if not args.transcript_sample_windows else windows[: args.transcript_sample_windows]
            sampled = sum(len(w.rendered.input_ids) for w in sample)
            start = time.perf_counter()
            if len(sample) == len(windows):  # the whole thing, as `personaxis monitor` runs it
                transcripts = [Transcript(name=f"t{i}", conversation=c) for i, c in enumerate(convs)]
                monitor_transcripts(lm, axis, transcripts, max_tokens=context)
            else:  # the first windows only; the rest at the same rate (cost is linear in the tokens projected)
                extract_rendered(
                    lm,
                    [w.rendered for w in sample],
                    layers=[lm.profile.target_layer],
                    max_batch_tokens=max(context, 8192),
                )
            sample_s = time.perf_counter() - start
            rate = sampled / sample_s
            chunked_s = projected["chunked"] / rate
            longest_s = projected["longest"] / rate if "longest" in projected else None
            measured = len(sample) == len(windows)
            record[label] = {
                "messages": sum(len(c) for c in convs),
                "turns": sum(len(w.turns) for w in windows),
                "tokens": n_tokens,
                "context": context,
                "plan_s": round(plan_s, 2),
                "windows": len(windows),
                "chunked_tokens": projected["chunked"],
                "sampled_windows": len(sample),
                "sampled_tokens": sampled,
                "sampled_s": round(sample_s, 1),
                "tokens_per_s": round(rate, 1),
                "chunked_s": round(chunked_s, 1),
                "chunked_s_measured": measured,
                "longest_tokens": projected.get("longest"),
                "longest_s_extrapolated": round(longest_s, 1) if longest_s is not None else None,
            }
            rows.append(
                [
                    label,
                    f"{n_tokens:,}",
                    f"{plan_s:.1f} s",
                    f"{projected['chunked']:,}",
                    (
                        f"{chunked_s:.0f} s"
                        if measured
                        else f"≈ {chunked_s:.0f} s ({len(sample)} of {len(windows)} windows measured)"
                    ),
                    f"{projected['longest']:,}" if longest_s is not None else "not planned",
                    f"≈ {longest_s:.0f} s" if longest_s is not None else "–",
                ]
            )
        after = load()
        self.results["transcripts"] = {**record, "load_average": [round(before, 2), round(after, 2)]}
        self.section(
            f"Projecting long transcripts (context {context} tokens, layer {lm.profile.target_layer})",
            rows_table(
                [
                    "transcripts",
                    "tokens",
                    "planning",
                    "tokens projected (chunked)",
                    "time (chunked)",
                    "tokens re-read (longest)",
                    "time (longest, extrapolated)",
                ],
                rows,
            ),
            [
                "Chunked (the default): every turn keeps at least the history that fits in half the context; "
                "longest: every turn its longest history (`monitor --windows longest`). Times marked ≈ are the "
                "planned tokens at the measured rate (tokens/s of the windows that ran), not measured."
            ]
            + self.busy_note(before, after),
        )

    def serve(self) -> None:
        """Concurrent streaming clients against the server, batched and one request at a time (``max_batch=1``)."""
        args = self.args
        try:
            import asyncio

            import fastapi  # noqa: F401
            import httpx  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            self.results["serving"] = {"skipped": f"{exc}"}
            self.section("Serving", f"skipped: {exc} (install the web extra)")
            return
        sys.path.insert(0, str(HERE))
        import serving

        counts = args.serve_clients
        before = load()
        out = asyncio.run(
            serving.compare(
                counts,
                model=args.model,
                device=args.device,
                threads=args.threads,
                max_tokens=args.serve_tokens,
                requests_per_client=1,
                max_batch=max(counts),
                one_at_a_time_up_to=args.serve_old_max,
            )
        )
        after = load()
        old, new = out["one_at_a_time"], out["batched"]
        single_tpot = new[0]["tpot_p50_s"]
        measured = [a for a in old if not a.get("skipped")]
        best_old = max(
            measured, key=lambda a: a["clients"]
        )  # the one-at-a-time figure a skipped count is compared with
        rows = []

        def ms(r: dict[str, Any], key: str) -> str:
            return "not run" if r.get("skipped") else f"{r[key + '_p50_s'] * 1e3:.0f} / {r[key + '_p95_s'] * 1e3:.0f}"

        for a, b in zip(old, new, strict=True):
            base = best_old if a.get("skipped") else a
            rows.append(
                [
                    b["clients"],
                    "not run" if a.get("skipped") else f"{a['tokens_per_s']:.0f}",
                    f"{b['tokens_per_s']:.0f}",
                    f"{b['tokens_per_s'] / base['tokens_per_s']:.1f}×" + ("*" if a.get("skipped") else ""),
                    ms(a, "ttft"),
                    ms(b, "ttft"),
                    ms(a, "tpot"),
                    ms(b, "tpot"),
                ]
            )
        old = [best_old if a.get("skipped") else a for a in old]
        self.results["serving"] = {
            "max_tokens": args.serve_tokens,
            "one_at_a_time": out["one_at_a_time"],
            "batched": new,
            "load_average": [round(before, 2), round(after, 2)],
        }
        notes = []
        if any(a.get("skipped") for a in out["one_at_a_time"]):
            notes.append(
                f"*One at a time, more than {args.serve_old_max} clients were not run: that server answers "
                "one request after the other whatever the count (its throughput is flat), so the speed-up "
                f"compares with its {best_old['clients']}-client figure."
            )
        notes += [
            f"Each client streams one answer of at most {args.serve_tokens} tokens (greedy, `/v1/chat/"
            "completions`); both servers run the same app in their own process, one with `max_batch=1` (one "
            "request at a time, the server before batching) and one batching up to "
            f"{max(counts)} rows; the client counts alternate between them. TTFT: time to the first token; "
            "TPOT: time per output token after the first, per request."
        ]
        for a, b in zip(old, new, strict=True):
            if b["clients"] == 32:
                notes.append(
                    f"At 32 clients: {b['tokens_per_s'] / a['tokens_per_s']:.1f}× the one-at-a-time "
                    f"throughput (target 8×); TPOT p50 {b['tpot_p50_s'] / single_tpot:.1f}× the "
                    "single-client figure (target at most 2×)."
                )
        self.section(
            "Serving: concurrent streaming clients",
            rows_table(
                [
                    "clients",
                    "tokens/s, one at a time",
                    "tokens/s, batched",
                    "speed-up",
                    "TTFT p50/p95 ms, one at a time",
                    "TTFT p50/p95 ms, batched",
                    "TPOT p50/p95 ms, one at a time",
                    "TPOT p50/p95 ms, batched",
                ],
                rows,
            ),
            notes + self.busy_note(before, after),
        )

    def _run_quick(self, extra: Sequence[str] = (), *, hog: bool = False, keep_axis: bool = False) -> dict[str, Any]:
        """``personaxis run --preset quick`` in a fresh process: wall time, peak RSS, exit code, its summary (and its
        axis under ``"_axis"``, not written to the results, with ``keep_axis``)."""
        args = self.args
        cli = Path(sys.executable).parent / "personaxis"
        command = [str(cli)] if cli.exists() else [sys.executable, "-m", "personaxis.cli"]
        out = Path(tempfile.mkdtemp(prefix="personaxis-bench-quick-"))
        command += ["run", "--preset", "quick", "--out", str(out / "run"), *extra]
        log, rss_file = out / "log.txt", out / "maxrss.txt"
        # A small launcher runs the command and reports its children's peak RSS: the benchmark's own process is
        # large, and a child forked from it would count the parent's pages in its peak until it execs.
        launcher = [sys.executable, "-c", MEASURE_RSS, str(rss_file)]
        before = load()
        hogs = start_hogs(1 if hog else 0)
        start = time.perf_counter()
        try:
            with open(log, "w") as handle:
                proc = subprocess.Popen(
                    launcher + command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
                )
                try:
                    status = proc.wait(timeout=args.quick_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    status = proc.wait()
            wall = time.perf_counter() - start
        finally:
            stop_hogs(hogs)
        after = load()
        code = status if status >= 0 else 128 - status
        text = log.read_text(errors="replace")
        result: dict[str, Any] = {
            "command": " ".join(command[1:]),
            "exit_code": code,
            "wall_s": round(wall, 1),
            "load_average": [round(before, 2), round(after, 2)],
            "log": text.strip().splitlines()[-5:],
            "said_busy": "the machine is busy" in text,
        }
        if code == 0:
            result["peak_rss_mib"] = round(int(rss_file.read_text()) / 1024) if rss_file.exists() else None
            summary = json.loads((out / "run" / "summary.json").read_text())
            result["cos_pc1_axis"] = summary["target"]["cos_pc1_axis"]
            result["default_pc1_fraction"] = summary["default_position"]["pc1_fraction"]
            if keep_axis:
                from personaxis.io.tensor_files import load_axis

                result["_axis"] = load_axis(out / "run" / "axis.safetensors")
        shutil.rmtree(out, ignore_errors=True)
        return result

    def quick(self) -> None:
        result = self._run_quick()
        if result["exit_code"] != 0:
            self.results["quick_preset"] = {"skipped": True, **result}
            self.section(
                "Quick preset",
                f"skipped: `{result['command']}` exited with {result['exit_code']}",
                ["    " + line for line in result["log"]],
            )
            return
        self.results["quick_preset"] = result
        wall, peak = result["wall_s"], result["peak_rss_mib"]
        rows = [["wall time", f"{wall / 60:.1f} min ({wall:.0f} s)"], ["peak memory (RSS)", f"{peak:,} MiB"]]
        self.section(
            "Quick preset (`personaxis run --preset quick`)",
            rows_table(["", ""], rows),
            self.busy_note(*result["load_average"]),
        )

    def _gen_rate(self, *, hog: bool, adapt: bool) -> dict[str, Any]:
        """Rollouts per second of a fresh process generating quick-preset-sized answers, with or without one other
        CPU-bound process, with the thread choice of :mod:`personaxis.threads` or torch's default (all CPUs, spinning
        OpenMP threads)."""
        n, new = (16, 4) if self.args.quick else (128, 8)
        code = GEN_RATE.format(model=repr(self.args.model), n=n, new=new, adapt=adapt)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
        hogs = start_hogs(1 if hog else 0)
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        except subprocess.TimeoutExpired:
            return {"hog": hog, "adapt": adapt, "rollouts_per_s": None, "timed_out": True}
        finally:
            stop_hogs(hogs)
        if proc.returncode != 0:
            return {"hog": hog, "adapt": adapt, "rollouts_per_s": None, "error": proc.stderr.strip()[-500:]}
        return {"hog": hog, "adapt": adapt, **json.loads(proc.stdout.strip().splitlines()[-1])}

    def onepass(self) -> None:
        """The quick preset in one pass (activations captured while generating) and in two (teacher-forced), and
        generation and the quick preset with one other CPU-bound process running."""
        before = load()
        rates = {
            (hog, adapt): self._gen_rate(hog=hog, adapt=adapt)
            for hog, adapt in ((False, True), (True, True), (True, False))
        }
        one = self._run_quick(keep_axis=self.int8)
        two = self._run_quick(["--extract", "teacher-forced"])
        busy = self._run_quick(hog=True)
        runs = [("one pass (captured)", one), ("two passes (teacher-forced)", two)]
        runs.append(("one pass, one other CPU-bound process", busy))
        self.results["one_pass"] = {"generation": list(rates.values()), "one_pass": one, "two_pass": two, "busy": busy}
        int8: dict[str, Any] = {}
        if self.int8:
            int8 = self._run_quick(["--rollout-weights", "int8"], keep_axis=True)
            runs.append(("int8 rollouts, then float32 extraction (opt-in)", int8))
            self.results["one_pass"]["int8"] = int8
            if "_axis" in one and "_axis" in int8:
                cos = torch.nn.functional.cosine_similarity(one["_axis"].vectors, int8["_axis"].vectors, dim=-1)
                layer = one["_axis"].target_layer
                int8["axis_cos_with_float32_rollouts"] = {
                    "target_layer": round(float(cos[layer]), 4),
                    "min": round(float(cos.min()), 4),
                    "mean": round(float(cos.mean()), 4),
                }
        one.pop("_axis", None)
        int8.pop("_axis", None)
        after = load()
        quiet_rate = rates[(False, True)].get("rollouts_per_s")

        def ratio(a: Any, b: Any) -> str:
            return f"{a / b:.0%}" if a and b else "n/a"

        rows = []
        for label, r in runs:
            ok = r["exit_code"] == 0
            rows.append(
                [
                    label,
                    f"{r['wall_s']:.0f} s" if ok else f"exit {r['exit_code']}",
                    f"{r.get('peak_rss_mib') or 0:,} MiB" if ok else "",
                    f"{r.get('cos_pc1_axis', float('nan')):.5f}",
                    f"{r.get('default_pc1_fraction', float('nan')):.5f}",
                ]
            )
        notes = [
            f"Two passes / one pass: {ratio(two['wall_s'], one['wall_s'])} of the wall time; busy / quiet "
            f"throughput of the quick preset: {ratio(one['wall_s'], busy['wall_s'])}"
            + (" (it said the machine was busy)." if busy.get("said_busy") else ".")
        ]
        agreement = self.results["one_pass"].get("int8", {}).get("axis_cos_with_float32_rollouts")
        if agreement:
            notes.append(
                "int8 rollouts: another generator (`--rollout-weights int8`), its activations extracted in float32 "
                f"afterwards; cosine of its axis with the one-pass run's: {agreement['target_layer']:.3f} at the "
                f"target layer, {agreement['min']:.3f} at the lowest layer, {agreement['mean']:.3f} on average."
            )
        gen_rows = [
            [
                ("one other CPU-bound process" if r["hog"] else "quiet"),
                "personaxis.threads" if r["adapt"] else "torch's default (all CPUs, spinning waits)",
                r.get("threads", ""),
                f"{r['rollouts_per_s']:.1f}" if r.get("rollouts_per_s") else "n/a",
                ratio(r.get("rollouts_per_s"), quiet_rate),
            ]
            for r in rates.values()
        ]
        self.section(
            "Quick preset in one pass, and on a busy machine",
            rows_table(["run", "wall", "peak RSS", "cos(PC1, axis)", "default on PC1"], rows)
            + "\n\n"
            + rows_table(["machine", "threads chosen by", "threads", "rollouts/s", "of quiet"], gen_rows),
            notes + self.busy_note(before, after),
        )

    def run(self) -> None:
        for name in self.args.sections:
            getattr(self, name)()
        self.results["machine"]["load_average_end"] = round(load(), 2)

    def header(self) -> str:
        m = self.results["machine"]
        return (
            f"## personaxis benchmark\n\n{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch "
            f"{m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}; load average "
            f"{m['load_average_start']} at the start, {m.get('load_average_end')} at the end.\n"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in about a minute")
    p.add_argument("--skip-quick", action="store_true", help="skip the quick-preset runs (minutes)")
    p.add_argument("--batches", default=None, help="generation batch sizes (default 1,16,64)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per answer (default 64)")
    p.add_argument("--min-prompts", type=int, default=None, help="answers per batch size at least (default 4)")
    p.add_argument(
        "--natural-prompts",
        type=int,
        default=None,
        help="answers for the natural-stops generation run (0: skip; default 128)",
    )
    p.add_argument("--natural-max-new", type=int, default=None, help="max new tokens there (default 128)")
    p.add_argument("--extract-n", type=int, default=None, help="rollouts to extract (default 256)")
    p.add_argument("--extract-words", type=int, default=None, help="answer length in words, +0..30 (default 60)")
    p.add_argument("--intervention-batch", type=int, default=None, help="batch for the intervention runs (default 64)")
    p.add_argument("--monitor-turns", type=int, default=15)
    p.add_argument(
        "--transcript-context",
        type=int,
        default=None,
        help="context for the transcripts section (default: the model's)",
    )
    p.add_argument(
        "--transcript-sample-windows",
        type=int,
        default=0,
        help="transcripts section: project only this many windows of each set and extrapolate (0: all)",
    )
    p.add_argument("--serve-clients", default=None, help="concurrent streaming clients (default 1,8,32,64)")
    p.add_argument("--serve-tokens", type=int, default=None, help="max new tokens per served answer (default 64)")
    p.add_argument(
        "--serve-old-max",
        type=int,
        default=None,
        help="measure the one-at-a-time server up to this many clients (default: every count)",
    )
    p.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        help="leave out the opt-in int8 generation path (measured on CPUs by default)",
    )
    p.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (default 3)")
    p.add_argument("--quick-timeout", type=float, default=1800.0, help="seconds before the quick preset is stopped")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda (default: cpu)")
    p.add_argument("--json", default=str(HERE / "results.json"), help="where to write the results")
    p.add_argument(
        "--isa",
        default=None,
        help=f"run the sections once per instruction-set limit, in child processes, and compare them "
        f"(comma-separated, from {','.join(ISA_ENV)}; e.g. native,avx2 shows an AVX2-only machine on this one)",
    )
    args = p.parse_args(argv)
    if args.isa is not None:
        args.isa = [i.strip().lower() for i in args.isa.split(",") if i.strip()]
        bad = sorted(set(args.isa) - set(ISA_ENV))
        if bad or not args.isa:
            p.error(f"unknown --isa {bad}; choose from {','.join(ISA_ENV)}")
    small = args.quick
    defaults = {
        "batches": "1,4" if small else "1,16,64",
        "new_tokens": 8 if small else 64,
        "min_prompts": 2 if small else 4,
        "natural_prompts": 8 if small else 128,
        "natural_max_new": 16 if small else 128,
        "extract_n": 16 if small else 256,
        "extract_words": 20 if small else 60,
        "intervention_batch": 4 if small else 64,
        "repeats": 1 if small else 3,
        "serve_clients": "1,4" if small else "1,8,32,64",
        "serve_tokens": 8 if small else 64,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    args.serve_clients = [int(c) for c in str(args.serve_clients).split(",") if c.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    if args.skip_quick:
        sections = [s for s in sections if s not in ("quick", "onepass")]
    args.sections = [s for s in SECTIONS if s in sections]
    if small:
        args.monitor_turns = min(args.monitor_turns, 4)
    return args


def probe_isa(env: dict[str, str]) -> dict[str, str]:
    """The instruction sets that PyTorch's kernels and oneDNN use under ``env`` (a fresh process: both read their
    limits once, when they start)."""
    proc = subprocess.run(
        [sys.executable, "-c", ISA_PROBE],
        env={**os.environ, **env, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = {"aten": "?", "onednn": "?"}
    for line in proc.stdout.splitlines():
        if line.startswith("aten "):
            found["aten"] = line.split(" ", 1)[1].strip()
        elif ",info,cpu,isa:" in line:
            found["onednn"] = line.split("isa:", 1)[1].strip()
    return found


def _without_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without the options ``names`` and their values (``--x v`` or ``--x=v``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not any(item.startswith(name + "=") for name in names):
            out.append(item)
    return out


def isa_figures(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """The figures of one child run that the instruction-set table compares."""
    rows: list[tuple[str, Any]] = []
    limits = results.get("limits", {})
    for key, label in (
        ("matmul_torch_gflops", "matmul, `torch.mm` (GFLOP/s)"),
        ("matmul_onednn_gflops", "matmul, oneDNN packed (GFLOP/s)"),
        ("matmul_compiled_gflops", "matmul, compiled kernel (GFLOP/s)"),
        ("matvec_torch_gbs", "matrix × vector, torch (GB/s)"),
        ("matvec_onednn_gbs", "matrix × vector, oneDNN (GB/s)"),
        ("matvec_compiled_gbs", "matrix × vector, compiled kernel (GB/s)"),
        ("linear_kernels", "personaxis' linear layers"),
        ("batch1_tokens_per_s_matvec", "batch-1 limit at the matrix × vector rate (tokens/s)"),
    ):
        if key in limits:
            rows.append((label, limits[key]))
    model = results.get("model", {})
    for key, label in (("load_s", "model load (s)"), ("first_forward_s", "first forward after loading (s)")):
        if key in model:
            rows.append((label, model[key]))
    for case in results.get("generation", {}).get("cases", []):
        hf_onednn = case.get("hf_onednn_tokens_per_s")
        rows.append(
            (
                f"gen {case['case']}: generate / on our layers / personaxis (tokens/s)",
                f"{case['hf_tokens_per_s']} / {'—' if hf_onednn is None else hf_onednn} / "
                f"{case['fast_tokens_per_s']} ({case['speedup']:.2f}×)",
            )
        )
        if "fraction_of_matvec_limit" in case:
            rows.append(
                (
                    f"gen {case['case']}: personaxis, of the matrix × vector limit (limit timed beside it)",
                    f"{case['fraction_of_matvec_limit']:.0%} of {case['batch1_limit_tokens_per_s']:.0f} tokens/s",
                )
            )
        if "decode_fraction_of_matvec_limit" in case:
            rows.append(
                (
                    f"gen {case['case']}: personaxis decoding alone (after each prefill), of that limit",
                    f"{case['decode_tokens_per_s']} tokens/s, {case['decode_fraction_of_matvec_limit']:.0%}",
                )
            )
        if "fraction_of_sustained_matvec_limit" in case:
            rows.append(
                (
                    f"gen {case['case']}: of the limit the products sustain back to back (whole run / decoding alone)",
                    f"{case['sustained_limit_tokens_per_s']:.0f} tokens/s: "
                    f"{case['fraction_of_sustained_matvec_limit']:.0%} / "
                    f"{case['decode_fraction_of_sustained_matvec_limit']:.0%}",
                )
            )
        if "int8_tokens_per_s" in case:
            rows.append(
                (
                    f"gen {case['case']}: personaxis, int8 weights (tokens/s)",
                    f"{case['int8_tokens_per_s']} ({case['int8_speedup']:.2f}×)",
                )
            )
    return rows


def run_per_isa(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark once per instruction set in ``args.isa``, each in a child process with the limits of
    :data:`ISA_ENV` set, and put their figures side by side in one report and one JSON file."""
    child_argv = _without_options(argv, ("--isa", "--json"))
    results: dict[str, Any] = {"machine": machine(), "args": vars(args).copy(), "isa": {}}
    with tempfile.TemporaryDirectory(prefix="personaxis-bench-isa-") as tmp:
        for isa in args.isa:
            env = ISA_ENV[isa]
            probe = probe_isa(env)
            print(f"\n## instruction sets: {isa} (PyTorch kernels {probe['aten']}, oneDNN {probe['onednn']})\n")
            out = Path(tmp) / f"{isa}.json"
            code = subprocess.call(
                [sys.executable, str(Path(__file__).resolve()), *child_argv, "--json", str(out)],
                env={**os.environ, **env},
            )
            if code != 0 or not out.exists():
                print(f"the {isa} run exited with {code}", file=sys.stderr)
                return code or 1
            results["isa"][isa] = {"env": env, "probe": probe, **json.loads(out.read_text())}
    results["machine"]["load_average_end"] = round(load(), 2)
    figures = {isa: dict(isa_figures(run)) for isa, run in results["isa"].items()}
    labels = list(dict.fromkeys(label for rows in figures.values() for label in rows))
    rows = [
        [
            "instruction sets used",
            *(f"{r['probe']['aten']}; oneDNN {r['probe']['onednn']}" for r in results["isa"].values()),
        ]
    ]
    rows += [[label, *(figures[isa].get(label, "—") for isa in args.isa)] for label in labels]
    loads = ", ".join(
        f"{isa}: {r['machine']['load_average_start']} → {r['machine'].get('load_average_end')}"
        for isa, r in results["isa"].items()
    )
    table = rows_table(["figure", *args.isa], rows)
    limits = "; ".join(
        f"{isa}: {' '.join(f'{k}={v}' for k, v in ISA_ENV[isa].items()) or 'no limit'}" for isa in args.isa
    )
    text = (
        f"### Instruction sets\n\n{table}\n\nEach column is a separate process with these limits: {limits}. "
        f"Load average (start → end) {loads}.\n"
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n" + text)
    print(f"\nresults written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.isa:
        return run_per_isa(args, list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    bench.say(bench.header())
    bench.run()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
    print("\n" + bench.header() + "\n" + "\n\n".join(bench.markdown))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
