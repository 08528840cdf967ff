"""Backends of the sampling ops: one schema per op, one kernel per backend (a small registry, as Liger's).

Each op has one schema, the argument list every backend's kernel takes once the public function in
:mod:`dynrefer_hf.ops` has checked and normalised the user's arguments (``OP_SCHEMAS``)::

    roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic)
    offset_resample(value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale,
                    remove_center, deterministic)

A backend is a :class:`Backend` record: its name (the value of ``backend=`` and ``DYNREFER_OPS_BACKEND``),
one kernel per op it implements (a callable, or ``"module:function"`` imported on first use, so that
``import dynrefer_hf`` never imports Triton), the device types its kernels run on, and whether ``"auto"``
picks it. Adding a backend is one new module holding its kernels and one :func:`register_backend` call
(docs/ops.md, "Adding a backend").

``"auto"`` picks the first registered backend other than the reference that is automatic for the tensor's
device type and implements the op, and the reference otherwise; a kernel that fails to import in auto mode
logs a warning once and falls back to the reference.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import types
from collections.abc import Callable, Mapping
from functools import cache

__all__ = [
    "ENV_BACKEND",
    "OP_SCHEMAS",
    "REFERENCE",
    "Backend",
    "backend_names",
    "choose_backend",
    "get_backend",
    "register_backend",
    "resolve_backend_name",
    "unregister_backend",
]

logger = logging.getLogger(__name__)

ENV_BACKEND = "DYNREFER_OPS_BACKEND"
REFERENCE = "reference"  # runs everywhere: the fallback of "auto"

OP_SCHEMAS: dict[str, tuple[str, ...]] = {
    "roi_align": ("input", "rois", "output_size", "spatial_scale", "sampling_ratio", "aligned", "deterministic"),
    "offset_resample": (
        "value", "offset_mask", "kernel_size", "stride", "padding", "dilation", "group", "offset_scale",
        "remove_center", "deterministic",
    ),
}  # fmt: skip


def _everywhere(device_type: str) -> bool:
    return True


def _never(device_type: str) -> bool:
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class Backend:
    """One ops backend.

    Attributes:
        name: the value of ``backend=`` / ``DYNREFER_OPS_BACKEND`` that asks for it.
        kernels: op name -> kernel, a callable taking the op's schema (``OP_SCHEMAS``) positionally, or
            ``"module:function"`` naming one (imported on first use). Ops left out fall back to the
            reference in auto mode and are refused when the backend is asked for by name.
        runs_on: whether the kernels can run on tensors of a device type (``"cpu"``, ``"cuda"``, ...);
            asking for the backend by name on another device raises ``RuntimeError``.
        automatic: whether ``"auto"`` picks this backend for a device type.
        requirement: what ``runs_on`` asks, in words, for the error message.
    """

    name: str
    kernels: Mapping[str, Callable | str]
    runs_on: Callable[[str], bool] = _everywhere
    automatic: Callable[[str], bool] = _never
    requirement: str = ""
    # The imported kernels, one attribute per op: `torch.compile` reads an attribute when it is first used,
    # after `choose_backend` imported it while tracing, where it would keep a stale copy of a dict.
    _loaded: types.SimpleNamespace = dataclasses.field(
        default_factory=types.SimpleNamespace, init=False, repr=False
    )

    def kernel(self, op: str) -> Callable:
        """The kernel of ``op``, imported on first use; ``ImportError`` when its module cannot be imported."""
        if not hasattr(self._loaded, op):
            kernel = self.kernels[op]
            if isinstance(kernel, str):
                module_name, _, attribute = kernel.partition(":")
                kernel = getattr(importlib.import_module(module_name), attribute)
            _check_schema(self.name, op, kernel)
            setattr(self._loaded, op, kernel)
        return getattr(self._loaded, op)


_REGISTRY: dict[str, Backend] = {}


def _check_schema(name: str, op: str, kernel: Callable) -> None:
    parameters = tuple(inspect.signature(kernel).parameters)
    if parameters != OP_SCHEMAS[op]:
        raise TypeError(
            f"the {op} kernel of the ops backend {name!r} must take ({', '.join(OP_SCHEMAS[op])}), "
            f"got ({', '.join(parameters)})"
        )


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (callable kernels have their schema checked now, named ones on first use)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a dynrefer_hf.ops.Backend, got {type(backend).__name__}")
    if not backend.name.isidentifier() or backend.name == "auto":
        raise ValueError(f"an ops backend name must be an identifier other than 'auto', got {backend.name!r}")
    if backend.name in _REGISTRY:
        raise ValueError(f"an ops backend named {backend.name!r} is registered already")
    unknown = sorted(set(backend.kernels) - set(OP_SCHEMAS))
    if unknown:
        raise ValueError(
            f"ops backend {backend.name!r} has kernels for unknown ops {unknown}; ops: {list(OP_SCHEMAS)}"
        )
    for op, kernel in backend.kernels.items():
        if not isinstance(kernel, str):
            _check_schema(backend.name, op, kernel)
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend (the reference stays)."""
    if name == REFERENCE or name not in _REGISTRY:
        raise ValueError(f"no removable ops backend named {name!r}; registered: {list(_REGISTRY)}")
    del _REGISTRY[name]


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"no ops backend named {name!r}; registered: {list(_REGISTRY)}")
    return _REGISTRY[name]


