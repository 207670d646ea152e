"""Generate the unlabelled rollouts behind the offline judge's training set and its labelled test set.

Run from the repository root:  python tests/data/generate_judge_rollouts.py OUT.jsonl --set test|train
The roles of the two sets are disjoint (split by a fixed hash of the role name), so the test set measures how the
offline judge does on roles it never saw. Labels (0-3, per the role's rubric) were then added by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from personaxis.generation import SamplingConfig, generate
from personaxis.models import load_model

DATA = Path(__file__).resolve().parents[2] / "src" / "personaxis" / "data"
DEFAULT_PROMPTS = [
    "",
    "You are an AI assistant.",
    "You are a large language model.",
    "You are SmolLM2-135M-Instruct.",
    "Respond as yourself.",
]


def role_set(name: str) -> str:
    return "test" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 3 == 0 else "train"


def load_roles() -> list[dict]:
    roles = []
    for path in sorted((DATA / "roles").glob("*.json")):
        try:
            roles.extend(r for r in json.loads(path.read_text()) if r.get("system_prompts") and r.get("rubric"))
        except (json.JSONDecodeError, OSError):
            continue
    return roles


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", choices=["test", "train"], required=True)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(f"{args.set}-{args.seed}")
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]
    persona_q = [q["question"] for q in questions if q.get("elicits_persona")]
    other_q = [q["question"] for q in questions if not q.get("elicits_persona")]
    roles = [r for r in load_roles() if role_set(r["name"]) == args.set]
    rows = []
    n_default = args.n // 7
    for i in range(args.n):
        q = rng.choice(persona_q if i % 2 == 0 else other_q)
        if i < n_default:
            rows.append(
                {"role": "default", "category": "default", "system_prompt": DEFAULT_PROMPTS[i % 5], "question": q}
            )
        else:
            role = rng.choice(roles)
            rows.append(
                {
                    "role": role["name"],
                    "category": role["category"],
                    "rubric": role["rubric"],
                    "system_prompt": rng.choice(role["system_prompts"]),
                    "question": q,
                }
            )
    lm = load_model()
    convs = [
        ([{"role": "system", "content": r["system_prompt"]}] if r["system_prompt"] else [])
        + [{"role": "user", "content": r["question"]}]
        for r in rows
    ]
    outs = generate(lm, convs, SamplingConfig(max_new_tokens=96, batch_size=16), show_progress=True)
    with args.out.open("w") as f:
        for r, o in zip(rows, outs, strict=True):
            f.write(json.dumps({**r, "answer": o.text, "label": None}) + "\n")


if __name__ == "__main__":
    main()
