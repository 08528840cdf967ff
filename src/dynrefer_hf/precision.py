"""The precision a model runs at: the rule behind ``"auto"`` and how to load a model at a precision.

``"auto"`` (the default of the pipeline, ``dynrefer caption|eval|demo`` and ``examples/finetune.py`` inference):

* on CUDA, upstream's precision (``"upstream"``: the ViT under float16 autocast, Flan-T5 in bfloat16, the rest
  float32, as `DynReferForRegionCaptioning.to_upstream_precision` sets it up);
* on a CPU with native bfloat16 arithmetic (AMX or AVX512-BF16), ``"bfloat16"``: half the memory, a fifth of the
  load time, native bfloat16 matrix products (the end-to-end speed-up measured so far is mixed: docs/performance.md);
* elsewhere ``"float32"``: without native bfloat16 instructions, bfloat16 is emulated and slower than float32.

``--quantize int8`` / ``quantization="int8"`` adds torchao's int8 weights to any of them (`quantization_config`).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "PRECISIONS",
    "QUANTIZATIONS",
    "auto_precision",
    "cpu_has_native_bfloat16",
    "describe_choice",
    "from_pretrained_kwargs",
    "quantization_config",
    "record_dtypes",
    "resolve_precision",
    "set_precision",
    "stored_dtypes",
]

PRECISIONS = ("auto", "float32", "bfloat16", "float16", "upstream")
QUANTIZATIONS = ("int8",)
# /proc/cpuinfo flags of native bfloat16 matrix arithmetic (oneDNN uses them for torch's bf16 matmuls)
_NATIVE_BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16), as torch sees it; the Linux
    CPU flags where this torch cannot say."""
    import torch

    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    ]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    return bool(_NATIVE_BFLOAT16_FLAGS & _cpuinfo_flags())


def auto_precision(device_type: str, native_bfloat16: bool) -> str:
    """The rule of ``"auto"``: ``"upstream"`` on CUDA, ``"bfloat16"`` on a CPU with native bfloat16, else
    ``"float32"``."""
    if device_type == "cuda":
        return "upstream"
    if device_type == "cpu" and native_bfloat16:
        return "bfloat16"
    return "float32"


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def resolve_precision(precision: str, device: str | torch.device) -> tuple[str, str]:
    """``(precision, why)``: ``precision`` itself unless it is ``"auto"``, which the machine decides."""
    import torch

    _check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision, "as asked"
    device_type = torch.device(device).type
    native = device_type == "cpu" and cpu_has_native_bfloat16()
    chosen = auto_precision(device_type, native)
    why = {
        "upstream": "CUDA: upstream's precision (ViT float16 autocast, Flan-T5 bfloat16)",
        "bfloat16": "this CPU has native bfloat16 (AMX or AVX512-BF16)",
        "float32": f"{device_type}: no native bfloat16 here",
    }[chosen]
    return chosen, why


def quantization_config(quantization: str | None):
    """The ``quantization_config`` of ``from_pretrained`` for ``quantization`` (``None``: none).

    ``"int8"``: torchao's int8 weights with int8 dynamic activations (`TorchAoConfig`) on every linear layer of the
    ViT, the Q-Former and the language model; the label heads, embeddings and norms keep their dtype.
    """
    if quantization is None:
        return None
    _check_choice("quantization", quantization, QUANTIZATIONS)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=_UNQUANTIZED)


# small or precision-critical layers left out of int8 (the heads' scores are compared with thresholds)
_UNQUANTIZED = [
    "cvem_align",
    "tag_head",
    "tag_vision_proj",
    "tag_text_proj",
    "tag_fc",
    "attr_head",
    "attr_vision_proj",
    "attr_text_proj",
    "attr_fc",
    "text_encoder",
    "language_model.lm_head",
]


