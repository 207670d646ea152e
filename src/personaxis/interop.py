"""Read and write the published reference formats, and export llama.cpp control vectors.

Reference files are plain torch pickles of tensors. They are read with ``torch.load(weights_only=True)`` and nothing
else: a file that holds anything but tensors and plain containers is refused (and none of its code runs).

- axis: a tensor ``[n_layers, hidden]``, or a dict with key ``"axis"`` (and optionally ``"metadata"``);
- role / default / trait vectors: a tensor ``[n_layers, hidden]``, or a dict with key ``"vector"``;
- capping config: ``{"vectors": {name: {"vector": tensor[hidden], "layer": int}}, "experiments": [{"id":
  "layers_46:54-p0.25", "interventions": [{"vector": name, "cap": float}]}]}``. Each intervention is a *ceiling* on
  the named vector; the published vectors are the negated axis, so a ceiling on −â at −τ is our floor on +â at τ.
  Reading turns every reference ceiling on ``w`` at ``c`` into our floor on ``−w`` at ``−c`` (exact: negation is
  exact in floating point), and writing turns it back, so a round trip gives identical tensors.

llama.cpp control vectors (``--control-vector``) are GGUF files of architecture ``controlvector`` with keys
``controlvector.model_hint`` and ``controlvector.layer_count`` and one float32 tensor ``direction.N`` of shape
``[hidden]`` per layer. llama.cpp adds ``direction.N`` to the output of its (zero-based) block ``N`` — the loader puts
it at offset ``N − 1`` of a buffer that starts at block 1 and the model reads block ``il`` from offset ``il − 1`` — so
``N`` equals our zero-based layer index; numbering starts at 1 because block 0 cannot be addressed.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from personaxis.axis import Axis, AxisError, check_layer_vectors
from personaxis.capping import Cap, CappingConfig, CappingError, CapVector, Experiment, parse_experiment_id
from personaxis.steering import steering_vector
from personaxis.store import atomic_save_tensors, atomic_write_bytes
from personaxis.validate import check

GGUF_ARCH = "controlvector"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


class InteropError(AxisError):
    """A reference or GGUF file cannot be read, is unsafe, or does not hold what was asked for."""


# ------------------------------------------------------------------------------------------------ safe torch files
# Reference files hold vectors (an axis, role vectors: megabytes even for 70B models); anything far larger is not one.
MAX_TORCH_FILE_BYTES = 4 << 30


def safe_torch_load(path: str | Path, *, max_bytes: int = MAX_TORCH_FILE_BYTES) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``, with clear errors; never runs code from the file
    and refuses files over ``max_bytes`` before reading them."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise InteropError(f"{path}: the file is empty")
    if size > max_bytes:
        raise InteropError(
            f"{path}: {size / 2**20:.0f} MiB is more than the {max_bytes / 2**20:.0f} MiB a file of "
            "vectors should need, so it was not loaded (pass max_bytes to allow it)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except RuntimeError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc) or "WeightsUnpickler" in str(exc):
            raise _refused(path, exc) from None
        raise InteropError(f"{path}: not a readable torch file ({exc})") from None
    except EOFError:
        raise InteropError(f"{path}: the file is truncated or empty") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means "not a torch file we can read"
        raise InteropError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None


_UNSAFE_GLOBAL = re.compile(r"Unsupported (?:global|operand)[^.\n]*?(?:GLOBAL\s+)?([\w.]+)")


def _refused(path: Path, exc: BaseException) -> InteropError:
    """The refusal of a file that holds non-tensor objects: names what was found, never PyTorch's own advice (which
    suggests ``weights_only=False``, i.e. running the file's code)."""
    found = _UNSAFE_GLOBAL.search(str(exc))
    detail = f"it refers to {found.group(1)}" if found else "unsupported pickle content"
    return InteropError(
        f"{path}: refused: the file holds non-tensor objects ({detail}), so it was not loaded. Reference files must "
        "hold only tensors and plain containers; personaxis never runs code from a file."
    )


def safe_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename (a file exists only once it is complete)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        return f"a dict with keys {keys or '(none)'}"
    return f"a {type(obj).__name__}"


