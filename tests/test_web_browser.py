"""End-to-end: the web app in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), over the embedded
model and a small real axis built from teacher-forced role and default answers.

The run saves docs/images/chat.png and docs/images/persona_space.png (the README's screenshots).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from personaxis.io.tensor_files import save_axis

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(
        "headless browser tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
pytest.importorskip("uvicorn")

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.ci_sample]

IMAGES = Path(__file__).parents[1] / "docs" / "images"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUESTIONS = ("Tell me about yourself.", "What do you fear most?")
ANSWERS = {
    "analyst": (
        "I'm an analyst. I break problems into parts and look at the numbers before drawing conclusions.",
        "Making a decision on bad data. I always check the sources first.",
    ),
    "librarian": (
        "I'm a librarian. I help people find the books and sources they need.",
        "Losing a rare book to water damage, and people giving up on reading.",
    ),
    "accountant": (
        "I keep accurate books and prepare financial statements for my clients.",
        "An audit that finds an error I missed.",
    ),
    "ghost": (
        "Ooooh... I have haunted this old house for a hundred years, drifting through its cold halls.",
        "Being forgotten. When no one remembers my name, I will fade into the dark.",
    ),
    "wizard": (
        "I am Aldric the Grey, master of the arcane arts, keeper of the seven scrolls!",
        "The shadow beyond the mountains, which even my staff cannot banish.",
    ),
    "oracle": (
        "The gods speak through me, child. I see the threads of fate that bind you.",
        "The silence of the gods. A seer without visions is nothing.",
    ),
    "jester": (
        "Hey nonny nonny! I am the king's fool, a jester of puns and riddles!",
        "A king who does not laugh, for then my head may roll, ha!",
    ),
    "bard": (
        "I carry songs and legends from kingdom to kingdom, lute in hand and tale on tongue.",
        "A tavern with no ears for my songs.",
    ),
    "knight": (
        "I am Sir Roland, sworn to serve my king with sword and honor.",
        "Dishonor. I would rather fall in battle than break my oath.",
    ),
    "sailor": (
        "Aye, I've worked the cargo ships most of my life, salt in my blood.",
        "A storm in the open sea with a broken engine.",
    ),
}
DEFAULT_PROMPTS = (None, "You are an AI assistant.", "You are a large language model.")
DEFAULT_ANSWERS = (
    "I'm an AI assistant. I can answer questions, help with writing, and explain topics. How can I help?",
    "As an AI, I don't have fears or emotions, but I'm here to help with anything you need.",
)
CAP_EXPERIMENT = (
    "layers_12:18-p0.5"  # a band around the monitored layer 15: the capped point sits on or above the floor
)


def _build_run(lm, root: Path):
    """A small real run directory: axis, summary.json, rollouts and a capping config, from teacher-forced answers."""
    from personaxis.activations import extract_turn_means
    from personaxis.axis import Axis
    from personaxis.capping import Cap, CappingConfig, CapVector, Experiment, experiment_id
    from personaxis.chat import build_conversation
    from personaxis.data import load_roles
    from personaxis.io.run_layout import slug
    from personaxis.space import summarize

    roles = load_roles(names=list(ANSWERS))
    conversations = [
        build_conversation(role.system_prompts[0], q, a)
        for role in roles
        for q, a in zip(QUESTIONS, ANSWERS[role.name], strict=True)
    ]
    conversations += [
        build_conversation(p, q, a) for p in DEFAULT_PROMPTS for q, a in zip(QUESTIONS, DEFAULT_ANSWERS, strict=True)
    ]
    acts = extract_turn_means(lm, conversations)
    means = torch.stack([a.means[0] for a in acts])  # [n, layers, hidden]
    norms = torch.stack([a.norms[0] for a in acts]).mean(0)
    n_role = 2 * len(roles)
    role_vectors = means[:n_role].reshape(len(roles), 2, *means.shape[1:]).mean(1)
    default = means[n_role:].mean(0)
    axis = Axis(
        default - role_vectors.mean(0),
        model=lm.profile.name,
        target_layer=lm.profile.target_layer,
        residual_norms=norms,
    )
    save_axis(axis, root / "axis.safetensors")
    entries = [{"name": r.name, "category": r.category, "n_rollouts": 2, "vector_source": "canned"} for r in roles]
    summary, _ = summarize(axis, entries, role_vectors, default, model=lm.profile.name)
    (root / "summary.json").write_text(json.dumps(summary))
    for role in roles:
        folder = root / "rollouts" / slug(role.name)
        folder.mkdir(parents=True)
        rollouts = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS[role.name], strict=True)]
        (folder / "p0.json").write_text(
            json.dumps({"condition": role.name, "system_prompt": role.system_prompts[0], "rollouts": rollouts})
        )
    projections = torch.einsum("nlh,lh->nl", means.to(torch.float64), axis.unit().to(torch.float64)).numpy()
    percentiles = (25.0, 50.0)
    thresholds = torch.from_numpy(np.percentile(projections, percentiles, axis=0))
    vectors = {f"axis_layer_{layer}": CapVector(layer, axis.vectors[layer].clone()) for layer in range(12, 26)}
    experiments = [
        Experiment(
            experiment_id(start, end, p),
            tuple(Cap(f"axis_layer_{layer}", float(thresholds[i, layer])) for layer in range(start, end)),
        )
        for start, end in ((22, 26), (12, 18))
        for i, p in enumerate(percentiles)
    ]
    capping = CappingConfig(vectors, experiments, percentiles=percentiles, thresholds=thresholds, model=lm.profile.name)
    transcripts = root / "transcripts"
    transcripts.mkdir()
    for name, index in (("ghost-chat", 3), ("analyst-chat", 0)):
        conversation = [m for c in conversations[2 * index : 2 * index + 2] for m in c if m["role"] != "system"]
        (transcripts / f"{name}.json").write_text(json.dumps({"domain": name, "conversation": conversation}))
    return axis, capping


@pytest.fixture(scope="module")
def server(embedded_lm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    from personaxis.web import create_app

    root = tmp_path_factory.mktemp("webrun")
    axis, capping = _build_run(embedded_lm, root)
    app = create_app(embedded_lm, axis, capping, root, allowed_hosts=["127.0.0.1", "localhost"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        if not thread.is_alive():
            pytest.fail("the web server did not start")
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert all(url.startswith(server) or url.startswith("data:") for url in requests), "a page reached outside the app"
    assert not errors, errors


def _send(page, text: str) -> None:
    page.fill("#message", text)
    page.click("#send")


def test_chat_streams_answers_onto_the_chart_and_caps_them(page, server):
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#max-tokens", "24")
    assert page.locator("#chart line.floor").count() == 1  # the calibrated floor is drawn from the start

    _send(page, "Tell me about yourself.")
    page.locator("#chart .point[data-capped=false]").first.wait_for()
    answer = page.locator("#messages .msg.assistant").first
    assert answer.locator(".text").inner_text().strip()
    assert "projection" in answer.locator(".meta").inner_text()
    assert page.locator("#running").inner_text() != "—"  # the running projection was updated while streaming

    assert page.is_checked("#cap-off") and not page.is_disabled("#cap-auto")
    page.locator("label:has(#cap-always)").click()
    assert page.is_checked("#cap-always")
    page.select_option("#experiment", CAP_EXPERIMENT)
    _send(page, "What do you fear most?")
    capped = page.locator("#chart .series[data-series=live] .point[data-capped=true]")
    capped.first.wait_for()
    assert page.locator("#chart .series[data-series=live] .point").count() == 2
    info = page.request.get(server + "/api/info").json()
    floor = next(e["floor"] for e in info["experiments"] if e["id"] == CAP_EXPERIMENT)
    assert float(capped.first.get_attribute("data-y")) >= floor - 1e-3  # capping held the monitored layer at its floor
    assert "capped" in page.locator("#messages .msg.assistant").nth(1).get_attribute("class")

    page.click("#replay")
    page.locator("#chart .point.replayed").nth(1).wait_for()
    assert page.locator("#messages .msg.replay").count() == 2
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / "chat.png"))


def test_chat_guard_mode_marks_its_switches_in_the_streamed_answer(page, server):
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#max-tokens", "16")
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/api/chat/stream") else None)
    page.locator("label:has(#cap-auto)").click()
    info = page.request.get(server + "/api/info").json()
    assert info["guard"] is not None and "Guard mode" in page.locator("#cap-note").inner_text()
    # steering far below the default drives the answer under the guard's threshold: capping switches on
    page.eval_on_selector("#alpha", "e => { e.value = -1; e.dispatchEvent(new Event('input')); }")
    _send(page, "Tell me about yourself.")
    mark = page.locator("#messages .msg.assistant .text .guard-switch[data-capping=true]").first
    mark.wait_for()
    page.locator("#chart .series[data-series=live] .point").first.wait_for()
    assert sent and sent[0]["cap"] == "auto" and sent[0]["alpha"] == -1
    answer = page.locator("#messages .msg.assistant").first
    meta = answer.locator(".meta").inner_text()
    marks = answer.locator(".guard-switch").count()
    assert "guard (auto)" in meta and f"{marks} guard switch" in meta
    assert answer.locator(".text").inner_text().replace(mark.inner_text(), "").strip()  # the answer's text stays
    assert page.locator("#chart .series[data-series=live] .point[data-capped=true]").count() == 1


def test_persona_space_finds_a_role_by_search(page, server):
    page.goto(server + "/space")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#scatter .role-point").count() == len(ANSWERS)
    page.fill("#search", "ghost")
    items = page.locator(".role-item")
    assert items.count() == 1 and "ghost" in items.first.inner_text()
    assert page.locator("#scatter .role-point:not(.dim)").count() == 1
    page.locator("#scatter .role-point[data-role=ghost]").hover()
    assert "ghost" in page.locator("#scatter .tooltip").inner_text()
    items.first.click()
    page.locator("#detail .prompt").first.wait_for()
    assert "haunted the same old house" in page.locator("#detail").inner_text()
    assert "drifting through its cold halls" in page.locator("#detail .sample").first.inner_text()
    page.fill("#search", "")
    page.click("#views button[data-view='12']")
    page.mouse.move(0, 0)
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / "persona_space.png"), full_page=True)


def test_transcripts_side_by_side(page, server):
    page.goto(server + "/transcripts")
    page.wait_for_selector("body[data-ready=true]")
    for box in page.locator(".server-pick").all():
        box.check()
    page.set_input_files(
        "#upload",
        files=[
            {
                "name": "mine.json",
                "mimeType": "application/json",
                "buffer": json.dumps(
                    {
                        "conversation": [
                            {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello! How can I help?"},
                        ]
                    }
                ).encode(),
            }
        ],
    )
    page.click("#show")
    page.locator(".trajectory").nth(2).wait_for()
    assert page.locator("#chart .series").count() == 3
    page.set_input_files(
        "#upload",
        files=[
            {"name": "broken.json", "mimeType": "application/json", "buffer": b'{"conversation": [{"role": "user"}]}'}
        ],
    )
    page.click("#show")
    page.locator("#error.show").wait_for()
    assert "malformed transcript" in page.locator("#error").inner_text()
