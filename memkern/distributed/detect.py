"""Whether a call's arguments include DTensors: the ops ask this on every call, so it imports
nothing (a DTensor can only exist once torch.distributed.tensor is imported)."""

from __future__ import annotations

import sys


def any_dtensor(*tensors) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(x, module.DTensor) for x in tensors)
