"""2:4 weights on PyTorch's semi-structured sparse kernels (CUDA): when a product may take
them (semi_structured_reason; semi_structured_int8_reason for the int8 layers), the cached
semi-structured copy of a weight, the autograd function that runs the float product on it,
and the int8 product summed in int32.
"""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from memkern import _validate, backends, reference
from memkern.ops.sparse_ops import sparse24_decompress_op
from memkern.ops.sparse_weights import BlockSparseWeight, Sparse24Weight


# -- 2:4 on CUDA: PyTorch's semi-structured sparse kernels ---------------------------------
# Sparse tensor cores run 2:4 products natively; PyTorch reaches them through
# torch.sparse.SparseSemiStructuredTensor (cuSPARSELt, or CUTLASS). memkern's own CUDA path
# expands the weight and runs a dense product, which saves memory but not time.
#
# The semi-structured product serves the forward output and dx only, never the gradient of
# weight.values: PyTorch's tensor built from a dense weight has no gradient of its own, and
# the memkern op's backward already gives the kept values' gradient. So a call that needs
# that gradient (values requires grad with grad mode on: training) keeps the memkern op,
# and frozen or inference use takes the semi-structured path. It sits outside the _s24
# backend table on purpose: the custom op sees neither the Sparse24Weight (where the copy
# is cached) nor whether grad mode is on, and its fake/opcheck/compile behaviour stays as is.
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
_SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)  # sparse tensor cores arrived with Ampere


class SemiStructuredCache:
    """One weight's semi-structured copy (or why building or using it failed) and the
    state of ``values`` / ``meta`` it was built from. ``weight``: a Sparse24Weight, or
    the int8 layout's tensors as an :class:`Int8Sparse24`."""

    __slots__ = ("values_ref", "meta_ref", "key", "tensor", "failure")

    def __init__(self, weight: Sparse24Weight | None = None, tensor=None, failure: str | None = None) -> None:
        self.values_ref = None if weight is None else weakref.ref(weight.values)
        self.meta_ref = None if weight is None else weakref.ref(weight.meta)
        self.key = None if weight is None else _semi_structured_key(weight)
        self.tensor = tensor
        self.failure = failure

    def matches(self, weight: Sparse24Weight) -> bool:
        # Weak references pin identity: a tensor allocated later at the same address, with
        # the same id and version, would otherwise pass for the one the copy was built from.
        return (
            self.values_ref is not None
            and self.values_ref() is weight.values
            and self.meta_ref() is weight.meta
            and self.key == _semi_structured_key(weight)
        )

    # A copy of the weight (deepcopy, pickle) starts without the device-side copy: it is
    # cheap to rebuild, and a SparseSemiStructuredTensor need not survive either.
    def __deepcopy__(self, memo) -> SemiStructuredCache:
        return SemiStructuredCache()

    def __reduce__(self):
        return (SemiStructuredCache, ())