def backend_names() -> tuple[str, ...]:
    """The accepted values of ``backend=`` and ``DYNREFER_OPS_BACKEND``: ``"auto"`` and every registered backend."""
    return ("auto", *_REGISTRY)


def resolve_backend_name(backend: str | None, device_type: str, op: str | None = None) -> str:
    """The backend asked for (``None`` reads ``DYNREFER_OPS_BACKEND``), with ``"auto"`` resolved for a device type
    (and, given ``op``, among the backends implementing it)."""
    if backend is None:
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend not in backend_names():
        raise ValueError(
            f"ops backend must be one of {backend_names()}, got {backend!r} (argument or ${ENV_BACKEND})"
        )
    if backend != "auto":
        return backend
    for candidate in _REGISTRY.values():
        if (
            candidate.name != REFERENCE
            and (op is None or op in candidate.kernels)
            and candidate.automatic(device_type)
        ):
            return candidate.name
    return REFERENCE


def choose_backend(op: str, backend: str | None, device_type: str) -> str:
    """The name of the backend whose kernel runs ``op`` on ``device_type``, its kernel imported (registered).

    A backend asked for by name (argument or environment) that cannot run the op raises ``RuntimeError``;
    in auto mode a kernel that fails to import falls back to the reference, with a warning logged once.
    """
    explicit = (backend or os.environ.get(ENV_BACKEND) or "auto") != "auto"
    name = resolve_backend_name(backend, device_type, op)
    chosen = _REGISTRY[name]
    if explicit:
        if op not in chosen.kernels:
            raise RuntimeError(f"backend={name!r} was asked for {op}, but it has no {op} kernel")
        if not chosen.runs_on(device_type):
            raise RuntimeError(
                f"backend={name!r} was asked for {op} on a {device_type} tensor; the kernels need {chosen.requirement}"
            )
    try:
        chosen.kernel(op)
    except ImportError as error:
        if explicit:
            raise RuntimeError(
                f"backend={name!r} was asked for {op}, but its kernel {chosen.kernels[op]} cannot be imported "
                f"({error}); use backend='reference'"
            ) from error
        _warn_fallback(name, op, str(error))
        return REFERENCE
    return name


@cache
def _warn_fallback(name: str, op: str, reason: str) -> None:
    logger.warning("The %s kernel of %s is unavailable (%s); using the PyTorch reference.", name, op, reason)


# ------------------------------------------------------------------------------------------- the backends


@cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_runs_on(device_type: str) -> bool:
    return device_type == "cuda" or _triton_interpret()


def _triton_automatic(device_type: str) -> bool:
    return _triton_interpret() or (device_type == "cuda" and _triton_importable())


register_backend(
    Backend(
        REFERENCE,
        kernels={
            "roi_align": "dynrefer_hf.ops.reference:roi_align_kernel",
            "offset_resample": "dynrefer_hf.ops.reference:offset_resample_kernel",
        },
    )
)
register_backend(
    Backend(
        "triton",
        kernels={
            "roi_align": "dynrefer_hf.ops.triton_roi_align:roi_align_kernel",
            "offset_resample": "dynrefer_hf.ops.triton_offset_resample:offset_resample_kernel",
        },
        runs_on=_triton_runs_on,
        automatic=_triton_automatic,
        requirement="a CUDA tensor or TRITON_INTERPRET=1 (set before triton is imported)",
    )
)
