"""memkern: memory-saving fused kernels for distilling, pruning and quantising LLMs."""

from importlib.metadata import PackageNotFoundError, version as _dist_version

from memkern import _library  # noqa: F401  (loads memkern._C, warns once if it is missing)
from memkern import backends, nn, ops, prune
from memkern.backends import BackendUnavailable, use_backend
from memkern.checkpoint import load, save
from memkern.convert import Footprint, convert, memory_footprint
from memkern.share import ShareReport, share_layers

try:
    __version__ = _dist_version("memkern")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BackendUnavailable",
    "Footprint",
    "backends",
    "convert",
    "load",
    "memory_footprint",
    "nn",
    "ops",
    "prune",
    "save",
    "share_layers",
    "ShareReport",
    "use_backend",
    "__version__",
]
