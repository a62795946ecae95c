"""memkern's operators under ``torch.autocast``: one rule, registered per operator at
PyTorch's own Autocast dispatch keys (AutocastCPU, AutocastCUDA).

Inside ``torch.autocast(device_type, dtype)``, a memkern op called on tensors of that device
type:

* casts the arguments its policy names (activations, and the weights of the products that
  autocast would run in low precision anyway, as it does for ``torch.nn.functional.linear``)
  to the autocast dtype; like PyTorch's own autocast, only float32/float16/bfloat16 tensors
  of that device type are cast, float64 ones are left alone. The casts are recorded by
  autograd, so float32 parameters get float32 gradients;
* then runs with autocast off, so every backend computes in the dtypes it is given (float32
  statistics and accumulation inside the kernels) and the torch backend's own operations
  are not cast a second time.

Each op file says its policy where it registers the op (``register(name, cast=...)``); the
public functions check dtypes as the op will see them (:func:`dtype_seen`). Needs
``torch.get_autocast_dtype`` (torch >= 2.4); without it nothing is registered and autocast
passes the ops by, as it does any op without an autocast rule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

DEVICE_TYPES = ("cpu", "cuda")
AVAILABLE = hasattr(torch, "get_autocast_dtype")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)

_lib = torch.library.Library("memkern", "IMPL")  # lives as long as the module: the registrations


def enabled() -> bool:
    """Whether autocast is on for any device type memkern registers for."""
    return AVAILABLE and any(torch.is_autocast_enabled(d) for d in DEVICE_TYPES)


def _target(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to now, or None when it does not."""
    device_type = t.device.type
    if not AVAILABLE or device_type not in DEVICE_TYPES or t.dtype not in _CASTABLE:
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def dtype_seen(t: torch.Tensor) -> torch.dtype:
    """The dtype an op sees for ``t``, an argument its policy casts."""
    return _target(t) or t.dtype


def register(name: str, *, cast: Iterable[str] = ()) -> None:
    """Register the autocast rule of the operator ``memkern::name``: the arguments named in
    ``cast`` go to the autocast dtype, then the op runs with autocast off."""
    if not AVAILABLE:
        return
    overload = getattr(torch.ops.memkern, name).default
    names = [a.name for a in overload._schema.arguments]
    unknown = set(cast) - set(names)
    if unknown:
        raise ValueError(f"memkern::{name} has no argument(s) {sorted(unknown)}")
    positions = frozenset(names.index(n) for n in cast)

    for device_type in DEVICE_TYPES:

        def kernel(*args, _device_type=device_type):
            args = tuple(_cast(a) if i in positions else a for i, a in enumerate(args))
            with torch.autocast(_device_type, enabled=False):
                return overload(*args)

        _lib.impl(name, kernel, "Autocast" + ("CPU" if device_type == "cpu" else "CUDA"))


def _cast(a):
    if not isinstance(a, torch.Tensor):
        return a
    target = _target(a)
    return a if target is None or target == a.dtype else a.to(target)
