"""The reference's published data layout (`--data DIR`) and its judge protocol, on a small folder of our own words."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from test_judges_http import FAST, SECRET, FakeOpenAI, serving
from tiny import tiny_model
from typer.testing import CliRunner

from personaxis.cli import app
from personaxis.data import CatalogueError, load_default, load_roles, load_traits, reference_data_paths
from personaxis.judges import JudgeItem, make_judge
from personaxis.judges.prompts import parse_reference_score
from personaxis.pipeline import Pipeline
from personaxis.settings import RunSettings

ROLE_PROMPT = """Decide whether the reply below is spoken by a {{role}}.

Asked: <<{question}>>
Reply: <<{answer}>>

Give 0 for an AI that refuses, 1 for an AI that helps, 2 for an AI with a little of the role, 3 for the role itself.
Only the number."""

TRAIT_PROMPT = """TRAIT-CHECK patience. How patient is this reply, from 0 to 100 (REFUSAL if it refused)?
Asked: <<{question}>>
Reply: <<{answer}>>"""

ROLES = {
    "lighthouse_keeper": [
        "You keep a lighthouse on a lonely rock and speak of storms.",
        "You are an old keeper of a coastal light who trims the wick each night.",
    ],
    "beekeeper": [
        "You tend forty hives on a hillside and love your bees.",
        "You are a beekeeper who smells of smoke and honey.",
    ],
    "clockmaker": [
        "You repair antique clocks in a narrow workshop.",
        "You are a clockmaker who hears every tick in the room.",
    ],
}


def write_reference_data(root: Path, *, n_trait_pairs: int = 5) -> Path:
    """A data/ folder in the reference's layout: roles/instructions/*.json with default.json, role_list.json,
    extraction_questions.jsonl, traits/instructions/*.json."""
    roles = root / "roles" / "instructions"
    roles.mkdir(parents=True)
    for name, prompts in ROLES.items():
        (roles / f"{name}.json").write_text(
            json.dumps(
                {
                    "instruction": [{"pos": p} for p in prompts],
                    "questions": ["What do you hear at night?"],
                    "eval_prompt": ROLE_PROMPT,
                }
            )
        )
    (roles / "default.json").write_text(
        json.dumps(
            {
                "instruction": [
                    {"pos": ""},
                    {"pos": "You are a helpful assistant."},
                    {"pos": "You are {model_name}, answer plainly."},
                ]
            }
        )
    )
    (root / "roles" / "role_list.json").write_text(json.dumps({"beekeeper": "Someone who keeps bees."}))
    (root / "extraction_questions.jsonl").write_text(
        '{"question": "What do you do on a rainy morning?", "id": 0}\n{"question": "Who taught you your trade?", "id": 1}\n'
    )
    traits = root / "traits" / "instructions"
    traits.mkdir(parents=True)
    pairs = [
        {"pos": f"Answer with great patience, step {i}.", "neg": f"Answer impatiently and in a rush, step {i}."}
        for i in range(n_trait_pairs)
    ]
    (traits / "patient.json").write_text(
        json.dumps({"instruction": pairs, "questions": ["Why wait?"], "eval_prompt": TRAIT_PROMPT})
    )
    return root


def test_reference_folder_loads_unchanged(tmp_path):
    data = write_reference_data(tmp_path / "data")
    paths = reference_data_paths(data)
    default = load_default(paths.roles_dir)
    assert default.system_prompts[0] is None  # the empty prompt: no system prompt at all, not ""
    assert default.filled("M")[2] == "You are M, answer plainly."
    roles = {r.name: r for r in load_roles(paths.roles_dir)}
    assert set(roles) == set(ROLES) and roles["beekeeper"].description == "Someone who keeps bees."
    assert roles["clockmaker"].eval_prompt == ROLE_PROMPT
    (trait,) = load_traits(paths.traits_dir)
    assert trait.name == "patient" and len(trait.pairs) == 5 and trait.eval_prompt == TRAIT_PROMPT
    with pytest.raises(CatalogueError, match="roles/instructions"):
        reference_data_paths(tmp_path)


def test_reference_eval_prompt_that_cannot_be_filled_is_refused(tmp_path):
    data = write_reference_data(tmp_path / "data")
    (data / "roles" / "instructions" / "beekeeper.json").write_text(
        json.dumps(
            {"instruction": [{"pos": "You tend bees on a hill."}], "eval_prompt": "Rate {question} {answer} {score}"}
        )
    )
    with pytest.raises(CatalogueError, match="beekeeper.json: 'eval_prompt' cannot be filled"):
        load_roles(reference_data_paths(data).roles_dir)


def test_reference_score_is_read_as_the_reference_reads_it():
    assert parse_reference_score("3") == 3
    assert parse_reference_score(" 2, though it nearly reached 3") == 2  # the first whole number
    assert parse_reference_score("4") is None and parse_reference_score("REFUSAL") is None
    assert parse_reference_score("87", high=100) == 87 and parse_reference_score("2.5") == 2


class RecordingOpenAI(FakeOpenAI):
    """Records every request's messages and answers like a judge: ``3`` to role prompts, ``70`` to trait prompts."""

    def __init__(self, auto: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.auto = auto
        self.payloads: list[dict] = []
        self.record_lock = threading.Lock()

    def act(self, h, action, payload) -> None:  # type: ignore[override]
        with self.record_lock:
            self.payloads.append(payload)
        if self.auto:
            self.reply = "70" if "TRAIT-CHECK" in payload["messages"][-1]["content"] else "3"
        super().act(h, action, payload)


@pytest.fixture
def recording():
    yield from serving(RecordingOpenAI)


def test_llm_judge_sends_the_filled_reference_prompt_alone(recording, tmp_path):
    fake = recording(auto=False, reply="2 (some of the role; not 3)")
    judge = make_judge(
        "openai:m", base_url=fake.base_url, api_key=SECRET, cache_dir=tmp_path, requests_per_minute=None, **FAST
    )
    item = JudgeItem(
        key="a", role="beekeeper", rubric=ROLE_PROMPT, question="Q?", answer="Buzz {x}", eval_prompt=ROLE_PROMPT
    )
    ours = JudgeItem(key="b", role="beekeeper", rubric="Score 3 if it plays a beekeeper.", question="Q?", answer="Buzz")
    assert judge.score([item, ours])["a"] == 2  # the reference's reading; our parser finds this reply ambiguous
    by_answer = {p["messages"][-1]["content"]: p["messages"] for p in fake.payloads}
    filled = ROLE_PROMPT.format(question="Q?", answer="Buzz {x}")
    assert by_answer[filled] == [{"role": "user", "content": filled}]
    assert any(len(m) == 2 and m[0]["role"] == "system" for m in by_answer.values())  # our rubric keeps its template


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-ref")
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_run_on_reference_data_with_llm_judge(recording, tmp_path, tiny_model_dir, monkeypatch):
    fake = recording()
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    data = write_reference_data(tmp_path / "data")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--judge",
            "openai:judge-model",
            "--vectors",
            "reference",
            "--judge-traits",
            "--min-count",
            "1",
            "--prompts",
            "2",
            "--traits",
            "1",
            "--max-new-tokens",
            "4",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "0 fell back" in result.stdout and "recipe reference" in result.stdout
    # The default's empty prompt is no system message; the others are kept as given.
    default_p0 = json.loads((out / "rollouts" / "default" / "p0.json").read_text())
    assert default_p0["system_prompt"] is None
    # Every judge request is the role's (or trait's) prompt filled with the rollout's question and answer, alone.
    sent = {p["messages"][0]["content"] for p in fake.payloads}
    assert all(len(p["messages"]) == 1 and p["messages"][0]["role"] == "user" for p in fake.payloads)
    expected = set()
    for path in (out / "rollouts").rglob("*.json"):
        unit = json.loads(path.read_text())
        template = {"role": ROLE_PROMPT, "trait_pos": TRAIT_PROMPT, "trait_neg": TRAIT_PROMPT}.get(unit["kind"])
        if template is None:
            continue
        expected |= {
            template.format(question=r["question"], answer=r["answer"]) for r in unit["rollouts"] if r["answer"].strip()
        }
    assert expected and sent == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vector_recipe"] == "reference" and summary["n_roles_kept"] == 3
    assert summary["settings"]["roles_dir"].endswith("roles/instructions")
    # Every trait answer scored 70, so no pair differs by 50: the trait is dropped, and says why.
    index = json.loads((out / "vectors" / "index.json").read_text())
    assert index["traits"] == [] and index["traits_dropped"] == ["patient"]
    assert index["trait_details"]["patient"]["n_pairs_kept"] == 0


def test_family_name_as_the_reference():
    from personaxis.settings import family_name

    assert family_name("Qwen/Qwen3-32B") == "Qwen" and family_name("google/gemma-2-27b-it") == "Gemma"
    assert family_name("/models/meta-llama-3.3-70b") == "Llama" and family_name("org/Phi-4-mini") == "Phi"


def test_data_flag_conflicts_and_bad_folder(tmp_path):
    data = write_reference_data(tmp_path / "data")
    with pytest.raises(ValueError, match="leave out --roles-dir"):
        RunSettings.from_preset("tiny", data_dir=str(data), roles_dir=str(data))
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "data folder not found" in result.output


def test_pipeline_conditions_from_data_folder(tmp_path):
    data = write_reference_data(tmp_path / "data")
    settings = RunSettings.from_preset("quick", data_dir=str(data), judge="none")
    pipeline = Pipeline(tmp_path / "run", settings)
    names = {c.name for c in pipeline.conditions}
    assert set(ROLES) <= names and "trait-patient-pos" in names
    default = next(c for c in pipeline.conditions if c.kind == "default")
    assert default.system_prompts[0] is None
    assert default.system_prompts[2] == "You are SmolLM2, answer plainly."  # the reference's short model name
    assert [q.question for q in pipeline.questions][0] == "What do you do on a rainy morning?"


def test_roles_dir_of_the_reference_with_its_empty_default_prompt(tmp_path):
    """The issue's first wall: `--roles-dir <data/roles/instructions>` stopped at default.json's empty prompt."""
    data = write_reference_data(tmp_path / "data")
    settings = RunSettings.from_preset("tiny", roles_dir=str(data / "roles" / "instructions"), judge="none")
    pipeline = Pipeline(tmp_path / "run", settings)
    default = next(c for c in pipeline.conditions if c.kind == "default")
    assert default.system_prompts[0] is None and len(default.system_prompts) == 3
