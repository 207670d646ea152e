"""Activation capping: the floor holds at every generated position, uncapped layers stay untouched, calibration equals
percentiles computed by hand, and the reference ceiling-on-−axis form gives the same generations as our floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model

from personaxis.axis import Axis
from personaxis.calibration import calibrate
from personaxis.capping import (
    Cap,
    CappingConfig,
    CappingError,
    CapVector,
    Experiment,
    default_bands,
    experiment_id,
    parse_experiment_id,
)
from personaxis.chat import build_conversation, render_prompt
from personaxis.generation import SamplingConfig, generate_ids
from personaxis.hooks import hook_count, residual_hooks
from personaxis.interventions import CeilingCap, FloorCap
from personaxis.io.tensor_files import load_axis, load_capping, save_capping
from personaxis.pipeline import Pipeline
from personaxis.settings import RunSettings
from personaxis.store import RunDirError

QUESTIONS = ["Who are you?", "Tell me about yourself.", "What do you fear most? Explain how rainbows form."]
BAND = (1, 3)  # layers 1 and 2 of the tiny 4-layer model
EXP = "layers_1:3-p0.75"


def _prompts(lm):
    return [render_prompt(lm.tokenizer, build_conversation(None, q), lm.profile) for q in QUESTIONS]


def _record(lm, layers):
    """Readers that keep every forward call's block output and padding mask at the given layers."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {layer: [] for layer in layers}

    def reader(layer):
        return lambda h, m: seen[layer].append((h.detach().clone(), None if m is None else m.clone()))

    return seen, residual_hooks(lm, readers={layer: [reader(layer)] for layer in layers})


def _projections(calls, unit):
    values = []
    for hidden, mask in calls:
        proj = hidden.to(torch.float64) @ unit.to(torch.float64)
        values.append(proj[mask] if mask is not None else proj.flatten())
    return torch.cat(values)


def _axis(lm, seed=3) -> torch.Tensor:
    return torch.randn(
        lm.profile.n_layers, lm.profile.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float32
    )


def _config(lm, vectors: torch.Tensor, percentile: float = 75.0) -> CappingConfig:
    """A floor at the given percentile of the uncapped model's own projections at every position of the test prompts."""
    layers = list(range(*BAND))
    seen, readers = _record(lm, layers)
    with readers:
        generate_ids(lm, _prompts(lm), SamplingConfig(max_new_tokens=10, batch_size=3))
    taus = {}
    for layer in layers:
        proj = _projections(seen[layer], vectors[layer] / vectors[layer].norm())
        taus[layer] = float(np.percentile(proj.numpy(), percentile))
    return CappingConfig(
        {f"axis_layer_{layer}": CapVector(layer, vectors[layer].to(lm.model.dtype)) for layer in layers},
        [Experiment(EXP, tuple(Cap(f"axis_layer_{layer}", taus[layer]) for layer in layers))],
    )


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama64():
    return tiny_model("llama", dtype=torch.float64)


def test_floor_holds_at_every_generated_position_and_layers_before_the_band_are_untouched(llama):
    lm = llama
    vectors = _axis(lm)
    config = _config(lm, vectors)
    ops = config.interventions(EXP)
    layers = list(range(lm.profile.n_layers))
    plain, readers = _record(lm, layers)
    with readers:
        plain_ids = generate_ids(lm, _prompts(lm), SamplingConfig(max_new_tokens=10, batch_size=3))
    capped, readers = _record(lm, layers)
    baseline = hook_count(lm)
    with config.apply(lm, EXP), readers:
        assert hook_count(lm) == baseline + 1 + len(ops) + 1 + len(layers)  # writers + their tracker, readers + theirs
        capped_ids = generate_ids(lm, _prompts(lm), SamplingConfig(max_new_tokens=10, batch_size=3))
    assert hook_count(lm) == baseline
    assert len(capped[1]) > 5  # prefill plus one call per generated token
    for layer in range(*BAND):
        (op,) = ops[layer]
        before = _projections(plain[layer], op.unit)
        after = _projections(capped[layer], op.unit)
        assert (before < op.tau).sum() > 5, "the cap must bite for this test to mean anything"
        assert float(after.min()) >= op.tau - 1e-5 * max(1.0, abs(op.tau)), (layer, float(after.min()), op.tau)
    # layer 0 comes before the band: the prefill pass is bit-identical to the uncapped run's
    assert torch.equal(capped[0][0][0], plain[0][0][0])
    assert not torch.equal(capped[3][0][0], plain[3][0][0])  # downstream of the band, the stream did change
    assert capped_ids != plain_ids