def _semi_structured_key(weight: Sparse24Weight) -> tuple:
    """What must stay equal for a built copy to still be this weight: in-place changes
    (optimiser steps, ``copy_``) bump ``_version``; ``.data`` swaps and ``.to()`` change the
    storage, dtype or device."""
    v, m, s = weight.values, weight.meta, weight.mask
    return (
        v._version,
        v.data_ptr(),
        v.dtype,
        v.device,
        m._version,
        m.data_ptr(),
        tuple(weight.shape),
        None if s is None else (s._version, s.data_ptr()),
    )


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def _semi_structured_class():
    """The SparseSemiStructuredTensor subclass to build, or None if this torch has none.

    Like ``to_sparse_semi_structured``, cuSPARSELt unless
    ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set; unlike it, CUTLASS when this
    torch was built without cuSPARSELt (where ``to_sparse_semi_structured`` would fail)."""
    sparse = torch.sparse
    base = getattr(sparse, "SparseSemiStructuredTensor", None)
    cutlass = getattr(sparse, "SparseSemiStructuredTensorCUTLASS", None)
    cusparselt = getattr(sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    if base is None or not hasattr(sparse, "to_sparse_semi_structured"):
        return None
    cusparselt_backend = getattr(torch.backends, "cusparselt", None)
    cusparselt_ok = cusparselt is not None and cusparselt_backend is not None and cusparselt_backend.is_available()
    if cusparselt_ok and not getattr(base, "_FORCE_CUTLASS", False):
        return cusparselt
    return cutlass


def _runnable_class():
    """(None, the class to build) where both forms may use PyTorch's kernels, else (why
    not, None): a forced memkern backend decides alone, and this torch must have them."""
    forced = backends.forced_backend()
    if forced is not None:
        return f"backend {forced!r} is forced", None
    cls = _semi_structured_class()
    if cls is None:
        return "this torch has no torch.sparse.to_sparse_semi_structured", None
    return None, cls


def _uses_cusparselt(cls) -> bool:
    return cls is getattr(torch.sparse, "SparseSemiStructuredTensorCUSPARSELT", None)


def _capability_reason(cls, device: torch.device) -> str | None:
    """Why the device cannot run ``cls``'s kernels, or None."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < _SEMI_STRUCTURED_MIN_CAPABILITY:
        return f"needs compute capability >= 8.0, device has {major}.{minor}"
    if not _uses_cusparselt(cls) and major != 8:
        # PyTorch builds its CUTLASS sparse kernels for sm_8x only; elsewhere the product
        # itself fails ("Supported only on GPUs with compute capability 8.x").
        return f"CUTLASS's semi-structured kernels need compute capability 8.x, device has {major}.{minor}"
    return None


def _semi_structured_constraints(cls, dtype: torch.dtype):
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    return table.get(dtype)


def _tile_reason(constraints, n: int, k: int, kernel: str) -> str | None:
    """Why an (n, k) weight does not fit the kernel's tiles (a positive multiple of its
    minimum sparse tile), or None."""
    rows, cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    if n < rows or n % rows or k < cols or k % cols:
        return f"weight shape ({n}, {k}) is not a positive multiple of ({rows}, {cols}) ({kernel})"
    return None


def semi_structured_reason(x: torch.Tensor, weight: BlockSparseWeight | Sparse24Weight) -> str | None:
    """Why ``masked_matmul(x, weight)`` does not run on PyTorch's semi-structured sparse
    kernels; None when it does. The one place that decides.

    It does when: ``weight`` is a :class:`Sparse24Weight`; x is a non-empty CUDA
    float16/bfloat16 tensor on a device of compute capability 8.0 or newer (8.x only where
    this torch has no cuSPARSELt and the CUTLASS kernels run); no gradient
    of ``weight.values`` is needed (``values.requires_grad`` is False or grad mode is off;
    gradients of x and bias are fine); no memkern backend is forced; the call is not being
    traced by ``torch.compile``; this torch has ``torch.sparse.to_sparse_semi_structured``;
    the weight's shape is a multiple of (and at least) the kernel's minimum tile
    (in torch 2.13, fp16/bf16: cuSPARSELt 16 x 16, CUTLASS 32 x 64); and building the copy has not
    already failed for this weight.
    """
    if not isinstance(weight, Sparse24Weight):
        return "only 2:4 (Sparse24Weight) weights have a semi-structured form"
    # Checked before anything else: tracing would build a copy from fake tensors, and the
    # checks below read process state that torch.compile does not trace.
    if _compiling():
        return "traced by torch.compile: the memkern op is what gets compiled"
    if x.dtype not in _SEMI_STRUCTURED_DTYPES:
        return f"dtype {_validate.dtype_name(x.dtype)} not supported (supports bfloat16, float16)"
    # Before anything that calls torch.cuda, which would initialise CUDA for CPU tensors.
    if not _on_cuda(x):
        return f"runs on CUDA tensors only, got {x.device.type}"
    if weight.values.requires_grad and torch.is_grad_enabled():
        return "weight.values needs a gradient: the memkern op computes it"
    reason, cls = _runnable_class()
    if reason is not None:
        return reason
    constraints = _semi_structured_constraints(cls, x.dtype)
    if constraints is None:
        return f"{cls.__name__} does not take {_validate.dtype_name(x.dtype)}"
    reason = _tile_reason(constraints, *weight.shape, cls.__name__)
    if reason is not None:
        return reason
    if x.numel() == 0:
        return "empty batch"
    reason = _capability_reason(cls, x.device)
    if reason is not None:
        return reason
    cache = weight.semi_structured_cache
    if cache is not None and cache.failure is not None and cache.matches(weight):
        return cache.failure
    return None


def _build_semi_structured(dense: torch.Tensor):
    return _semi_structured_class().from_dense(dense)


def semi_structured_weight(weight: Sparse24Weight):
    """The weight's semi-structured copy, built once per state of values/meta; None if
    building failed (the reason is kept, so it is not retried until the weight changes)."""
    cache = weight.semi_structured_cache
    if cache is not None and cache.matches(weight):
        return cache.tensor
    weight.semi_structured_cache = None  # release the stale copy before building the new one
    with torch.no_grad():
        weight.semi_structured_cache = _built(
            weight, weight.to_dense().contiguous(), _build_semi_structured, "masked_matmul"
        )
    return weight.semi_structured_cache.tensor


def _built(weight, dense: torch.Tensor, build, op: str) -> SemiStructuredCache:
    """The cache entry of ``build(dense)``: the copy, or why building it failed (warned once)."""
    try:
        return SemiStructuredCache(weight, build(dense), None)
    except RuntimeError as exc:  # unimplemented-kernel errors are RuntimeErrors too
        # The predicate cannot see every build limit (a torch built without the kernels
        # for this architecture, say); the memkern op still gives the answer.
        failure = f"building the semi-structured weight failed: {exc}"
        warnings.warn(f"{op}: {failure}; using the memkern 2:4 op", RuntimeWarning, stacklevel=4)
        return SemiStructuredCache(weight, None, failure)


def _semi_structured_linear(x: torch.Tensor, w_semi, bias: torch.Tensor | None) -> torch.Tensor:
    # Some torch releases require the dense operand's rows to be a multiple of the kernel
    # tile and do not pad it themselves; padding here costs a copy only for ragged batches.
    constraints = _semi_structured_constraints(type(w_semi), x.dtype)
    tile = constraints.dense_min_rows if constraints is not None else 1
    rows = x.shape[0]
    pad = -rows % tile
    x = x.contiguous()
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    y = torch.nn.functional.linear(x, w_semi, bias)
    return y[:rows] if pad else y


class SemiStructuredProduct(torch.autograd.Function):
    """Forward on the semi-structured kernels; dx and dbias as the memkern op computes
    them. Never asked for the gradient of values (semi_structured_reason sees to that)."""

    @staticmethod
    def forward(ctx, x, bias, values, meta, boxed_w_semi):
        # The semi-structured tensor comes boxed in a tuple so autograd does not treat it
        # as an input tensor (it is a constant of this call, with no gradient).
        ctx.save_for_backward(values, meta)
        ctx.cols = x.shape[1]
        return _semi_structured_linear(x, boxed_w_semi[0], bias)

    @staticmethod
    def backward(ctx, grad):
        values, meta = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            # The semi-structured tensor has no transposed copy for grad @ W; the weight is
            # expanded once, as in the memkern op's backward, and accumulated in float32.
            w = sparse24_decompress_op(values.detach(), meta, ctx.cols)
            dx = (grad.float() @ w.float()).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            db = grad.float().sum(0).to(grad.dtype)
        return dx, db, None, None, None


# -- int8 2:4 (W8A8) on CUDA: PyTorch's semi-structured int8 product -----------------------
# The 2:4 layout of the int8 layers (sparse24_int8_linear, SparseInt8Linear) on sparse
# tensor cores: the int8 kept values as a semi-structured copy, multiplied by the int8
# activations with int32 sums (cuSPARSELt's torch._cslt_sparse_mm or CUTLASS's
# torch._sparse_semi_structured_mm, out_dtype int32); memkern quantises x and applies the
# scales. Neither kernel multiplies int8 weights by float activations, so W8A16 keeps the
# memkern op. Outside the op's backend table for the reasons of the float path: the custom
# op is called with tensors that may be fake (tracing, opcheck), and nothing in it holds
# the copy; here the copy is kept per tensor of kept values, for as long as that lives.
_INT8_MAX_ABS = 127  # quantize_rowwise and quantize_sparse24 never produce -128
_INT32_MAX = 2**31 - 1
_INT8_COPIES = WeakIdKeyDictionary()  # values tensor -> SemiStructuredCache


class Int8Sparse24(NamedTuple):
    """The int8 2:4 layout's tensors, seen as a weight by SemiStructuredCache."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]
    mask: None = None