def from_pretrained_kwargs(precision: str, quantization: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` that load a model at ``precision`` (not ``"auto"``: resolve it
    first) straight away, without a float32 detour: ``"upstream"`` loads as saved (the converter saves
    upstream's dtypes) and `set_precision` finishes it."""
    _check_choice("precision", precision, PRECISIONS[1:])
    import torch

    kwargs: dict[str, Any] = {"dtype": "auto" if precision == "upstream" else getattr(torch, precision)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization)
    return kwargs


def set_precision(model, precision: str):
    """Put a loaded model at ``precision`` in place (not ``"auto"``) and return it: ``"upstream"`` keeps the
    language model in bfloat16 and everything else in float32 (`to_upstream_precision`)."""
    import torch

    _check_choice("precision", precision, PRECISIONS[1:])
    if precision != "upstream":
        return model.to(getattr(torch, precision))
    for name, child in model.named_children():
        if name != "language_model":
            child.float()
    for tensor in [*model.parameters(recurse=False), *model.buffers(recurse=False)]:
        tensor.data = tensor.data.float()
    return model.to_upstream_precision()


def load_at_precision(name_or_path, device, precision: str = "auto", quantization: str | None = None, **kwargs):
    """``DynReferForRegionCaptioning.from_pretrained(name_or_path)`` at ``precision`` (``"auto"``: the machine's),
    loaded straight into it (``quantization``: ``"int8"`` or None), on ``device``.

    Returns ``(model, chosen, why)``: the precision chosen and the reason (`describe_choice` words them). The one
    loader of the command line and the server."""
    from .modeling_dynrefer import DynReferForRegionCaptioning  # the model module imports this one

    chosen, why = resolve_precision(precision or "auto", device)
    model = DynReferForRegionCaptioning.from_pretrained(
        name_or_path, **from_pretrained_kwargs(chosen, quantization), **kwargs
    )
    if chosen == "upstream":
        set_precision(model, chosen)
    return model.to(device), chosen, why


def describe_choice(precision: str, why: str, quantization: str | None) -> str:
    """The CLI's one line about the precision it runs at."""
    quantized = f" with {quantization} weights (torchao)" if quantization else ""
    return f"dynrefer: precision {precision}{quantized} ({why}; --dtype to choose, --quiet to hide this)"


# ---------------------------------------------------------------- loading what was saved, as it was saved

# The sub-configs that describe a top-level sub-model, with the sub-model's attribute name.
SUB_MODELS = {
    "vision_config": "vision_model",
    "qformer_config": "qformer",
    "text_config": "language_model",
    "text_encoder_config": "text_encoder",
}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_load_dtype_plan: ContextVar[dict[str, torch.dtype] | None] = ContextVar(
    "dynrefer_load_dtype_plan", default=None
)


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size))


def stored_dtypes(folder: str | Path) -> dict[str, torch.dtype]:
    """The floating dtype of every top-level part (sub-model or parameter) of the safetensors weights in
    ``folder``, read from the file headers (no tensor is read); ``{}`` without safetensors weights.

    A part stored in several floating dtypes gets the widest (nothing is rounded on load)."""
    import torch

    found: dict[str, set[torch.dtype]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, entry in _safetensors_header(path).items():
            name = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            if name is not None:
                found.setdefault(key.split(".", 1)[0], set()).add(getattr(torch, name))
    return {part: max(dtypes, key=lambda d: torch.finfo(d).bits) for part, dtypes in found.items()}


@contextlib.contextmanager
def loading_as_stored(folder: str | Path) -> Iterator[torch.dtype | None]:
    """While loading from ``folder`` with ``dtype="auto"``: yields the dtype of most of the stored parts (the
    model's main dtype, ``None`` without safetensors weights) and lets `load_dtype_plan` give every other part
    its stored dtype, so that each tensor is created once, in its final dtype."""
    dtypes = stored_dtypes(folder)
    if not dtypes:
        yield None
        return
    main = Counter(dtypes.values()).most_common(1)[0][0]
    plan = {rf"^{part}(\.|$)": dtype for part, dtype in dtypes.items() if dtype != main}
    token = _load_dtype_plan.set(plan)
    try:
        yield main
    finally:
        _load_dtype_plan.reset(token)


def load_dtype_plan() -> dict[str, torch.dtype]:
    """The per-part dtypes of the load in progress (`loading_as_stored`), as transformers' ``dtype_plan``."""
    return dict(_load_dtype_plan.get() or {})


def record_dtypes(model) -> None:
    """Write the dtype of every sub-model into its sub-config and the rest's into ``config.dtype``, so that
    ``config.json`` says what is saved (e.g. Flan-T5 in bfloat16 next to a float32 ViT)."""
    config = model.config
    for config_name, module_name in SUB_MODELS.items():
        sub_config, module = getattr(config, config_name, None), getattr(model, module_name, None)
        if sub_config is not None and module is not None:
            dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
            if len(dtypes) == 1:
                sub_config.dtype = dtypes.pop()
    rest = Counter(
        p.dtype
        for name, p in model.named_parameters()
        if p.is_floating_point() and name.split(".", 1)[0] not in SUB_MODELS.values()
    )
    if rest:
        config.dtype = rest.most_common(1)[0][0]