def test_teacher_forced_floor_holds_and_positions_above_it_are_bit_identical(llama64):
    lm = llama64
    vectors = _axis(lm).to(torch.float64)
    config = _config(lm, vectors, percentile=90.0)
    ids = torch.randint(5, len(lm.tokenizer), (2, 16), generator=torch.Generator().manual_seed(4))
    layers = list(range(lm.profile.n_layers))
    plain, readers = _record(lm, layers)
    with readers:
        lm.model(input_ids=ids)
    capped, readers = _record(lm, layers)
    with config.apply(lm, EXP), readers:
        lm.model(input_ids=ids)
    assert torch.equal(capped[0][0][0], plain[0][0][0])
    for layer, (op,) in config.interventions(EXP).items():
        proj = _projections(capped[layer], op.unit)
        before = _projections(plain[layer], op.unit)
        # the operator keeps its unit vector in float32 (personaxis.interventions), so |û|² = 1 ± 1e-7 and the floor
        # holds to that relative precision even in float64
        assert float(proj.min()) >= op.tau - 1e-6 * (1 + float(before.abs().max()))
        assert (before < op.tau).any() and (before >= op.tau).any()
    # at the first capped layer, positions already above the floor are bit-identical to the uncapped stream
    (op,) = config.interventions(EXP)[BAND[0]]
    h_plain, h_capped = plain[BAND[0]][0][0], capped[BAND[0]][0][0]
    above = (h_plain.to(torch.float64) @ op.unit.to(torch.float64)) >= op.tau
    assert torch.equal(h_capped[above], h_plain[above])


def test_reference_ceiling_on_negated_axis_gives_the_same_generations_as_our_floor(llama64, tmp_path):
    lm = llama64
    vectors = _axis(lm, seed=5).to(torch.float64)
    ours = _config(lm, vectors, percentile=75.0)
    layers = list(range(*BAND))
    taus = {ours.vectors[c.vector].layer: c.tau for c in ours.experiment(EXP).caps}
    reference = {
        "vectors": {f"neg_axis_{layer}": {"vector": -vectors[layer], "layer": layer} for layer in layers},
        "experiments": [
            {"id": "layers_0:1-p0.5", "interventions": [{"vector": "neg_axis_1", "cap": 0.0}]},
            {"id": EXP, "interventions": [{"vector": f"neg_axis_{layer}", "cap": -taus[layer]} for layer in layers]},
        ],
    }
    path = tmp_path / "capping_config.pt"
    torch.save(reference, path)
    config = SamplingConfig(max_new_tokens=12, batch_size=3)
    plain = generate_ids(lm, _prompts(lm), config)
    floor = generate_ids(lm, _prompts(lm), config, interventions=ours.interventions(EXP))
    by_hand = {layer: [CeilingCap(-vectors[layer], tau=-taus[layer])] for layer in layers}  # the reference semantics
    ceiling = generate_ids(lm, _prompts(lm), config, interventions=by_hand)
    loaded = load_capping(path)
    with loaded.apply(lm, EXP):
        imported = generate_ids(lm, _prompts(lm), config)
    assert floor == ceiling == imported
    assert floor != plain
    for layer, (op,) in loaded.interventions(EXP).items():
        assert isinstance(op, FloorCap) and not isinstance(op, CeilingCap)
        assert op.tau == taus[layer] and torch.equal(op.vector, vectors[layer])


# --------------------------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cap") / "run"
    settings = RunSettings.from_preset(
        "tiny", model="tiny", judge="none", n_traits=1, max_new_tokens=6, n_questions=3, n_roles=3
    )
    Pipeline(out, settings, lm=tiny_model("llama"), show_progress=False).run(
        ["generate", "extract", "judge", "vectors", "axis"]
    )
    return out


