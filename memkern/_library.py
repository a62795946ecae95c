"""What this installation can run: the compiled extension memkern._C and Triton.

Nothing here initialises CUDA: the checks look at the build and at installed packages,
never at devices.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch  # noqa: F401  (memkern._C links against libtorch, which must be loaded first)

_cpp_error: str | None = None
try:
    from memkern import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _cpp_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "memkern: the compiled extension memkern._C is not available "
        f"({_cpp_error}); ops fall back to Triton or the PyTorch reference. "
        "Run `make install` (or `pip install --no-build-isolation -e .`) to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpp() -> bool:
    """True when the C++ extension (CPU kernels) is loaded."""
    return _C is not None


def cpp_error() -> str | None:
    """Why the C++ extension is missing, or None."""
    return _cpp_error


def has_cuda_ext() -> bool:
    """True when memkern._C was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install must not break memkern
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    return None


def has_triton() -> bool:
    """True when Triton is installed and importable (says nothing about devices)."""
    return _triton_import_error() is None


def triton_error() -> str | None:
    return _triton_import_error()


def triton_version() -> str | None:
    if not has_triton():
        return None
    import triton

    return triton.__version__