def _plain(value: Any) -> Any:
    """JSON-like metadata only (what weights_only can read back)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ------------------------------------------------------------------------------------------------ axis and vectors
def load_reference_axis(path: str | Path, *, model: str | None = None) -> Axis:
    """An axis from a reference file: a tensor ``[n_layers, hidden]`` or a dict with key ``"axis"``."""
    obj = safe_torch_load(path)
    metadata: dict[str, Any] = {}
    norms = None
    if isinstance(obj, Tensor):
        vectors = obj
    elif isinstance(obj, Mapping) and "axis" in obj:
        vectors = obj["axis"]
        if isinstance(obj.get("metadata"), Mapping):
            metadata = {str(k): _plain(v) for k, v in obj["metadata"].items()}
        if isinstance(obj.get("residual_norms"), Tensor):
            norms = obj["residual_norms"]
    else:
        raise InteropError(
            f"{path}: expected a tensor [n_layers, hidden] or a dict with key 'axis'; found {_describe(obj)}"
        )
    try:
        vectors = check_layer_vectors(vectors, name="axis")
        target = metadata.pop("target_layer", None)
        name = model or metadata.pop("model", None) or "unknown"
        metadata.setdefault("imported_from", str(path))
        return Axis(
            vectors.to(torch.float32),
            model=str(name),
            target_layer=target if isinstance(target, int) else None,
            residual_norms=norms,
            metadata=metadata,
        )
    except AxisError as exc:
        raise InteropError(f"{path}: {exc}") from None


def save_reference_axis(axis: Axis, path: str | Path, *, plain: bool = False) -> Path:
    """Write the reference axis file: ``{"axis": [n_layers, hidden], "metadata": {...}}`` (or a bare tensor)."""
    if plain:
        return safe_torch_save(axis.vectors.clone(), path)
    data: dict[str, Any] = {
        "axis": axis.vectors.clone(),
        "metadata": _plain(
            {
                **axis.metadata,
                "model": axis.model,
                "target_layer": axis.target_layer,
                "sign": "assistant_positive",
                "layer_convention": "block_output",
            }
        ),
    }
    if axis.residual_norms is not None:
        data["residual_norms"] = axis.residual_norms.clone()
    return safe_torch_save(data, path)


def load_reference_vectors(path: str | Path, *, n_layers: int | None = None, hidden: int | None = None) -> Tensor:
    """A role / default / trait vector ``[n_layers, hidden]``: a bare tensor or a dict with key ``"vector"``."""
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and "vector" in obj:
        obj = obj["vector"]
    if not isinstance(obj, Tensor):
        raise InteropError(
            f"{path}: expected a tensor [n_layers, hidden] or a dict with key 'vector'; found {_describe(obj)}"
        )
    try:
        return check_layer_vectors(obj, name="vector", n_layers=n_layers, hidden=hidden).to(torch.float32)
    except AxisError as exc:
        raise InteropError(f"{path}: {exc}") from None


def save_reference_vectors(vectors: Tensor, path: str | Path, *, plain: bool = False) -> Path:
    vectors = check_layer_vectors(torch.as_tensor(vectors), name="vector").detach().cpu().clone()
    return safe_torch_save(vectors if plain else {"vector": vectors}, path)


def import_vectors(source: str | Path, target: str | Path) -> Path:
    """A reference vector file → ours: safetensors ``{"vector": [n_layers, hidden]}`` with JSON-free metadata."""
    vectors = load_reference_vectors(source)
    target = Path(target)
    if target.suffix != ".safetensors":
        raise InteropError(f"{target}: our vector files are .safetensors files")
    atomic_save_tensors(target, {"vector": vectors}, {"format": "personaxis.vector/1", "imported_from": str(source)})
    return target


# ------------------------------------------------------------------------------------------------ capping configs
def _finite_float(value: Any, what: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InteropError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def capping_from_reference(obj: Any, source: str = "capping config") -> CappingConfig:
    """Our :class:`CappingConfig` from a loaded reference dict (ceilings on ``w`` at ``c`` → floors on ``−w`` at ``−c``)."""
    if (
        not isinstance(obj, Mapping)
        or not isinstance(obj.get("vectors"), Mapping)
        or not isinstance(obj.get("experiments"), (list, tuple))
    ):
        raise InteropError(
            f"{source}: expected a dict with 'vectors' (a dict) and 'experiments' (a list); found {_describe(obj)}"
        )
    vectors: dict[str, CapVector] = {}
    for name, entry in obj["vectors"].items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("vector"), Tensor) or "layer" not in entry:
            raise InteropError(
                f"{source}: vector {name!r} must be a dict with 'vector' (a tensor [hidden]) and 'layer'"
            )
        layer = entry["layer"]
        if isinstance(layer, Tensor) and layer.numel() == 1:
            layer = int(layer.item())
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise InteropError(f"{source}: vector {name!r} has layer {layer!r}; expected a non-negative int")
        tensor = entry["vector"]
        if tensor.dim() != 1 or not tensor.is_floating_point():
            raise InteropError(
                f"{source}: vector {name!r} must be a 1-D float tensor [hidden], got {tuple(tensor.shape)} {tensor.dtype}"
            )
        vectors[str(name)] = CapVector(layer, -tensor.detach().cpu())
    experiments: list[Experiment] = []
    skipped: list[str] = []
    for index, exp in enumerate(obj["experiments"]):
        if not isinstance(exp, Mapping) or not isinstance(exp.get("interventions"), (list, tuple)):
            raise InteropError(f"{source}: experiment {index} must be a dict with 'id' and 'interventions' (a list)")
        exp_id = str(exp.get("id", index))
        caps = []
        for item in exp["interventions"]:
            if not isinstance(item, Mapping) or "vector" not in item:
                raise InteropError(f"{source}: experiment {exp_id!r} has a malformed intervention {item!r}")
            if "cap" not in item:
                continue  # the reference steerer ignores interventions without a cap as well
            name = str(item["vector"])
            if name not in vectors:
                raise InteropError(f"{source}: experiment {exp_id!r} refers to unknown vector {name!r}")
            caps.append(Cap(name, -_finite_float(item["cap"], f"{source}: experiment {exp_id!r} cap on {name!r}")))
        if caps:
            experiments.append(Experiment(exp_id, tuple(caps)))
        else:
            skipped.append(exp_id)
    extra = obj.get("personaxis") if isinstance(obj.get("personaxis"), Mapping) else {}
    metadata = {str(k): _plain(v) for k, v in (extra.get("metadata") or {}).items()}
    if skipped:
        metadata["skipped_experiments_without_caps"] = skipped
    percentiles, thresholds = extra.get("percentiles"), extra.get("thresholds")
    if not isinstance(thresholds, Tensor):
        percentiles, thresholds = _thresholds_from_ids(vectors, experiments)
    try:
        return CappingConfig(
            vectors,
            experiments,
            percentiles=percentiles,
            thresholds=thresholds,
            model=str(extra.get("model", "unknown")),
            metadata=metadata,
        )
    except CappingError as exc:
        raise InteropError(f"{source}: {exc}") from None


def _thresholds_from_ids(
    vectors: Mapping[str, CapVector], experiments: Sequence[Experiment]
) -> tuple[list[float] | None, Tensor | None]:
    """Per-layer floors recovered from ids like ``layers_46:54-p0.25`` (NaN where no experiment says)."""
    found: dict[float, dict[int, float]] = {}
    for exp in experiments:
        parsed = parse_experiment_id(exp.id)
        if parsed is None:
            continue
        for cap in exp.caps:
            if cap.kind == "floor":
                found.setdefault(parsed[2], {})[vectors[cap.vector].layer] = cap.tau
    if not found or not vectors:
        return None, None
    n_layers = max(cv.layer for cv in vectors.values()) + 1
    percentiles = sorted(found)
    thresholds = torch.full((len(percentiles), n_layers), float("nan"), dtype=torch.float64)
    for i, p in enumerate(percentiles):
        for layer, tau in found[p].items():
            thresholds[i, layer] = tau
    return percentiles, thresholds


def capping_to_reference(config: CappingConfig) -> dict[str, Any]:
    """The reference dict: our floor on ``v`` at ``τ`` becomes a ceiling on ``−v`` at ``−τ``; a ceiling stays one
    (its vector then gets the suffix ``"+"`` if the same name also serves a floor)."""
    used = list(dict.fromkeys((cap.vector, cap.kind) for exp in config.experiments for cap in exp.caps))
    names: dict[tuple[str, str], str] = {}
    ref_vectors: dict[str, dict[str, Any]] = {}
    for vector_name, kind in used:
        name = vector_name if kind == "floor" or (vector_name, "floor") not in used else f"{vector_name}+"
        cv = config.vectors[vector_name]
        names[(vector_name, kind)] = name
        ref_vectors[name] = {"vector": (-cv.vector if kind == "floor" else cv.vector).clone(), "layer": cv.layer}
    experiments = [
        {
            "id": exp.id,
            "interventions": [
                {"vector": names[(c.vector, c.kind)], "cap": -float(c.tau) if c.kind == "floor" else float(c.tau)}
                for c in exp.caps
            ],
        }
        for exp in config.experiments
    ]
    extra: dict[str, Any] = {"model": config.model, "metadata": _plain(config.metadata)}
    if config.thresholds is not None and config.percentiles is not None:
        extra.update(percentiles=list(config.percentiles), thresholds=config.thresholds.clone())
    return {"vectors": ref_vectors, "experiments": experiments, "personaxis": extra}


def load_reference_capping(path: str | Path) -> CappingConfig:
    return capping_from_reference(safe_torch_load(path), str(path))


def save_reference_capping(config: CappingConfig, path: str | Path) -> Path:
    return safe_torch_save(capping_to_reference(config), path)


# ------------------------------------------------------------------------------------------------ GGUF control vectors
def control_vectors(axis: Axis, layers: Sequence[int], *, scale: float = 1.0, raw: bool = False) -> dict[int, Tensor]:
    """What to add at each layer: ``scale · r_l · â_l`` (``scale`` in units of the layer's mean residual norm, like
    ``personaxis steer --alpha``), or ``scale · axis[l]`` as stored when ``raw``."""
    try:
        check("scale", scale)
    except ValueError as exc:
        raise InteropError(str(exc)) from None
    if not layers:
        raise InteropError("give at least one layer to export")
    if not raw and axis.residual_norms is None:
        raise InteropError(
            "this axis has no residual norms: export raw vectors (--raw) and give the scale in raw units"
        )
    out: dict[int, Tensor] = {}
    for layer in layers:
        axis.layer(layer)
        if layer == 0:
            raise InteropError(
                "llama.cpp control vectors cannot address layer 0 (the first block's output); pick layers ≥ 1"
            )
        vector = steering_vector(axis, layer, float(scale), raw=raw).to(torch.float32).contiguous()
        if not bool(torch.isfinite(vector).all()):
            raise InteropError(f"layer {layer}: the control vector overflows float32 at --scale {scale:g}")
        out[layer] = vector
    return out


def export_gguf(
    axis: Axis,
    path: str | Path,
    layers: Sequence[int],
    *,
    scale: float = 1.0,
    raw: bool = False,
    model_hint: str | None = None,
) -> Path:
    """Write a llama.cpp control vector (``--control-vector FILE``) for the given layers."""
    import gguf

    vectors = control_vectors(axis, sorted(set(layers)), scale=scale, raw=raw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        try:
            writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint or axis.model)
            writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vectors))
            for layer, vector in vectors.items():
                writer.add_tensor(f"direction.{layer}", vector.numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_gguf_control_vector(
    path: str | Path, *, hidden: int | None = None
) -> tuple[dict[int, Tensor], dict[str, Any]]:
    """The ``{layer: vector}`` of a llama.cpp control vector, and its ``controlvector.*`` metadata."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise InteropError(f"{path}: the file is empty")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds of errors on bad files
        raise InteropError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith(f"{GGUF_ARCH}.") or key == "general.architecture":
            meta[key] = field.contents()
    if meta.get("general.architecture") != GGUF_ARCH:
        raise InteropError(f"{path}: GGUF architecture is {meta.get('general.architecture')!r}, not {GGUF_ARCH!r}")
    vectors: dict[int, Tensor] = {}
    for tensor in reader.tensors:
        match = _DIRECTION.match(tensor.name)
        if not match or int(match.group(1)) == 0:
            raise InteropError(
                f"{path}: unexpected tensor {tensor.name!r}; control vectors hold direction.N with N ≥ 1"
            )
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise InteropError(f"{path}: {tensor.name} must be a 1-D float32 tensor")
        vector = torch.from_numpy(tensor.data.copy()).to(torch.float32)
        if hidden is not None and vector.shape[0] != hidden:
            raise InteropError(f"{path}: {tensor.name} has size {vector.shape[0]}, expected {hidden}")
        if not bool(torch.isfinite(vector).all()):
            raise InteropError(f"{path}: {tensor.name} holds NaN or infinite values")
        vectors[int(match.group(1))] = vector
    if not vectors:
        raise InteropError(f"{path}: no direction tensors")
    if len({v.shape[0] for v in vectors.values()}) != 1:
        raise InteropError(f"{path}: direction tensors differ in size")
    return dict(sorted(vectors.items())), meta
