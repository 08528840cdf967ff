"""Registration helpers shared by the ``dynrefer::`` operators (no Triton import here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["AUTOCAST_DEVICE_TYPES", "register_float32_autocast"]

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
_LIBRARY = torch.library.Library("dynrefer", "FRAGMENT")  # module-level: the registrations live as long as it


def _upcast(argument):
    """torchvision's ``cached_cast(kFloat, ...)``: float16/bfloat16 tensors to float32, everything else as is."""
    if isinstance(argument, torch.Tensor) and argument.dtype in (torch.float16, torch.bfloat16):
        return argument.float()
    return argument


def register_float32_autocast(qualname: str, result_like: Sequence[int]) -> None:
    """Autocast rule of torchvision's ``roi_align`` for the operator ``qualname``, on CPU and CUDA.

    Inside an autocast region the operator's float16/bfloat16 tensor arguments are cast to float32 (so mixed
    dtypes are accepted), the operator runs with autocast off (float32 math, also for float32 inputs), and
    result ``i`` is cast back to the dtype of argument ``result_like[i]``, as torchvision does.
    """
    namespace, name = qualname.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    for device_type in AUTOCAST_DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def rule(*args, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                results = overload(*(_upcast(argument) for argument in args))
            if isinstance(results, torch.Tensor):
                return results.to(args[result_like[0]].dtype)
            return tuple(result.to(args[i].dtype) for result, i in zip(results, result_like))

        overload.py_impl(key)(rule)  # used while tracing (torch.compile, torch.export)
        _LIBRARY.impl(name, lambda _keyset, *args, _rule=rule: _rule(*args), key_name, with_keyset=True)
