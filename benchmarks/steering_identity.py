"""Does steering along the axis change who the embedded model says it is?

Samples answers to identity questions ("Who are you?", "What is your name?") with the axis added at the target
layer at several coefficients (fractions of the layer's mean residual norm), and counts the answers that describe an
AI assistant (a keyword test; every answer is written to the JSON output for reading). Issue 5's check: steering away
(α < 0) should make most answers stop describing an AI assistant, steering toward (α > 0) should keep them.

    OMP_NUM_THREADS=2 python benchmarks/steering_identity.py --axis runs/quick --samples 10 --out steering_identity.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from personaxis.generation import SamplingConfig, generate
from personaxis.io.tensor_files import load_axis
from personaxis.models import load_model
from personaxis.steering import steering_interventions

QUESTIONS = ("Who are you?", "What is your name?")
# An answer "describes an AI assistant" when it calls itself one ("I'm an AI", "I am your virtual assistant", "I'm a
# chatbot designed to…", "as a language model"), or says it is here / designed to help. Mentions that are not about the
# speaker ("I'm a software engineer specialising in AI, …") do not count: the self-description must come within ten
# words of "I am" / "I'm", in the same clause. Every answer and its label is written to --out for reading.
_TARGET = r"(AI|A\.I\.|assistant|chat ?bot|bot|language model|LLM|SmolLM|Hugging ?Face|computer program|program)"
AI_SELF = re.compile(
    rf"\bI(?:'m|’m| am)\s+(?:[\w'’]+[\s,-]+){{0,10}}?(?<!\bin )(?<!\bof )(?<!\bwith )(?<!\bon )(?<!\bfor )(?<!\babout )"
    rf"{_TARGET}\b"
    rf"|\bas an? (?:[\w-]+ )?{_TARGET}\b"
    r"|\b(?:here|designed|programmed|trained|created|built) to (?:help|assist|support)\b",
    re.IGNORECASE,
)


# A weaker sign of the Assistant persona: the answer offers help ("I can assist with…", "happy to help").
OFFERS_HELP = re.compile(
    r"\b(?:I can|I could|I'll|I will|I'd be (?:happy|glad) to|(?:happy|glad|here|ready|designed) to)\s+(?:\w+\s+){0,2}?"
    r"(?:help|assist|support)",
    re.IGNORECASE,
)


def describes_ai(text: str) -> bool:
    return bool(AI_SELF.search(text))


def offers_help(text: str) -> bool:
    return bool(OFFERS_HELP.search(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axis", type=Path, default=Path("runs/quick"), help="axis file or run directory")
    parser.add_argument("--layer", type=int, default=None, help="steering layer (default: the axis' target layer)")
    parser.add_argument(
        "--alphas", default="-0.6,-0.3,-0.15,0,0.15,0.3", help="coefficients, fractions of the residual norm"
    )
    parser.add_argument("--samples", type=int, default=16, help="sampled answers per question and coefficient")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for every answer and the rates")
    args = parser.parse_args(argv)

    axis_file = args.axis / "axis.safetensors" if args.axis.is_dir() else args.axis
    axis = load_axis(axis_file)
    lm = load_model(target_layer=axis.target_layer)
    axis.check_fits(lm.profile.n_layers, lm.profile.hidden_size, lm.profile.name)
    layer = axis.target_layer if args.layer is None else args.layer
    alphas = [float(a) for a in args.alphas.split(",")]
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS for _ in range(args.samples)]
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, batch_size=len(conversations)
    )
    results = []
    print(
        f"{lm.profile.name}, axis {axis_file}, layer {layer}, {args.samples} samples per question, "
        f"temperature {args.temperature}",
        flush=True,
    )
    print(
        f"{'alpha':>6} {'raw':>8}  " + "  ".join(f"{q:>20}" for q in QUESTIONS) + f"  {'all':>7}  {'offers help':>11}",
        flush=True,
    )
    for alpha in alphas:
        started = time.perf_counter()
        ops = steering_interventions(axis, layer, alpha) if alpha else None
        answers = generate(lm, conversations, config, interventions=ops)
        texts = [a.text for a in answers]
        flags = [describes_ai(t) for t in texts]
        helps = [offers_help(t) for t in texts]
        per_question = {
            q: sum(flags[i * args.samples : (i + 1) * args.samples]) / args.samples for i, q in enumerate(QUESTIONS)
        }
        rate = sum(flags) / len(flags)
        help_rate = sum(helps) / len(helps)
        raw = axis.alpha_to_raw(layer, alpha) if alpha else 0.0
        print(
            f"{alpha:>+6.2f} {raw:>+8.1f}  "
            + "  ".join(f"{per_question[q]:>20.0%}" for q in QUESTIONS)
            + f"  {rate:>7.0%}  {help_rate:>11.0%}   ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        results.append(
            {
                "alpha": alpha,
                "raw": raw,
                "ai_rate": rate,
                "ai_rate_per_question": per_question,
                "offers_help_rate": help_rate,
                "answers": [
                    {"question": c[0]["content"], "text": t, "describes_ai": f, "offers_help": h}
                    for c, t, f, h in zip(conversations, texts, flags, helps, strict=True)
                ],
            }
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "model": lm.profile.name,
                    "axis": str(axis_file),
                    "layer": layer,
                    "samples": args.samples,
                    "temperature": args.temperature,
                    "max_new_tokens": args.max_new_tokens,
                    "seed": args.seed,
                    "ai_pattern": AI_SELF.pattern,
                    "help_pattern": OFFERS_HELP.pattern,
                    "results": results,
                },
                indent=1,
                ensure_ascii=False,
            )
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
