"""Reference formats and llama.cpp control vectors: exact round trips, refusal of pickles that would run code, clear
errors on bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personaxis.axis import Axis, AxisError
from personaxis.capping import Cap, CappingConfig, CapVector, Experiment
from personaxis.interop import (
    InteropError,
    capping_to_reference,
    control_vectors,
    export_gguf,
    import_vectors,
    load_reference_axis,
    load_reference_capping,
    load_reference_vectors,
    read_gguf_control_vector,
    safe_torch_load,
    save_reference_axis,
    save_reference_capping,
    save_reference_vectors,
)
from personaxis.io.tensor_files import load_axis, load_capping, save_axis, save_capping


def _axis(n_layers: int = 6, hidden: int = 16) -> Axis:
    g = torch.Generator().manual_seed(0)
    return Axis(
        torch.randn(n_layers, hidden, generator=g),
        model="tiny-test",
        target_layer=3,
        residual_norms=torch.rand(n_layers, generator=g) + 1.0,
        metadata={"made_by": "test", "n_roles": 7},
    )


def _config(axis: Axis) -> CappingConfig:
    layers = [2, 3, 4]
    thresholds = torch.randn(2, axis.n_layers, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vectors = {f"axis_layer_{layer}": CapVector(layer, axis.vectors[layer].clone()) for layer in layers}
    experiments = [
        Experiment(
            f"layers_2:5-p{p / 100:g}",
            tuple(Cap(f"axis_layer_{layer}", float(thresholds[i, layer])) for layer in layers),
        )
        for i, p in enumerate((25.0, 50.0))
    ]
    return CappingConfig(
        vectors,
        experiments,
        percentiles=(25.0, 50.0),
        thresholds=thresholds,
        model=axis.model,
        metadata={"made_by": "test"},
    )


def _same_config(a: CappingConfig, b: CappingConfig) -> None:
    assert a.experiment_ids == b.experiment_ids
    assert set(a.vectors) == set(b.vectors)
    for name, cv in a.vectors.items():
        assert b.vectors[name].layer == cv.layer and torch.equal(b.vectors[name].vector, cv.vector)
    assert [e.caps for e in a.experiments] == [e.caps for e in b.experiments]
    assert a.percentiles == b.percentiles
    assert (a.thresholds is None) == (b.thresholds is None)
    if a.thresholds is not None:
        assert torch.equal(a.thresholds, b.thresholds)


# ------------------------------------------------------------------------------------------------------- round trips
def test_axis_round_trip_through_the_reference_file(tmp_path):
    axis = _axis()
    path = save_reference_axis(axis, tmp_path / "assistant_axis.pt")
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert set(raw) >= {"axis", "metadata"} and torch.equal(raw["axis"], axis.vectors)
    for loaded in (load_reference_axis(path), load_axis(path)):
        assert torch.equal(loaded.vectors, axis.vectors)
        assert torch.equal(loaded.residual_norms, axis.residual_norms)
        assert loaded.model == "tiny-test" and loaded.target_layer == 3 and loaded.metadata["n_roles"] == 7
    bare = save_reference_axis(axis, tmp_path / "bare.pt", plain=True)
    assert isinstance(torch.load(bare, weights_only=True), torch.Tensor)
    loaded = load_axis(bare, model="given")
    assert torch.equal(loaded.vectors, axis.vectors) and loaded.model == "given" and loaded.residual_norms is None
    # and back to ours, unchanged
    ours = save_axis(load_reference_axis(path), tmp_path / "axis.safetensors")
    assert torch.equal(load_axis(ours).vectors, axis.vectors)


def test_published_axis_layouts_load(tmp_path):
    vectors = torch.randn(4, 8).to(torch.bfloat16)
    torch.save({"axis": vectors, "metadata": {"model_name": "x"}}, tmp_path / "a.pt")
    torch.save(vectors, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        loaded = load_reference_axis(tmp_path / name)
        assert loaded.vectors.dtype == torch.float32 and torch.equal(loaded.vectors, vectors.to(torch.float32))


def test_vector_files_round_trip(tmp_path):
    vectors = torch.randn(5, 12)
    for plain in (False, True):
        path = save_reference_vectors(vectors, tmp_path / f"pirate_{plain}.pt", plain=plain)
        assert torch.equal(load_reference_vectors(path, n_layers=5, hidden=12), vectors)
    target = import_vectors(tmp_path / "pirate_False.pt", tmp_path / "pirate.safetensors")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(target))["vector"], vectors)


def test_capping_config_round_trip_and_reference_convention(tmp_path):
    axis = _axis()
    config = _config(axis)
    path = save_reference_capping(config, tmp_path / "capping_config.pt")
    raw = torch.load(path, weights_only=True, map_location="cpu")
    # the published convention: vectors are the negated axis, caps are ceilings at −τ
    assert torch.equal(raw["vectors"]["axis_layer_3"]["vector"], -axis.vectors[3])
    assert raw["vectors"]["axis_layer_3"]["layer"] == 3
    first = raw["experiments"][0]
    assert first["id"] == "layers_2:5-p0.25"
    assert first["interventions"][1] == {"vector": "axis_layer_3", "cap": -float(config.thresholds[0, 3])}
    for loaded in (load_reference_capping(path), load_capping(path)):
        _same_config(config, loaded)
        assert loaded.model == "tiny-test"
    # ours → safetensors → ours
    _same_config(config, load_capping(save_capping(config, tmp_path / "capping.safetensors")))


def test_reference_config_without_our_extras_recovers_thresholds_from_ids(tmp_path):
    config = _config(_axis())
    ref = capping_to_reference(config)
    del ref["personaxis"]
    torch.save(ref, tmp_path / "published.pt")
    loaded = load_capping(tmp_path / "published.pt")
    assert loaded.percentiles == (25.0, 50.0)
    for layer in (2, 3, 4):
        assert loaded.floor(layer, 25) == float(config.thresholds[0, layer])
    with pytest.raises(ValueError, match="no threshold for layer 1"):
        loaded.floor(1, 25)


def test_ceiling_caps_survive_the_round_trip_as_equivalent_floors(tmp_path):
    v = torch.randn(16)
    config = CappingConfig(
        {"a": CapVector(1, v)}, [Experiment("x", (Cap("a", 0.5, "ceiling"),)), Experiment("y", (Cap("a", -0.2),))]
    )
    loaded = load_capping(save_reference_capping(config, tmp_path / "c.pt"))
    h = torch.randn(30, 16, dtype=torch.float64)
    for exp in ("x", "y"):
        (before,) = config.interventions(exp)[1]
        (after,) = loaded.interventions(exp)[1]
        assert torch.equal(before(h), after(h))


# --------------------------------------------------------------------------------------------------- unsafe pickles
class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "marker"
    payload = {"axis": _Payload(marker), "vector": _Payload(marker), "vectors": {}, "experiments": [_Payload(marker)]}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    loaders = [
        safe_torch_load,
        load_reference_axis,
        load_reference_vectors,
        load_reference_capping,
        load_axis,
        load_capping,
    ]
    for load in loaders:
        with pytest.raises(InteropError, match="refused: the file holds non-tensor objects") as info:
            load(path)
        assert "was not loaded" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    result = CliRunner().invoke(
        _app(), ["import", "--from", str(path), "--kind", "axis", "--out", str(tmp_path / "a.safetensors")]
    )
    assert result.exit_code == 2 and "refused" in result.output
    assert not marker.exists() and not (tmp_path / "a.safetensors").exists()


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.pt"
    torch.save({"axis": torch.ones(64, 8)}, path)
    with pytest.raises(InteropError, match="more than the .* MiB a file of vectors should need"):
        safe_torch_load(path, max_bytes=path.stat().st_size - 1)
    assert safe_torch_load(path, max_bytes=path.stat().st_size)["axis"].shape == (64, 8)
    read = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: read.append(a))
    with pytest.raises(InteropError):
        safe_torch_load(path, max_bytes=1)
    assert read == []  # refused from the file size alone


# ------------------------------------------------------------------------------------------------------------- GGUF
def test_gguf_export_reads_back_equal(tmp_path):
    axis = _axis()
    path = export_gguf(axis, tmp_path / "axis.gguf", [2, 3, 4], scale=0.3)
    vectors, meta = read_gguf_control_vector(path, hidden=axis.hidden_size)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "tiny-test" and meta["controlvector.layer_count"] == 3
    assert sorted(vectors) == [2, 3, 4]
    for layer, vector in vectors.items():
        expected = 0.3 * float(axis.residual_norms[layer]) * axis.unit(layer)
        assert torch.equal(vector, expected)
        torch.testing.assert_close(vector.norm(), torch.tensor(0.3 * float(axis.residual_norms[layer])))
    raw_path = export_gguf(axis, tmp_path / "raw.gguf", [5], scale=-2.0, raw=True, model_hint="llama")
    vectors, meta = read_gguf_control_vector(raw_path)
    assert meta["controlvector.model_hint"] == "llama" and torch.equal(vectors[5], -2.0 * axis.vectors[5])


def test_gguf_bad_inputs(tmp_path):
    axis = _axis()
    with pytest.raises(InteropError, match="cannot address layer 0"):
        export_gguf(axis, tmp_path / "x.gguf", [0, 1])
    with pytest.raises(IndexError, match="out of range"):
        control_vectors(axis, [6])
    no_norms = Axis(axis.vectors)
    with pytest.raises(InteropError, match="no residual norms"):
        control_vectors(no_norms, [1])
    assert torch.equal(control_vectors(no_norms, [1], raw=True)[1], axis.vectors[1])
    with pytest.raises(InteropError, match="finite"):
        control_vectors(axis, [1], scale=float("nan"))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(InteropError, match="empty"):
        read_gguf_control_vector(tmp_path / "empty.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(InteropError, match="not a readable GGUF file"):
        read_gguf_control_vector(tmp_path / "junk.gguf")
    export_gguf(axis, tmp_path / "ok.gguf", [1])
    with pytest.raises(InteropError, match="expected 17"):
        read_gguf_control_vector(tmp_path / "ok.gguf", hidden=17)


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_bad_reference_files_give_clear_errors(tmp_path):
    def write(name: str, obj) -> Path:
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    cases = [
        (tmp_path / "empty.pt", "empty"),
        (tmp_path / "junk.pt", "not a readable torch file"),
        (tmp_path / "missing.pt", "not found"),
        (write("nan.pt", torch.full((4, 8), float("nan"))), "NaN or inf"),
        (write("inf.pt", {"axis": torch.tensor([[float("inf")] * 8] * 4)}), "NaN or inf"),
        (write("zero.pt", torch.cat([torch.randn(3, 8), torch.zeros(1, 8)])), r"zero vector at layer\(s\) \[3\]"),
        (write("flat.pt", torch.randn(8)), r"shape \[n_layers, hidden\]"),
        (write("ints.pt", torch.ones(4, 8, dtype=torch.int64)), "floating-point"),
        (write("keys.pt", {"vectors": torch.randn(4, 8)}), "dict with key 'axis'; found a dict with keys 'vectors'"),
        (write("list.pt", [torch.randn(4, 8)]), "found a list"),
    ]
    for path, message in cases:
        with pytest.raises(InteropError, match=message):
            load_reference_axis(path)
        assert issubclass(InteropError, AxisError)
    good = write("vec.pt", {"vector": torch.randn(4, 8)})
    with pytest.raises(InteropError, match="has 4 layers but the model has 5"):
        load_reference_vectors(good, n_layers=5)
    with pytest.raises(InteropError, match="hidden size 8 but the model's hidden size is 9"):
        load_reference_vectors(good, hidden=9)


def test_bad_reference_capping_configs(tmp_path):
    v = torch.randn(8)
    count = iter(range(100))

    def config(vectors=None, experiments=None):
        obj = {
            "vectors": {"a": {"vector": v, "layer": 2}} if vectors is None else vectors,
            "experiments": [{"id": "e", "interventions": [{"vector": "a", "cap": -0.5}]}]
            if experiments is None
            else experiments,
        }
        path = tmp_path / f"c{next(count)}.pt"
        torch.save(obj, path)
        return path

    assert load_reference_capping(config()).experiment_ids == ["e"]
    cases = [
        (config(vectors={"a": {"vector": v, "layer": -1}}), "non-negative int"),
        (config(vectors={"a": {"vector": torch.randn(2, 8), "layer": 1}}), "1-D float tensor"),
        (config(vectors={"a": {"vector": torch.zeros(8), "layer": 1}}), "all zeros"),
        (config(vectors={"a": {"vector": torch.full((8,), float("nan")), "layer": 1}}), "NaN or inf"),
        (config(vectors={"a": {"vector": v, "layer": 1}, "b": {"vector": torch.randn(9), "layer": 2}}), "hidden size"),
        (config(experiments=[{"id": "e", "interventions": [{"vector": "zz", "cap": 1.0}]}]), "unknown vector 'zz'"),
        (config(experiments=[{"id": "e", "interventions": [{"vector": "a", "cap": float("nan")}]}]), "finite number"),
        (config(experiments=[{"id": "e", "interventions": [{"vector": "a", "cap": 1.0}]}] * 2), "appears twice"),
    ]
    for path, message in cases:
        with pytest.raises((InteropError, ValueError), match=message):
            load_reference_capping(path)
    torch.save({"vectors": {}}, tmp_path / "nope.pt")
    with pytest.raises(InteropError, match="'vectors' \\(a dict\\) and 'experiments'"):
        load_reference_capping(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown capping experiment 'layers_46:54-p0.25'"):
        load_reference_capping(config()).interventions("layers_46:54-p0.25")


# ------------------------------------------------------------------------------------------------------------- CLI
def _app():
    from personaxis.cli import app

    return app


def test_cli_export_and_import(tmp_path):
    axis = _axis()
    ours = save_axis(axis, tmp_path / "axis.safetensors")
    runner = CliRunner()
    result = runner.invoke(
        _app(),
        [
            "export",
            "--axis",
            str(ours),
            "--format",
            "gguf",
            "--layers",
            "2:5",
            "--scale",
            "0.5",
            "--out",
            str(tmp_path / "cv.gguf"),
        ],
    )
    assert result.exit_code == 0, result.output
    vectors, _ = read_gguf_control_vector(tmp_path / "cv.gguf")
    assert sorted(vectors) == [2, 3, 4]
    result = runner.invoke(
        _app(), ["export", "--axis", str(ours), "--format", "reference", "--out", str(tmp_path / "a.pt")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        _app(), ["import", "--from", str(tmp_path / "a.pt"), "--kind", "axis", "--out", str(tmp_path / "b.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert torch.equal(load_axis(tmp_path / "b.safetensors").vectors, axis.vectors)
    save_reference_capping(_config(axis), tmp_path / "c.pt")
    result = runner.invoke(
        _app(),
        ["import", "--from", str(tmp_path / "c.pt"), "--kind", "capping", "--out", str(tmp_path / "c.safetensors")],
    )
    assert result.exit_code == 0, result.output
    _same_config(_config(axis), load_capping(tmp_path / "c.safetensors"))
    result = runner.invoke(
        _app(), ["export", "--axis", str(ours), "--format", "gguf", "--layer", "0", "--out", str(tmp_path / "z.gguf")]
    )
    assert result.exit_code == 2 and "layer 0" in result.output
    result = runner.invoke(_app(), ["export", "--axis", str(ours), "--format", "onnx", "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "unknown format" in result.output