def test_calibration_equals_numpy_percentiles_of_projections_by_hand(run_dir):
    config = calibrate(run_dir, percentiles=(1, 25, 50, 75))
    files = sorted((run_dir / "activations").rglob("*.safetensors"))
    kinds = {f.parent.name for f in files}
    assert "default" in kinds and any(k.startswith("trait") for k in kinds) and len(kinds) >= 5
    means = torch.cat([load_file(str(f))["means"].to(torch.float64) for f in files])
    axis = load_axis(run_dir / "axis.safetensors")
    unit = axis.vectors.to(torch.float64)
    unit = unit / unit.norm(dim=-1, keepdim=True)
    projections = torch.einsum("nlh,lh->nl", means, unit).numpy()
    expected = np.percentile(projections, [1, 25, 50, 75], axis=0)
    assert config.thresholds is not None and config.thresholds.shape == (4, axis.n_layers)
    np.testing.assert_allclose(config.thresholds.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert config.metadata["n_rollouts"] == means.shape[0]
    assert config.floor(2, 25) == pytest.approx(expected[1, 2], abs=1e-12)
    # one experiment per band and percentile, each cap at its layer's threshold
    bands = default_bands(axis.n_layers)
    assert len(config.experiment_ids) == len(bands) * 4
    for start, end in bands:  # (start, end), end-exclusive, as the experiment ids
        exp = config.experiment(experiment_id(start, end, 25))
        assert config.layers(exp.id) == list(range(start, end))
        for cap in exp.caps:
            assert cap.kind == "floor" and cap.tau == float(config.thresholds[1, config.vectors[cap.vector].layer])
    # the same from a Pipeline object and an explicit axis
    again = calibrate(
        Pipeline(
            run_dir,
            RunSettings.from_preset(
                "tiny", model="tiny", judge="none", n_traits=1, max_new_tokens=6, n_questions=3, n_roles=3
            ),
        ),
        axis,
        percentiles=(1, 25, 50, 75),
    )
    assert torch.equal(again.thresholds, config.thresholds)


def test_calibrated_config_save_load_and_apply(run_dir, tmp_path, llama):
    config = calibrate(run_dir, percentiles=(25,), bands=[(1, 3)])
    assert config.experiment_ids == ["layers_1:3-p0.25"]
    path = save_capping(config, tmp_path / "capping.safetensors")
    loaded = load_capping(path)
    assert loaded.experiment_ids == config.experiment_ids and loaded.percentiles == config.percentiles
    assert torch.equal(loaded.thresholds, config.thresholds)
    for name, cv in config.vectors.items():
        assert loaded.vectors[name].layer == cv.layer and torch.equal(loaded.vectors[name].vector, cv.vector)
    assert [e.caps for e in loaded.experiments] == [e.caps for e in config.experiments]
    ceilings = loaded.interventions("layers_1:3-p0.25", ceiling=True)
    assert all(isinstance(op, CeilingCap) for ops in ceilings.values() for op in ops)
    baseline = hook_count(llama)
    with pytest.raises(RuntimeError, match="boom"), loaded.apply(llama, "layers_1:3-p0.25"):
        raise RuntimeError("boom")
    assert hook_count(llama) == baseline


def test_calibration_bad_inputs(run_dir, tmp_path):
    axis = load_axis(run_dir / "axis.safetensors")
    with pytest.raises(CappingError, match="percentiles are in percent"):
        calibrate(run_dir, percentiles=(25, 101))
    with pytest.raises(CappingError, match="percentiles are in percent"):
        calibrate(run_dir, percentiles=(float("nan"),))
    with pytest.raises(CappingError, match="at least one percentile"):
        calibrate(run_dir, percentiles=())
    with pytest.raises(CappingError, match="does not fit a model of 4 layers"):
        calibrate(run_dir, bands=[(3, 2)])
    wrong_layers = Axis(torch.randn(5, axis.hidden_size))
    with pytest.raises(CappingError, match="do not fit an axis of 5 layers"):
        calibrate(run_dir, wrong_layers, bands=[(1, 2)])
    wrong_hidden = Axis(torch.randn(axis.n_layers, axis.hidden_size + 1))
    with pytest.raises(CappingError, match="hidden size"):
        calibrate(run_dir, wrong_hidden)
    with pytest.raises(RunDirError, match="not a personaxis run directory"):
        calibrate(tmp_path, axis)


def test_missing_activations_are_reported(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    next((copy / "activations").rglob("*.safetensors")).unlink()
    with pytest.raises(RunDirError, match="personaxis extract"):
        calibrate(copy)


# ------------------------------------------------------------------------------------------------------ config basics
def test_ids_and_default_bands():
    assert experiment_id(46, 54, 25) == "layers_46:54-p0.25"
    assert experiment_id(56, 72, 1) == "layers_56:72-p0.01"
    assert parse_experiment_id("layers_46:54-p0.25") == (46, 54, 25.0)
    assert parse_experiment_id("something else") is None
    assert (46, 54) in default_bands(64)  # Qwen 3 32B's best band, (start, end) end-exclusive
    assert (56, 72) in default_bands(80)  # Llama 3.3 70B's
    for n in (1, 4, 30, 64, 80):
        bands = default_bands(n)
        assert bands and all(0 <= s < e <= n for s, e in bands) and len(set(bands)) == len(bands)


def test_one_bands_convention_from_the_command_line_to_the_config():
    """``--bands 22:26`` is (22, 26) end-exclusive in the options, in calibration and in the experiment id; the
    metadata of configs written before the convention was recorded ((start, width)) is read as (start, end)."""
    from personaxis.capping import BAND_CONVENTION, calibrate_from_projections, recorded_bands
    from personaxis.options import parse_bands

    assert parse_bands("1:3,2:4") == [(1, 3), (2, 4)]
    axis = Axis(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    projections = np.arange(40, dtype=np.float64).reshape(10, 4)
    config = calibrate_from_projections(projections, axis, (25,), parse_bands("1:3,2:4"))
    assert config.experiment_ids == ["layers_1:3-p0.25", "layers_2:4-p0.25"]
    assert config.layers("layers_1:3-p0.25") == [1, 2] and config.layers("layers_2:4-p0.25") == [2, 3]
    assert config.metadata["bands"] == [[1, 3], [2, 4]] and config.metadata["band_convention"] == BAND_CONVENTION
    assert recorded_bands(config.metadata) == [(1, 3), (2, 4)]
    assert recorded_bands({"bands": [[1, 2], [2, 2]]}) == [(1, 3), (2, 4)]  # an older config's (start, width)
    with pytest.raises(CappingError, match="band 3:2"):
        calibrate_from_projections(projections, axis, (25,), [(3, 2)])


def test_bad_configs_give_clear_errors(llama):
    hidden = llama.profile.hidden_size
    good = {"v": CapVector(1, torch.randn(hidden))}
    exp = [Experiment("e", (Cap("v", 0.5),))]
    config = CappingConfig(good, exp)
    with pytest.raises(CappingError, match="unknown capping experiment 'nope'; this config has: e"):
        config.interventions("nope")
    with pytest.raises(CappingError, match="no calibrated thresholds"):
        config.floor(1)
    for bad, message in (
        (torch.full((hidden,), float("nan")), "NaN or inf"),
        (torch.tensor([float("inf")] + [0.0] * (hidden - 1)), "NaN or inf"),
        (torch.zeros(hidden), "all zeros"),
        (torch.randn(2, hidden), "1-D"),
    ):
        with pytest.raises(CappingError, match=message):
            CappingConfig({"v": CapVector(1, bad)}, exp)
    with pytest.raises(CappingError, match="share one hidden size"):
        CappingConfig({**good, "w": CapVector(2, torch.randn(hidden + 1))}, exp)
    with pytest.raises(CappingError, match="unknown vector 'w'"):
        CappingConfig(good, [Experiment("e", (Cap("w", 0.5),))])
    with pytest.raises(CappingError, match="must be finite"):
        Cap("v", float("nan"))
    with pytest.raises(CappingError, match="appears twice"):
        CappingConfig(good, exp + exp)
    with pytest.raises(CappingError, match="has 4 layers"):
        with CappingConfig({"v": CapVector(7, torch.randn(hidden))}, exp).apply(llama, "e"):
            pass
    with pytest.raises(CappingError, match="hidden size 33"):
        with CappingConfig({"v": CapVector(1, torch.randn(hidden + 1))}, exp).apply(llama, "e"):
            pass


def test_empty_or_foreign_files_are_refused(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CappingError, match="not a valid safetensors file"):
        load_capping(empty)
    from safetensors.torch import save_file

    other = tmp_path / "axis.safetensors"
    save_file({"axis": torch.randn(4, 8)}, str(other))
    with pytest.raises(CappingError, match="not a personaxis capping config"):
        load_capping(other)
    with pytest.raises(CappingError, match="not found"):
        load_capping(tmp_path / "missing.safetensors")


def test_floor_cap_matches_operator_semantics():
    """``interventions`` gives the same operators the paper's formula describes."""
    v = torch.randn(16, generator=torch.Generator().manual_seed(2))
    config = CappingConfig({"a": CapVector(0, v)}, [Experiment("x", (Cap("a", 0.3),))])
    (op,) = config.interventions("x")[0]
    h = torch.randn(40, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = op.unit.to(torch.float64)
    expected = h - u * torch.clamp(h @ u - 0.3, max=0).unsqueeze(-1)
    torch.testing.assert_close(op(h), expected, rtol=0, atol=1e-12)


def test_cli_calibrate_writes_both_formats_and_prints_the_table(run_dir, tmp_path):
    from typer.testing import CliRunner

    from personaxis.cli import app

    out, ref = tmp_path / "capping.safetensors", tmp_path / "capping.pt"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--run",
            str(run_dir),
            "--percentiles",
            "10,25",
            "--bands",
            "1:3,2:4",
            "--out",
            str(out),
            "--reference-out",
            str(ref),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "layers 1:3" in result.output and "layers 2:4" in result.output and "p25" in result.output
    ours, theirs = load_capping(out), load_capping(ref)
    assert (
        ours.experiment_ids
        == theirs.experiment_ids
        == ["layers_1:3-p0.1", "layers_1:3-p0.25", "layers_2:4-p0.1", "layers_2:4-p0.25"]
    )
    assert torch.equal(ours.thresholds, theirs.thresholds)
    bad = CliRunner().invoke(app, ["calibrate", "--run", str(run_dir), "--bands", "3:9", "--out", str(out)])
    assert bad.exit_code == 2 and "does not fit a model of 4 layers" in bad.output