def _int8_product_name(cls) -> str:
    return "_cslt_sparse_mm" if _uses_cusparselt(cls) else "_sparse_semi_structured_mm"


def semi_structured_int8_reason(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, *, weight_only: bool = False
) -> str | None:
    """Why the 2:4 int8 product of ``x`` (``sparse24_int8_linear(x, values, meta, ...)``,
    a 2:4 :class:`memkern.nn.SparseInt8Linear`) does not run on PyTorch's semi-structured
    int8 kernels; None when it does. The one place that decides.

    It does when: the product is W8A8 (PyTorch has no int8-weight x float-activation
    semi-structured product, so W8A16 never does); x is a non-empty CUDA tensor on the
    weight's device, of compute capability 8.0 or newer (8.x only where this torch has no
    cuSPARSELt and the CUTLASS kernels run); no memkern backend is forced; the call is not being traced by
    ``torch.compile``; this torch has the int8 product; the weight's shape ``(N, K)`` is a
    multiple of (and at least) the kernel's int8 tile (in torch 2.13: cuSPARSELt 32 x 32,
    CUTLASS 16 x 128); int32 sums of K/2 int8 products cannot overflow (K <= 266,288); and
    building or running it has not already failed for these tensors.
    """
    if _compiling():
        return "traced by torch.compile: the memkern op is what gets compiled"
    if weight_only:
        return "W8A16: PyTorch's semi-structured kernels multiply int8 by int8 only, not by float activations"
    # Before anything that calls torch.cuda, which would initialise CUDA for CPU tensors.
    if not _on_cuda(x):
        return f"runs on CUDA tensors only, got {x.device.type}"
    if values.device != x.device:
        return f"the weight is on {values.device}, x on {x.device}: the memkern op reports it"
    reason, cls = _runnable_class()
    if reason is not None:
        return reason
    product = _int8_product_name(cls)
    if not hasattr(torch, product):
        return f"this torch has no torch.{product}"
    constraints = _semi_structured_constraints(cls, torch.int8)
    if constraints is None:
        return f"{cls.__name__} does not take int8"
    n, k = values.shape[0], x.shape[-1]
    reason = _tile_reason(constraints, n, k, f"{cls.__name__}, int8")
    if reason is not None:
        return reason
    if k // 2 * _INT8_MAX_ABS**2 > _INT32_MAX:
        return f"in_features {k}: int32 sums of {k // 2} int8 products could overflow"
    if x.numel() == 0:
        return "empty batch"
    reason = _capability_reason(cls, x.device)
    if reason is not None:
        return reason
    cache = _INT8_COPIES.get(values)
    if cache is not None and cache.failure is not None and cache.matches(Int8Sparse24(values, meta, (n, k))):
        return cache.failure
    return None


