"""Property-based tests (hypothesis): projection onto the axis, capping operators, and response-token spans."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import tiny_model, tiny_tokenizer

from personaxis.axis import Axis
from personaxis.chat import render_chat
from personaxis.interventions import CeilingCap, FloorCap
from personaxis.models import LoadedModel

PROFILE = dict(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
FLOATS = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False, width=32)


def tensors(*shape: int) -> st.SearchStrategy[torch.Tensor]:
    n = 1
    for size in shape:
        n *= size
    return st.lists(FLOATS, min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(shape))


def directions(hidden: int) -> st.SearchStrategy[torch.Tensor]:
    return tensors(hidden).filter(lambda v: float(v.norm()) > 1e-2)


def shapes() -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(1, 5), st.integers(1, 8))


# ------------------------------------------------------------------------------------------------ projection
@st.composite
def axis_and_acts(draw: st.DrawFn) -> tuple[Axis, torch.Tensor, torch.Tensor, float, float]:
    n_layers, hidden = draw(shapes())
    vectors = torch.stack([draw(directions(hidden)) for _ in range(n_layers)]).to(torch.float32)
    batch = draw(st.integers(1, 3))
    x = draw(tensors(batch, n_layers, hidden)).to(torch.float32)
    y = draw(tensors(batch, n_layers, hidden)).to(torch.float32)
    a, b = draw(st.floats(-3, 3)), draw(st.floats(-3, 3))
    return Axis(vectors), x, y, a, b


@settings(**PROFILE)
@given(axis_and_acts())
def test_projection_is_linear(case: tuple[Axis, torch.Tensor, torch.Tensor, float, float]) -> None:
    axis, x, y, a, b = case
    left = axis.project(a * x + b * y)
    right = a * axis.project(x) + b * axis.project(y)
    scale = 1 + float((a * x).abs().max() + (b * y).abs().max()) * axis.hidden_size
    torch.testing.assert_close(left, right, atol=1e-5 * scale, rtol=1e-5)


@settings(**PROFILE)
@given(axis_and_acts())
def test_projection_is_consistent_across_shapes(case: tuple[Axis, torch.Tensor, torch.Tensor, float, float]) -> None:
    axis, x, _, _, _ = case
    batched = axis.project(x)  # [batch, n_layers, hidden] -> [batch, n_layers]
    assert batched.shape == x.shape[:2]
    for i in range(x.shape[0]):
        whole = axis.project(x[i])  # [n_layers, hidden] -> [n_layers]
        torch.testing.assert_close(whole, batched[i])
        for layer in range(axis.n_layers):
            one = axis.project(x[i, layer], layer=layer)  # [hidden] with a layer -> scalar
            assert one.dim() == 0
            torch.testing.assert_close(one, batched[i, layer])
            torch.testing.assert_close(axis.project(x[:, layer], layer=layer)[i], one)  # [..., hidden] with a layer
            unit = axis.vectors[layer].double() / axis.vectors[layer].double().norm()
            torch.testing.assert_close(one.double(), x[i, layer].double() @ unit, atol=1e-4, rtol=1e-5)


@settings(**PROFILE)
@given(axis_and_acts(), st.floats(0.01, 100))
def test_projection_ignores_the_axis_length(
    case: tuple[Axis, torch.Tensor, torch.Tensor, float, float], scale: float
) -> None:
    axis, x, _, _, _ = case
    torch.testing.assert_close(axis.project(x), (axis * scale).project(x), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close((-axis).project(x), -axis.project(x))


# ------------------------------------------------------------------------------------------------ capping
@st.composite
def cap_case(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float]:
    hidden = draw(st.integers(1, 8))
    rows = draw(st.integers(1, 4))
    return draw(directions(hidden)), draw(tensors(rows, hidden)), draw(st.floats(-50, 50))


def _parts(h: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unit = v / v.norm()
    along = h @ unit
    return along, h - along.unsqueeze(-1) * unit


@settings(**PROFILE)
@given(cap_case())
def test_floor_never_lowers_lifts_to_tau_and_is_idempotent(case: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    v, h, tau = case
    floor = FloorCap(v, tau=tau)
    out = floor(h)
    before, _ = _parts(h, v)
    after, _ = _parts(out, v)
    tol = 1e-9 * (1 + float(h.abs().max()) + abs(tau))
    assert bool((after >= before - tol).all())  # never lowers a projection
    assert bool((after >= tau - tol).all())  # everything ends at or above the floor
    torch.testing.assert_close(after, torch.maximum(before, torch.full_like(before, tau)), atol=tol * 10, rtol=1e-9)
    torch.testing.assert_close(floor(out), out, atol=tol * 10, rtol=1e-9)  # idempotent
    unchanged = before >= tau
    assert torch.equal(out[unchanged], h[unchanged])  # rows already above the floor are left exactly as they were


@settings(**PROFILE)
@given(cap_case())
def test_caps_leave_the_orthogonal_part_untouched(case: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    v, h, tau = case
    _, orthogonal = _parts(h, v)
    tol = 1e-9 * (1 + float(h.abs().max()) + abs(tau))
    for op in (FloorCap(v, tau=tau), CeilingCap(v, tau=tau)):
        _, after = _parts(op(h), v)
        torch.testing.assert_close(after, orthogonal, atol=tol * 10, rtol=1e-9)


@settings(**PROFILE)
@given(cap_case())
def test_ceiling_mirrors_the_floor(case: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    v, h, tau = case
    ceiling = CeilingCap(v, tau=tau)
    out = ceiling(h)
    tol = 1e-9 * (1 + float(h.abs().max()) + abs(tau))
    torch.testing.assert_close(out, -FloorCap(v, tau=-tau)(-h), atol=tol * 10, rtol=1e-9)  # mirror through the origin
    torch.testing.assert_close(out, FloorCap(-v, tau=-tau)(h), atol=tol * 10, rtol=1e-9)  # the reference convention
    before, _ = _parts(h, v)
    after, _ = _parts(out, v)
    assert bool((after <= before + tol).all()) and bool((after <= tau + tol).all())
    torch.testing.assert_close(ceiling(out), out, atol=tol * 10, rtol=1e-9)


@settings(**PROFILE)
@given(cap_case(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_caps_keep_the_dtype_and_shape(case: tuple[torch.Tensor, torch.Tensor, float], dtype: torch.dtype) -> None:
    v, h, tau = case
    for op in (FloorCap(v, tau=tau), CeilingCap(v, tau=tau)):
        out = op(h.to(dtype))
        assert out.dtype == dtype and out.shape == h.shape and bool(torch.isfinite(out.float()).all())


# ------------------------------------------------------------------------------------------------ spans
# Printable text without the tokenizer's special-token markup; hypothesis shrinks toward short strings, which are the
# ones that also occur inside the template ("a", "user", "im_end").
TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Co", "Cn"), include_characters="\n\t"),
    min_size=1,
    max_size=40,
).filter(lambda t: bool(t.strip()) and "<|" not in t and "<start_of_turn>" not in t and "<end_of_turn>" not in t)
WORDS = st.sampled_from(["a", "user", "assistant", "im_start", "im_end", "system", "s", "\n", " I", "Arr", "?"])


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    turns = draw(st.integers(1, 3))
    text = st.one_of(TEXT, WORDS.filter(lambda w: bool(w.strip())))
    messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(text)})
    return messages


@settings(**PROFILE)
@given(conversations(), st.sampled_from(["llama", "gemma2"]))
def test_spans_decode_to_the_assistant_contents(messages: list[dict[str, str]], kind: str) -> None:
    lm = _lm(kind)
    rendered = render_chat(lm.tokenizer, messages, lm.profile)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [s.turn for s in rendered.spans] == list(range(len(assistant)))
    previous_end = 0
    for span, content in zip(rendered.spans, assistant, strict=True):
        assert previous_end <= span.start < span.end <= len(rendered.input_ids)
        decoded = lm.tokenizer.decode(rendered.input_ids[span.start : span.end])
        assert decoded.strip() == content.strip(), (decoded, content, rendered.text)
        previous_end = span.end


_LMS: dict[str, LoadedModel] = {}


def _lm(kind: str) -> LoadedModel:
    if kind not in _LMS:
        _LMS[kind] = tiny_model(kind)
    return _LMS[kind]


def test_tiny_tokenizer_round_trips_text() -> None:
    tok = tiny_tokenizer()
    text = "Ünïcödé, tabs\tand\nnewlines — 🚀"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