def _build_int8_semi_structured(dense: torch.Tensor):
    return _semi_structured_class().from_dense(dense)


def semi_structured_int8_weight(values: torch.Tensor, meta: torch.Tensor, in_features: int):
    """The semi-structured copy of the int8 weight ``(values, meta)``, built once per state
    of the two tensors; None if building failed (the reason is kept, as for a float weight)."""
    layout = Int8Sparse24(values, meta, (values.shape[0], in_features))
    cache = _INT8_COPIES.get(values)
    if cache is not None and cache.matches(layout):
        return cache.tensor
    _INT8_COPIES.pop(values, None)  # release the stale copy before building the new one
    with torch.no_grad():
        dense = reference.sparse24_decompress(values, meta, in_features).contiguous()
        cache = _built(layout, dense, _build_int8_semi_structured, "sparse24_int8_linear")
    _INT8_COPIES[values] = cache
    return cache.tensor


def remember_int8_failure(values: torch.Tensor, meta: torch.Tensor, in_features: int, failure: str) -> None:
    """Remember that the product failed for these tensors (until they change), and warn once."""
    _INT8_COPIES[values] = SemiStructuredCache(
        Int8Sparse24(values, meta, (values.shape[0], in_features)), None, failure
    )
    warnings.warn(f"sparse24_int8_linear: {failure}; using the memkern 2:4 op", RuntimeWarning, stacklevel=4)


def release_int8_copy(values: torch.Tensor) -> None:
    """Free the copy of a weight whose call took the memkern op (a remembered failure stays,
    so it is not retried every call). Nothing under torch.compile: the compiled graph holds
    no copy, and reading the cache would break the graph."""
    if _compiling():
        return
    cache = _INT8_COPIES.get(values)
    if cache is not None and cache.failure is None:
        del _INT8_COPIES[values]


def semi_structured_int8_mm(x_q: torch.Tensor, w_semi) -> torch.Tensor:
    """``x_q @ W^T`` summed in int32: x_q ``(M, K)`` int8, ``w_semi`` the int8 weight's
    semi-structured copy; returns ``(M, N)`` int32 (a transposed view)."""
    # The dense operand is padded to the kernel's tile (PyTorch's own wrappers do the same)
    # and passed column-major, x_q^T of a row-major x_q: the one layout both int8 kernels
    # take with a row-major sparse operand.
    constraints = _semi_structured_constraints(type(w_semi), torch.int8)
    tile = constraints.dense_min_cols if constraints is not None else 1
    rows = x_q.shape[0]
    x_q = torch.nn.functional.pad(x_q, (0, 0, 0, -rows % tile)).contiguous()
    if w_semi.meta is None:  # cuSPARSELt: kept values and positions in one tensor
        acc = torch._cslt_sparse_mm(w_semi.packed, x_q.t(), out_dtype=torch.int32)
    else:  # CUTLASS: positions in meta
        acc = torch._sparse_semi_structured_mm(w_semi.packed, w_semi.meta, x_q.t(), out_dtype=torch.int32)
    return acc[:, :rows].t()
